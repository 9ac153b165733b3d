"""Build or migrate forward a SQLite file's schema where the file is the
only database any code can reach.

`migrate` run in-process on a temporary alias still has `default` (and
`sqlite`, `postgres`) at hand: a third-party data migration writing
through the default manager wrote into the production PostgreSQL while
the rollback built its new file. So the migrate runs in a child process,
`python -m anthias_rollback.schema_build <path>` (same settings module,
this process's sys.path, same cwd), which points EVERY alias at the file
before any connection is opened. Data migrations then write only into
the file; the copy that follows replaces their rows.

The child prints one JSON line on stdout: {"applied": [labels]} or
{"error": "<one line>"}; its traceback goes to stderr, which the parent
sends to the `anthias_rollback.schema` log, never to the user.
"""
import copy
import json
import os
import subprocess
import sys
import traceback
from io import StringIO
from pathlib import Path
from typing import Any

from anthias_rollback import logs
from anthias_rollback.exceptions import SchemaMismatchError

MODULE = 'anthias_rollback.schema_build'


def migrate_file(path: Path, *, timeout: float, wal: bool = False
                 ) -> list[str]:
    """Apply this code's pending migrations to the SQLite file at *path*
    (created 0600 when missing) in an isolated child; return the labels
    applied, in order. *wal*: open it in WAL mode (the standby); else the
    file keeps its own journal mode (a new rollback file: a plain
    rollback journal, one self-contained file).

    Raises SchemaMismatchError, one line naming the file and the child's
    last error, when the migrate fails or outlives *timeout* seconds;
    the file is then to be thrown away by the caller."""
    from django.conf import settings

    path = Path(path).absolute()
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
    env = dict(os.environ)
    env['DJANGO_SETTINGS_MODULE'] = (env.get('DJANGO_SETTINGS_MODULE')
                                     or settings.SETTINGS_MODULE)
    # The parent's import path (a test's or a host's sys.path edits).
    env['PYTHONPATH'] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, '-m', MODULE, str(path)]
    if wal:
        command.append('--wal')
    log = logs.get_logger('schema')
    try:
        done = subprocess.run(command, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SchemaMismatchError(
            f'cannot migrate {path}: still running after {timeout:g}s; '
            'stopped') from None
    result = _result(done.stdout)
    if done.returncode == 0 and 'applied' in result:
        return list(result['applied'])
    if done.stderr.strip():
        log.warning('migrate of %s failed (exit %s):\n%s', path,
                    done.returncode, done.stderr.rstrip())
    error = result.get('error') or _last_line(done.stderr) or (
        f'the child exited with {done.returncode}')
    raise SchemaMismatchError(f'cannot migrate {path}: {error}')


def _result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith('{'):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ''


# --- the child ----------------------------------------------------------

def _isolate(path: str, wal: bool) -> None:
    """Point every configured alias at the file at *path*, before
    django.setup() and before any connection exists."""
    from django.conf import settings

    from anthias_rollback import profiles

    config = profiles.sqlite_settings(Path(path))
    if not wal:
        config['OPTIONS'] = {
            'timeout': profiles.SQLITE_OPTIONS['timeout']}
    config['TIME_ZONE'] = None
    aliases = list(settings.DATABASES) or []
    if profiles.DEFAULT not in aliases:
        aliases.append(profiles.DEFAULT)
    settings.DATABASES = {alias: copy.deepcopy(config) for alias in aliases}


def _check_isolated(path: str) -> None:
    """Every alias Django knows is the file: refuse before migrating if
    anything (an app's ready()) made another connection meanwhile."""
    from django.db import connections

    for alias in connections:
        name = connections.settings[alias]['NAME']
        if connections.settings[alias]['ENGINE'] != (
                'django.db.backends.sqlite3') or name != path:
            raise RuntimeError(f'alias {alias} is not {path}')
    for wrapper in connections.all(initialized_only=True):
        if wrapper.settings_dict['NAME'] != path:
            raise RuntimeError(f'alias {wrapper.alias} was opened before '
                               'the isolation')


def _migrate() -> list[str]:
    from django.core.management import call_command
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    from anthias_rollback.profiles import DEFAULT

    executor = MigrationExecutor(connections[DEFAULT])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    applied = [f'{m.app_label}.{m.name}' for m, _ in plan]
    call_command('migrate', database=DEFAULT, interactive=False,
                 verbosity=0, skip_checks=True, stdout=StringIO(),
                 stderr=StringIO())
    connections.close_all()
    return applied


def main(argv: list[str]) -> int:
    path, wal = argv[0], '--wal' in argv[1:]
    try:
        _isolate(path, wal)
        import django

        django.setup()
        _check_isolated(path)
        applied = _migrate()
    except BaseException as err:  # noqa: BLE001  (reported, one line)
        traceback.print_exc()
        from anthias_rollback.report import first_line, redact

        text = redact(first_line(err) or type(err).__name__)
        print(json.dumps({'error': text}), flush=True)
        return 1
    print(json.dumps({'applied': applied}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
