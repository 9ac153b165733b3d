"""Describing aliases without secrets, redaction, and report files."""
import re
from pathlib import Path
from typing import Any

from django.db import connections

from anthias_rollback import fsutil

# user:password@ in a URL, up to the LAST @ before the host (a raw @ in a
# password is accepted by parse_postgres_url, as urlsplit splits there).
_DSN_CREDENTIALS = re.compile(r'((?:postgres|postgresql|pgsql)://)[^\s/]*@')
# password=... as a URL query parameter or a libpq keyword DSN.
_PASSWORD_PARAMETER = re.compile(
    r"((?:^|[?&\s(,])password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s)]+)",
    re.IGNORECASE)
# Passwords of aliases not in settings.DATABASES (an override alias made
# for one run: rollback_migration --postgres-password).
_REGISTERED: set[str] = set()


def register_secret(password: Any) -> None:
    """Redact *password* from every later output of this process."""
    if password:
        _REGISTERED.add(str(password))


def first_line(err: BaseException) -> str:
    """First non-empty line of an error's message (psycopg2 adds lines)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def describe_alias(alias: str) -> str:
    """`alias (Engine location)` with no user, password or full DSN."""
    settings = connections[alias].settings_dict
    engine = settings.get('ENGINE', '')
    if engine.endswith('sqlite3'):
        return f'{alias} (SQLite {settings.get("NAME")})'
    host = settings.get('HOST') or 'localhost'
    port = settings.get('PORT') or 5432
    return f'{alias} (PostgreSQL {host}:{port}/{settings.get("NAME")})'


def secrets() -> list[str]:
    """Passwords configured on any alias (to strip from any output)."""
    found = set(_REGISTERED)
    for alias in connections.settings:
        config = connections.settings[alias]
        for password in (config.get('PASSWORD'),
                         (config.get('OPTIONS') or {}).get('password')):
            if password:
                found.add(str(password))
    # Longest first: a password containing another is removed whole.
    return sorted(found, key=len, reverse=True)


def _secret_pattern(secret: str) -> re.Pattern:
    """*secret* where it stands alone: not inside a longer word (with
    the password `anthias`, `anthias_app.0002_upgrade` stays readable).
    Every place a password really appears (a DSN's `:pw@`, `pw=...`, a
    quoted value, a line of its own) puts a non-word character beside
    it."""
    return re.compile(r'(?<![A-Za-z0-9_])' + re.escape(secret)
                      + r'(?![A-Za-z0-9_])')


def redact(value: Any) -> Any:
    """Strip passwords and DSN credentials from strings, lists and dicts."""
    if isinstance(value, str):
        # Known passwords first: what is left of a DSN is then safe to
        # pattern-match.
        for secret in secrets():
            value = _secret_pattern(secret).sub('***', value)
        value = _DSN_CREDENTIALS.sub(r'\1***@', value)
        return _PASSWORD_PARAMETER.sub(r'\1***', value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def write_json_report(path: Path, data: dict[str, Any]) -> Path:
    """Write a redacted JSON report atomically, mode 0600."""
    path = Path(path)
    fsutil.ensure_private_dir(path.parent)
    fsutil.atomic_write_json(path, redact(data), mode=0o600)
    return path
