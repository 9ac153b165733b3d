"""App settings, read at call time so override_settings reaches them.

Each name is looked up in Django settings first, then in the environment,
then falls back to its default. Settings with a validator are checked at
every read (ConfigError naming the setting); `validate_settings()` checks
them all at once, before an operation changes anything.
"""
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings

from anthias_rollback import profiles
from anthias_rollback.exceptions import ConfigError

DEFAULTS: dict[str, Any] = {
    'ANTHIAS_DATA_DIR': None,
    'ANTHIAS_BACKUP_DIR': None,
    'ANTHIAS_ROLLBACK_RESTART_COMMAND': '',
    'ANTHIAS_ROLLBACK_RESTART_TIMEOUT': 60,
    # How the processes holding the database restart after a flip
    # (restart.py): command | balena | compose | none.
    'ANTHIAS_ROLLBACK_RESTART_ADAPTER': 'command',
    # balena: the services restarted, in order; this process's own last.
    'ANTHIAS_ROLLBACK_RESTART_SERVICES': (
        'anthias-celery anthias-viewer anthias-server'),
    # balena: the lockfile the supervisor respects (supervisor >= 7.22).
    'ANTHIAS_ROLLBACK_UPDATE_LOCK': '/tmp/balena/updates.lock',
    'ANTHIAS_ROLLBACK_VERIFY_URLS': '',
    'ANTHIAS_ROLLBACK_EXCLUDE': '',
    'ANTHIAS_PG_DUMP': 'pg_dump',
    # monitor_migration triggers (the runbook's: 1000 ms, 5 % errors,
    # >300 % slower than baseline). The floor keeps a few ms of jitter
    # on a 2 ms in-process probe from counting as 300 % degraded.
    'ANTHIAS_ROLLBACK_MONITOR_MAX_RESPONSE_MS': 1000,
    'ANTHIAS_ROLLBACK_MONITOR_MAX_ERROR_RATE': 5,
    'ANTHIAS_ROLLBACK_MONITOR_MAX_DEGRADATION_PCT': 300,
    'ANTHIAS_ROLLBACK_MONITOR_MIN_SLOWDOWN_MS': 50,
    'ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG': 30,  # seconds, 0 = off
    # Models whose rows `migrate` itself creates: a target holding only
    # these counts as empty, and they are reloaded with the source's ids.
    'ANTHIAS_ROLLBACK_MIGRATE_CREATED': (
        'contenttypes.ContentType auth.Permission sites.Site'),
    # Seconds a backup waits for a lock on the source (Anthias's timeout).
    'ANTHIAS_BACKUP_TIMEOUT': 20,
    # Management commands (with their arguments) that rebuild the tables
    # left out as engine-specific (engine_tables.py) after a copy or a
    # rollback, e.g. ['wagtail_update_index'].
    'ANTHIAS_ROLLBACK_REBUILD_COMMANDS': (),
}


def _raw_setting(name: str) -> tuple[Any, str]:
    """(value, where it came from) for setting *name*."""
    if hasattr(settings, name):
        return getattr(settings, name), f'setting {name}'
    if name in os.environ:
        return os.environ[name], f'environment variable {name}'
    return DEFAULTS[name], f'default of {name}'


def _seconds(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f'{where}={value!r} is not a number of '
                          'seconds') from None
    if not number > 0 or number == float('inf'):
        raise ConfigError(f'{where}={value!r} must be a positive number '
                          'of seconds')
    return number


def _command(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f'{where} must be a string (a shell-style '
                          'command line), not a ' + type(value).__name__)
    try:
        shlex.split(value)
    except ValueError as err:
        raise ConfigError(f'{where} cannot be parsed: {err}') from None
    return value


def _words(value: Any, where: str) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, str) for v in value):
        return value
    raise ConfigError(f'{where} must be a list of strings or a comma/space '
                      'separated string')


def _command_list(value: Any, where: str) -> tuple[str, ...]:
    # From the environment: a JSON list, as in settings.py.
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            value = None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f'{where} must be a list of management commands '
                          "with their arguments, e.g. ['update_index']")
    for command in value:
        try:
            shlex.split(command)
        except ValueError as err:
            raise ConfigError(f'{where}: {command!r} cannot be parsed: '
                              f'{err}') from None
    return tuple(value)


