"""Database profiles: both engines configured at once, one of them active.

`build_databases()` returns a DATABASES dict with three aliases: `sqlite`,
`postgres` and `default` (a copy of the active one). A host settings module
adopts it with:

    from anthias_rollback.profiles import build_databases
    DATABASES = build_databases(data_dir=DATA_DIR)

and gives django-dbbackup what its PostgreSQL connector needs with
`DBBACKUP_CONNECTORS = dbbackup_connectors(DATABASES)`.

The active profile comes from the env var ANTHIAS_DB_PROFILE if set, else
from the state file in the data dir (written only through
`write_active_profile`, atomically), else `sqlite`. The state file records
its own inode: a copy of it (an Anthias backup restored on this or another
device, a data dir copied file by file) has another one and is refused.

This module is the one place where the alias names are spelled out.
"""
import copy
import itertools
import os
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import environ

from anthias_rollback import fsutil
from anthias_rollback.exceptions import ConfigError, StateFileError

SQLITE = 'sqlite'
POSTGRES = 'postgres'
DEFAULT = 'default'
PROFILES = (SQLITE, POSTGRES)

STATE_FILE_NAME = 'anthias_db_profile.json'
# The state file's own inode, recorded in it when written. Anthias's
# /api/v2/backup tars the whole data dir (src/anthias_server/lib/
# backup_helper.py) and its restore extracts it over another device's:
# the copy would flip that device to this one's profile. Restored, copied
# or saved by an editor, the file records an inode that is not its own.
INODE_KEY = 'inode'
# Key Django ignores in a DATABASES entry: a config problem found while
# building settings, reported when the alias is used (not at import, so a
# bad PostgreSQL URL never stops a device that runs on SQLite).
PROBLEM_KEY = 'ANTHIAS_CONFIG_PROBLEM'
# Key on `default`: the active profile could not be read (bad
# ANTHIAS_DB_PROFILE or state file), so `default` fell back to sqlite.
# Reported by the system check, /health and the commands that need the
# profile; settings import itself never fails for it.
PROFILE_PROBLEM_KEY = 'ANTHIAS_PROFILE_PROBLEM'
ADOPTION_HINT = ('add to settings.py: `from anthias_rollback.profiles '
                 'import build_databases` and `DATABASES = '
                 'build_databases(data_dir=DATA_DIR)`')

# Anthias's own SQLite options (anthias_django/settings.py).
SQLITE_OPTIONS = {
    'timeout': 20,
    'init_command': 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;',
    'transaction_mode': 'IMMEDIATE',
}
DEFAULT_CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class ActiveProfile:
    name: str
    source: str  # 'env' | 'state file' | 'default'
    detail: str  # where exactly (variable name, file path)


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def sqlite_settings(path: Path) -> dict[str, Any]:
    """DATABASES entry for the SQLite file at *path*."""
    return {
        'ENGINE': 'django.db.backends.sqlite3',
        'NAME': str(path),
        'OPTIONS': dict(SQLITE_OPTIONS),
    }


def parse_postgres_url(url: str, variable: str) -> dict[str, Any]:
    """DATABASES entry from a postgres:// URL; ConfigError if malformed.

    The message names the variable and the problem, never the URL (it may
    hold a password).
    """
    hint = ('expected postgres://HOST:PORT/DBNAME with user and '
            'password before the host, or ?host=/socket/dir')
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ('postgres', 'postgresql', 'pgsql'):
        raise ConfigError(
            f'{variable} is malformed: scheme must be postgres://, '
            f'not {scheme or "missing"}; {hint}')
    try:
        config = environ.Env.db_url_config(url)
    except ValueError as err:
        reason = 'port is not a number' if 'Port' in str(err) else 'bad URL'
        raise ConfigError(f'{variable} is malformed: {reason}; {hint}') \
            from None
    options = dict(config.get('OPTIONS') or {})
    # A unix-socket host (embedded PostgreSQL) arrives as ?host=/dir.
    if not config.get('HOST') and 'host' in options:
        config['HOST'] = options.pop('host')
    if 'port' in options and not config.get('PORT'):
        config['PORT'] = options.pop('port')
    if not config.get('NAME'):
        raise ConfigError(f'{variable} is malformed: no database name; '
                          f'{hint}')
    options.setdefault('connect_timeout', DEFAULT_CONNECT_TIMEOUT)
    config['OPTIONS'] = options
    config['ENGINE'] = 'django.db.backends.postgresql'
    return config


def postgres_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """DATABASES entry for PostgreSQL from ANTHIAS_POSTGRES_URL or the
    runbook's POSTGRES_* variables. A malformed value does not raise: it is
    recorded under PROBLEM_KEY and raised by `check_alias_configured`."""
    env = _env(env)
    url = env.get('ANTHIAS_POSTGRES_URL', '').strip()
    try:
        if url:
            return parse_postgres_url(url, 'ANTHIAS_POSTGRES_URL')
        port = env.get('POSTGRES_PORT', '5432').strip() or '5432'
        if not port.isdigit():
            raise ConfigError('POSTGRES_PORT is malformed: '
                              f'{port!r} is not a port number')
        timeout = env.get('POSTGRES_CONNECT_TIMEOUT', '').strip() or str(
            DEFAULT_CONNECT_TIMEOUT)
        if not timeout.isdigit():
            raise ConfigError('POSTGRES_CONNECT_TIMEOUT is malformed: '
                              f'{timeout!r} is not a whole number of '
                              'seconds')
        return {
            'ENGINE': 'django.db.backends.postgresql',
            'NAME': env.get('POSTGRES_DB', 'anthias'),
            'USER': env.get('POSTGRES_USER', 'anthias'),
            'PASSWORD': env.get('POSTGRES_PASSWORD', ''),
            'HOST': env.get('POSTGRES_HOST', 'localhost'),
            'PORT': int(port),
            'OPTIONS': {'connect_timeout': int(timeout)},
        }
    except ConfigError as err:
        return {
            'ENGINE': 'django.db.backends.postgresql',
            'NAME': 'unconfigured', 'HOST': '', 'PORT': '',
            'USER': '', 'PASSWORD': '', 'OPTIONS': {},
            PROBLEM_KEY: str(err),
        }


def state_file_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_FILE_NAME


def read_state_file(path: Path, accept_copy: bool = False
                    ) -> dict[str, Any] | None:
    """The state file's content, None if absent; StateFileError if bad.

    Also StateFileError, in one line saying what to do, when the file is
    a copy: its recorded inode is not its own (see INODE_KEY). With
    *accept_copy* a copy's content is returned (for a forced rewrite).
    A file without the key (written before it existed) is obeyed.
    """
    fix = 'fix it with `manage.py switch_database --to sqlite --force`'
    found = fsutil.read_json(path, 'profile state file', StateFileError,
                             fix, with_inode=True)
    if found is None:
        return None
    state, inode = found
    if state.get('profile') not in PROFILES:
        raise StateFileError(f'profile state file {path} is not valid; '
                             f'{fix}')
    recorded = state.get(INODE_KEY)
    if recorded is not None and recorded != inode and not accept_copy:
        raise StateFileError(_copy_problem(path, state, inode))
    return state


def _copy_problem(path: Path, state: dict[str, Any], inode: int) -> str:
    profile = state['profile']
    changed = state.get('changed_at', 'unknown')
    fix = f'delete it to run on {SQLITE}'
    if profile != SQLITE:
        fix += (f'; if this device really is on {profile}, delete it and '
                f'run `manage.py switch_database --to {profile} --force` '
                '(a new rollback window)')
    return (f'profile state file {path} is a copy (written as inode '
            f'{state[INODE_KEY]}, this file is {inode}): restored from an '
            'Anthias backup or copied from another data dir, so its '
            f'profile {profile!r} (set {changed}) is not obeyed; {fix}')