def _urls(value: Any, where: str) -> Any:
    value = _words(value, where)
    for url in _split(value):
        if not url.startswith('/'):
            raise ConfigError(f'{where}: {url!r} is not a path of this app '
                              '(it must start with /)')
    return value


def _program(value: Any, where: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f'{where} must name the pg_dump program (a name '
                          'on PATH or a path)')
    return str(value)


def _restart_adapter(value: Any, where: str) -> Any:
    # Imported here: restart.py reads its own settings through conf.
    from anthias_rollback import restart

    return restart.check_adapter(value, where)


def _file(value: Any, where: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f'{where} must be a file path')
    return str(value)


def _directory(value: Any, where: str) -> Any:
    if value in (None, ''):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f'{where} must be a directory path')
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f'{where}={str(value)!r} is not a directory')
    return value


# Checked at every read and by validate_settings. A bad value once gave a
# traceback after the swap and profile flip (restart timeout 'abc').
VALIDATORS: dict[str, Callable[[Any, str], Any]] = {
    'ANTHIAS_DATA_DIR': _directory,
    'ANTHIAS_BACKUP_DIR': _directory,
    'ANTHIAS_ROLLBACK_RESTART_COMMAND': _command,
    'ANTHIAS_ROLLBACK_RESTART_TIMEOUT': _seconds,
    'ANTHIAS_ROLLBACK_RESTART_ADAPTER': _restart_adapter,
    'ANTHIAS_ROLLBACK_RESTART_SERVICES': _words,
    'ANTHIAS_ROLLBACK_UPDATE_LOCK': _file,
    'ANTHIAS_ROLLBACK_VERIFY_URLS': _urls,
    'ANTHIAS_ROLLBACK_EXCLUDE': _words,
    'ANTHIAS_PG_DUMP': _program,
    'ANTHIAS_BACKUP_TIMEOUT': _seconds,
    'ANTHIAS_ROLLBACK_REBUILD_COMMANDS': _command_list,
}


def get_setting(name: str) -> Any:
    """Return setting *name* from settings, the environment or DEFAULTS.

    Raises ConfigError naming the setting when its validator rejects it.
    """
    value, where = _raw_setting(name)
    validator = VALIDATORS.get(name)
    if validator is not None:
        value = validator(value, where)
    return value


def validate_settings() -> None:
    """Check every app setting; ConfigError naming the first bad one.

    Call before the first change an operation makes (a value read only
    after the swap must not fail there). Reads settings, the environment
    and the app registry (for ANTHIAS_ROLLBACK_EXCLUDE's names).
    """
    from anthias_rollback import models_graph

    for name in VALIDATORS:
        get_setting(name)
    models_graph.check_exclusions(get_list_setting(
        'ANTHIAS_ROLLBACK_EXCLUDE'), 'ANTHIAS_ROLLBACK_EXCLUDE')


def _split(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [v for v in value.replace(',', ' ').split() if v]
    return [str(v) for v in value]


def get_list_setting(name: str) -> list[str]:
    """A setting given as a list or as a comma/space separated string."""
    return _split(get_setting(name))


def data_dir() -> Path:
    """The data dir: ANTHIAS_DATA_DIR, else the sqlite alias's folder."""
    value = get_setting('ANTHIAS_DATA_DIR')
    if value:
        return Path(value).expanduser()
    return profiles.sqlite_alias_path().parent


def backup_dir() -> Path:
    """ANTHIAS_BACKUP_DIR, else <data dir>/backups."""
    value = get_setting('ANTHIAS_BACKUP_DIR')
    if value:
        return Path(value).expanduser()
    return data_dir() / 'backups'


def reports_dir() -> Path:
    return data_dir() / 'reports'


def current_profile() -> profiles.ActiveProfile:
    """The active profile of this process's configuration.

    Raises ConfigError (ANTHIAS_DB_PROFILE) or StateFileError (the state
    file) naming what is wrong; settings import fell back to sqlite then.
    """
    return profiles.resolve_active_profile(data_dir())