def resolve_active_profile(data_dir: Path,
                           env: Mapping[str, str] | None = None,
                           accept_copy: bool = False) -> ActiveProfile:
    """Which profile is active, and where that came from.

    Raises ConfigError (ANTHIAS_DB_PROFILE) or StateFileError (the state
    file unreadable, invalid, or a copy unless *accept_copy*).
    """
    env = _env(env)
    value = env.get('ANTHIAS_DB_PROFILE', '').strip()
    if value:
        if value not in PROFILES:
            raise ConfigError(
                f'ANTHIAS_DB_PROFILE={value!r} is not a profile; '
                f'use one of: {", ".join(PROFILES)}')
        return ActiveProfile(value, 'env', 'ANTHIAS_DB_PROFILE')
    path = state_file_path(data_dir)
    state = read_state_file(path, accept_copy=accept_copy)
    if state is not None:
        return ActiveProfile(state['profile'], 'state file', str(path))
    return ActiveProfile(SQLITE, 'default', 'no ANTHIAS_DB_PROFILE, '
                         'no state file')


def build_databases(data_dir: str | Path | None = None,
                    env: Mapping[str, str] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """DATABASES with `sqlite`, `postgres` and `default` (= active).

    Reads ANTHIAS_DATA_DIR (else *data_dir*), ANTHIAS_SQLITE_PATH,
    ANTHIAS_POSTGRES_URL / POSTGRES_*, ANTHIAS_DB_PROFILE and the state
    file. Never raises: a bad PostgreSQL setting is recorded under
    PROBLEM_KEY, a profile that cannot be known (bad ANTHIAS_DB_PROFILE
    or state file) makes `default` sqlite with PROFILE_PROBLEM_KEY set.
    """
    env = _env(env)
    base = env.get('ANTHIAS_DATA_DIR') or data_dir or './var'
    base = Path(base).expanduser()
    sqlite_path = Path(env.get('ANTHIAS_SQLITE_PATH')
                       or base / 'anthias.db').expanduser()
    databases = {
        SQLITE: sqlite_settings(sqlite_path),
        POSTGRES: postgres_settings(env),
    }
    # Under tests every alias gets its own test database, never a MIRROR:
    # pytest-django creates only the declared aliases' databases, so a
    # host test declaring just `default` ran on the mirrored alias's
    # live NAME (the real anthias.db). The real aliases must not wait on
    # `default` either (Django's default dependency, circular here).
    databases[SQLITE]['TEST'] = {
        'NAME': str(sqlite_path.with_name(f'test_{sqlite_path.name}')),
        'DEPENDENCIES': []}
    databases[POSTGRES]['TEST'] = {
        'NAME': f'test_{databases[POSTGRES]["NAME"]}', 'DEPENDENCIES': []}
    problem = None
    try:
        active = resolve_active_profile(base, env).name
    except (ConfigError, StateFileError) as err:
        # SQLite is where the device runs unless told otherwise: a bad
        # profile setting must not brick it at settings import.
        active, problem = SQLITE, str(err)
    # A shallow copy shares TEST with the active alias: same test NAME,
    # same signature, so Django creates one test database for both, and
    # a host that edits DATABASES['sqlite']['TEST'] moves `default` too.
    databases[DEFAULT] = dict(databases[active])
    if problem:
        databases[DEFAULT][PROFILE_PROBLEM_KEY] = (
            f'{problem} (running on sqlite until fixed)')
    return databases


def dbbackup_connectors(databases: Mapping[str, Mapping[str, Any]],
                        env: Mapping[str, str] | None = None,
                        pg_dump: str | None = None
                        ) -> dict[str, dict[str, Any]]:
    """DBBACKUP_CONNECTORS for django-dbbackup (Anthias's start sequence
    runs `dbbackup` and `dbrestore` on `default`), one entry per
    PostgreSQL alias of *databases*: `postgres`, and `default` on the
    postgres profile. The pg_dump is *pg_dump* (the ANTHIAS_PG_DUMP
    setting, if set in settings.py), else ANTHIAS_PG_DUMP from the
    environment, else `pg_dump` on PATH.

    - DUMP_CMD / RESTORE_CMD: that pg_dump and the pg_restore beside it,
      the client of the server's major version (dbbackup's own default
      is whatever `pg_dump` PATH finds).
    - HOST percent-encoded when it is a socket dir: dbbackup 5.3 writes
      HOST unencoded into a postgresql:// URI, where /run/postgresql
      would become part of the database name.
    - ENV PGCONNECT_TIMEOUT from OPTIONS (dbbackup passes no OPTIONS): a
      server that does not answer fails the backup in seconds.
    """
    dump = (pg_dump or _env(env).get('ANTHIAS_PG_DUMP', '').strip()
            or 'pg_dump')
    folder = os.path.dirname(dump)
    restore = os.path.join(folder, 'pg_restore') if folder else 'pg_restore'
    connectors: dict[str, dict[str, Any]] = {}
    for alias, entry in databases.items():
        if entry.get('ENGINE') != 'django.db.backends.postgresql':
            continue
        connector: dict[str, Any] = {'DUMP_CMD': dump,
                                     'RESTORE_CMD': restore}
        host = str(entry.get('HOST') or '')
        if host.startswith('/'):
            connector['HOST'] = urllib.parse.quote(host, safe='')
        timeout = (entry.get('OPTIONS') or {}).get('connect_timeout')
        if timeout:
            connector['ENV'] = {'PGCONNECT_TIMEOUT': str(timeout)}
        connectors[alias] = connector
    return connectors


def alias_settings(alias: str) -> dict[str, Any]:
    """The settings of *alias*; ConfigError (saying how to adopt
    build_databases) when DATABASES lacks it, instead of Django's
    ConnectionDoesNotExist traceback."""
    from django.db import connections
    from django.utils.connection import ConnectionDoesNotExist

    try:
        return connections[alias].settings_dict
    except ConnectionDoesNotExist:
        raise ConfigError(f'DATABASES has no {alias!r} alias; '
                          f'{ADOPTION_HINT}') from None


def sqlite_alias_path(alias: str = SQLITE) -> Path:
    """The file behind a SQLite alias."""
    return Path(alias_settings(alias)['NAME'])


def check_alias_configured(alias: str) -> None:
    """Raise ConfigError if building the alias's settings found a problem."""
    problem = alias_settings(alias).get(PROBLEM_KEY)
    if problem:
        raise ConfigError(problem)


def profile_problem() -> str | None:
    """Why `default` fell back to sqlite at settings import, or None."""
    from django.conf import settings

    entry = getattr(settings, 'DATABASES', {}).get(DEFAULT) or {}
    return entry.get(PROFILE_PROBLEM_KEY)


def write_active_profile(data_dir: Path, profile: str,
                         extra: Mapping[str, Any] | None = None) -> Path:
    """Atomically record *profile* as active in the data dir's state file,
    with the file's own inode (INODE_KEY).

    A crash leaves the old or the new file, never a torn one. Raises
    ConfigError for an unknown profile, StateFileError when the data dir
    is not writable (nothing changed then).
    """
    if profile not in PROFILES:
        raise ConfigError(f'unknown profile {profile!r}; use one of: '
                          f'{", ".join(PROFILES)}')
    path = state_file_path(data_dir)
    state = dict(extra or {})
    state.update(profile=profile,
                 changed_at=datetime.now(UTC).isoformat())
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        # 0600 like every file the tool creates: the host processes run
        # as the same user as the tool, so they still read it.
        fsutil.atomic_write_json(path, state, mode=0o600,
                                 inode_key=INODE_KEY)
    except OSError as err:
        raise StateFileError(f'cannot write profile state file {path}: '
                             f'{err.strerror}') from None
    return path


def alias_for_profile(profile: str) -> str:
    """Profiles and aliases share names; kept as a function for clarity."""
    if profile not in PROFILES:
        raise ConfigError(f'unknown profile {profile!r}')
    return profile


_temporary_counter = itertools.count(1)


@contextmanager
def temporary_alias(settings_dict: dict[str, Any],
                    prefix: str = 'anthias_tmp') -> Iterator[str]:
    """Register an extra, short-lived alias (a backup file, a scratch
    database) and yield its name; closed and removed on exit.

    Adding an alias is not changing DATABASES: the configured aliases are
    never touched, and no router or model code sees the new one unless a
    caller names it.
    """
    from django.db import connections
    from django.db.utils import load_backend

    alias = f'{prefix}_{os.getpid()}_{next(_temporary_counter)}'
    config = copy.deepcopy(settings_dict)
    for key, value in (('ATOMIC_REQUESTS', False), ('AUTOCOMMIT', True),
                       ('CONN_MAX_AGE', 0), ('CONN_HEALTH_CHECKS', False),
                       ('OPTIONS', {}), ('TIME_ZONE', None), ('USER', ''),
                       ('PASSWORD', ''), ('HOST', ''), ('PORT', '')):
        config.setdefault(key, value)
    config['TEST'] = {'CHARSET': None, 'COLLATION': None, 'MIGRATE': True,
                      'MIRROR': None, 'NAME': None, 'DEPENDENCIES': []}
    # Registered on the (thread-local) handler only, not in its settings:
    # Django treats it as a dynamically created connection, like the ones
    # `connections.create_connection` makes. Threads that need it are
    # handed the wrapper itself.
    wrapper = load_backend(config['ENGINE']).DatabaseWrapper(config, alias)
    connections[alias] = wrapper
    # Not in settings.DATABASES, so report.secrets() would not know it.
    from anthias_rollback import report

    report.register_secret(config.get('PASSWORD'))
    report.register_secret((config.get('OPTIONS') or {}).get('password'))
    try:
        yield alias
    finally:
        try:
            wrapper.close()
        finally:
            del connections[alias]


def sqlite_file_alias(path: Path, wal: bool = False
                      ) -> AbstractContextManager[str]:
    """A temporary alias for the SQLite file at *path* (a backup, a new
    rollback file). WAL only when asked: a file that is not live yet gets
    a plain rollback journal, so it is one self-contained file."""
    config = sqlite_settings(path)
    if not wal:
        config['OPTIONS'] = {'timeout': SQLITE_OPTIONS['timeout']}
    return temporary_alias(config, prefix='anthias_file')


@contextmanager
def default_as(alias: str) -> Iterator[None]:
    """In this thread only, let `default` talk to *alias*'s database.

    Used to verify a restored SQLite file through the app's own views
    right after a rollback, while this process was started with
    `default` = PostgreSQL. DATABASES is not changed; the original
    `default` connection is put back on exit (the same technique as
    Django's LiveServerThread `connections_override`).
    """
    from django.db import connections
    from django.db.utils import load_backend

    original = connections[DEFAULT]
    config = copy.deepcopy(connections[alias].settings_dict)
    wrapper = load_backend(config['ENGINE']).DatabaseWrapper(config,
                                                             DEFAULT)
    connections[DEFAULT] = wrapper
    try:
        yield
    finally:
        wrapper.close()
        connections[DEFAULT] = original


@contextmanager
def postgres_override_alias(overrides: Mapping[str, Any]
                            ) -> Iterator[str]:
    """The `postgres` alias, or a temporary copy of it with the runbook's
    --postgres-host/port/db/user/password applied (DATABASES itself is
    never changed)."""
    from django.db import connections

    if not overrides:
        yield POSTGRES
        return
    config = copy.deepcopy(connections[POSTGRES].settings_dict)
    config.pop(PROBLEM_KEY, None)
    keys = {'host': 'HOST', 'port': 'PORT', 'db': 'NAME', 'user': 'USER',
            'password': 'PASSWORD'}
    for key, value in overrides.items():
        config[keys[key]] = value
    if 'port' in overrides and not str(overrides['port']).isdigit():
        raise ConfigError(f'--postgres-port {overrides["port"]!r} is not a '
                          'port number')
    with temporary_alias(config, prefix='anthias_pg') as alias:
        yield alias
