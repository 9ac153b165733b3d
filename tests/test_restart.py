"""restart.py and deploy/compose/anthias-rollback: the adapters that run
after a profile flip, balena's update lock, and the viewer's poke.

No mocks: the balena adapter talks HTTP to a local stand-in of the
supervisor's v2 API (its docs/API.md and src/device-api/v2.ts: apikey in
the query, JSON {"serviceName": ...}, 200 "OK", 423 while a lockfile of
the app exists, 503 when busy); the update lock is a real lockfile taken
and probed by real processes; the compose entry point runs as bash with
a recording `docker` first on PATH.
"""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from anthias_rollback import conf, profiles, restart, switch
from anthias_rollback.exceptions import ConfigError, LockHeldError
from tests.conftest import ROOT, run_manage
from tests.helpers.rollback import seed_device, write_on_postgres

ENTRY = ROOT / 'deploy' / 'compose' / 'anthias-rollback'
# Characters a URL must quote: the key is hidden in both spellings.
API_KEY = 'k3y/s3cr3t+AB=CD&x'
APP_ID = '1234'
SERVICES = ['anthias-celery', 'anthias-viewer', 'anthias-server']
ALL = ['default', 'sqlite', 'postgres']


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# --------------------------------------------------- the supervisor stand-in

@dataclasses.dataclass
class Call:
    service: str
    status: int
    seen: object = None     # what `watch` returned at the call


class FakeSupervisor:
    """POST /v2/applications/<app>/restart-service?apikey=<key>.

    `script[service]` lists statuses answered before a 200; `lock_path`,
    while it exists, is answered 423 as the supervisor's withLock does
    for any lockfile of the app; `watch()` runs at each call."""

    def __init__(self, lock_path: Path | None = None) -> None:
        self.calls: list[Call] = []
        self.script: dict[str, list[int]] = {}
        self.lock_path = lock_path
        self.watch = None
        self.bad_requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                fake.answer(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f'http://127.0.0.1:{self.server.server_address[1]}'

    def environ(self, key: str = API_KEY) -> dict[str, str]:
        return {'BALENA_SUPERVISOR_ADDRESS': self.address,
                'BALENA_SUPERVISOR_API_KEY': key,
                'BALENA_APP_ID': APP_ID,
                'BALENA_SERVICE_NAME': 'anthias-server'}

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(handler.path)
        body = handler.rfile.read(int(handler.headers['Content-Length']))
        if urllib.parse.parse_qs(url.query).get('apikey') != [API_KEY]:
            return self.send(handler, 401, 'Unauthorized')
        if url.path != f'/v2/applications/{APP_ID}/restart-service' or \
                handler.headers['Content-Type'] != 'application/json':
            self.bad_requests.append(handler.path)
            return self.send(handler, 400, 'bad request')
        service = json.loads(body)['serviceName']
        pending = self.script.get(service) or []
        if self.lock_path is not None and self.lock_path.exists():
            status, message = 423, (f'Lockfile exists for {{ appId: '
                                    f'{APP_ID}, service: anthias-server }}')
        elif pending:
            status = pending.pop(0)
            message = {401: 'Unauthorized', 423: 'Updates are locked',
                       503: 'busy'}[status]
        else:
            status, message = 200, 'OK'
        self.calls.append(Call(service, status,
                               self.watch() if self.watch else None))
        if status == 200:
            return self.send(handler, 200, 'OK')
        return self.send(handler, status, json.dumps(
            {'status': 'failed', 'message': message}))

    def send(self, handler, status: int, text: str) -> None:
        data = text.encode()
        handler.send_response(status)
        handler.send_header('Content-Length', str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def services(self, status: int | None = None) -> list[str]:
        return [c.service for c in self.calls
                if status is None or c.status == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def supervisor(monkeypatch, settings, tmp_path):
    """The stand-in, this process's environment pointing at it, adapter
    balena, the update lock in a test folder, a short timeout."""
    lock_dir = tmp_path / 'balena'
    lock_dir.mkdir()
    fake = FakeSupervisor(lock_dir / 'updates.lock')
    for name, value in fake.environ().items():
        monkeypatch.setenv(name, value)
    settings.ANTHIAS_ROLLBACK_RESTART_ADAPTER = 'balena'
    settings.ANTHIAS_ROLLBACK_UPDATE_LOCK = str(fake.lock_path)
    settings.ANTHIAS_ROLLBACK_RESTART_TIMEOUT = 10
    yield fake
    fake.close()


@pytest.fixture
def live(tmp_path) -> Path:
    path = tmp_path / 'anthias.db'
    path.write_bytes(b'')
    return path


def assert_no_key(*texts) -> None:
    for text in texts:
        if dataclasses.is_dataclass(text):
            text = json.dumps(dataclasses.asdict(text), default=str)
        assert API_KEY not in text
        assert urllib.parse.quote(API_KEY, safe='') not in text


# ------------------------------------------------------------- balena

def test_balena_restarts_the_others_then_its_own_service_last(supervisor,
                                                              live):
    with restart.last_restart() as last:
        result = restart.restart_after_flip(live)
        # Its own container (anthias-server) is not restarted yet: the
        # caller still has a report and a verdict to write.
        assert supervisor.services() == SERVICES[:2]
    assert supervisor.services() == SERVICES
    assert last.error is None and not supervisor.bad_requests
    assert (result.ok, result.adapter, result.returncode) == (
        True, 'balena', None)
    assert result.command == ('balena supervisor restart-service: '
                              'anthias-celery, anthias-viewer, '
                              'anthias-server')
    assert 'anthias-server: restart requested last, after the report' in \
        result.output
    assert f'viewer poked: mtime of {live}' in result.output
    assert_no_key(result)


def test_balena_outside_last_restart_restarts_its_own_at_once(supervisor,
                                                              live):
    result = restart.restart_after_flip(live)
    assert supervisor.services() == SERVICES
    assert result.ok and 'anthias-server restarted' in result.output


def test_balena_own_service_is_balena_service_name(supervisor, live,
                                                   monkeypatch):
    monkeypatch.setenv('BALENA_SERVICE_NAME', 'anthias-viewer')
    with restart.last_restart():
        restart.restart_after_flip(live)
        assert supervisor.services() == ['anthias-celery',
                                         'anthias-server']
    assert supervisor.services()[-1] == 'anthias-viewer'


@pytest.mark.parametrize('status', [423, 503])
def test_balena_retries_423_and_503_then_succeeds(supervisor, live,
                                                  status):
    supervisor.script = {'anthias-celery': [status, status]}
    result = restart.restart_after_flip(live)
    assert supervisor.services() == ['anthias-celery'] * 3 + SERVICES[1:]
    assert [c.status for c in supervisor.calls][:3] == [status, status,
                                                        200]
    assert result.ok
    assert 'anthias-celery restarted (3 tries)' in result.output


def test_balena_lock_held_forever_fails_in_one_line(supervisor, live,
                                                    settings):
    # Another process of the service holds the update lock: the
    # supervisor answers 423 to every call, until our timeout.
    supervisor.lock_path.write_text('')
    settings.ANTHIAS_ROLLBACK_RESTART_TIMEOUT = 2
    started = time.monotonic()
    with restart.last_restart() as last:
        result = restart.restart_after_flip(live)
    assert time.monotonic() - started < 2 * 2 + 3
    assert not result.ok
    line = result.failure_line()
    assert line.startswith('balena restart failed: anthias-celery not '
                           'restarted: the balena update lock is held (')
    assert 'anthias-viewer not restarted: the balena update lock is ' \
           'held' in line
    assert '\n' not in line
    # Retried with backoff, not hammered.
    assert 3 <= supervisor.services().count('anthias-celery') <= 6
    assert last.error.startswith('anthias-server not restarted: the '
                                 'balena update lock is held')
    assert set(supervisor.services(423)) == set(SERVICES)
    assert_no_key(result, line, last.error)


def test_balena_wrong_key_is_final_and_the_key_is_never_shown(
        supervisor, live, monkeypatch):
    wrong = API_KEY + 'wrong'
    monkeypatch.setenv('BALENA_SUPERVISOR_API_KEY', wrong)
    result = restart.restart_after_flip(live)
    assert not result.ok
    assert 'anthias-celery not restarted: HTTP 401 Unauthorized' in \
        result.output
    assert supervisor.calls == []
    assert wrong not in json.dumps(dataclasses.asdict(result), default=str)


def test_balena_supervisor_not_answering(supervisor, live, monkeypatch,
                                         settings):
    monkeypatch.setenv('BALENA_SUPERVISOR_ADDRESS',
                       f'http://127.0.0.1:{closed_port()}')
    settings.ANTHIAS_ROLLBACK_RESTART_TIMEOUT = 1
    result = restart.restart_after_flip(live)
    assert not result.ok
    assert 'anthias-celery not restarted: the supervisor is not ' \
           'answering' in result.output
    assert_no_key(result)


def test_balena_never_goes_through_a_proxy(supervisor, live, monkeypatch):
    # Anthias passes HTTP_PROXY to its services; the URL holds the key.
    dead = f'http://127.0.0.1:{closed_port()}'
    for name in ('HTTP_PROXY', 'http_proxy', 'ALL_PROXY'):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv('NO_PROXY', raising=False)
    monkeypatch.delenv('no_proxy', raising=False)
    assert restart.restart_after_flip(live).ok
    assert supervisor.services() == SERVICES


def test_balena_releases_its_update_lock_before_restarting(supervisor,
                                                           live):
    # Held by this process, the lock would make the supervisor refuse
    # every restart-service (423) until the timeout.
    with restart.update_lock() as path:
        assert path == supervisor.lock_path and path.exists()
        result = restart.restart_after_flip(live)
        assert not path.exists()
    assert result.ok, result.output
    assert supervisor.services(423) == []
    assert 'update lock released for the restarts' in result.output


def test_balena_needs_the_supervisor_environment(settings, monkeypatch):
    settings.ANTHIAS_ROLLBACK_RESTART_ADAPTER = 'balena'
    monkeypatch.setenv('BALENA_SUPERVISOR_ADDRESS', 'http://x')
    monkeypatch.delenv('BALENA_SUPERVISOR_API_KEY', raising=False)
    monkeypatch.delenv('BALENA_APP_ID', raising=False)
    with pytest.raises(ConfigError) as excinfo:
        conf.validate_settings()
    assert str(excinfo.value) == (
        'setting ANTHIAS_ROLLBACK_RESTART_ADAPTER=balena needs '
        'BALENA_SUPERVISOR_API_KEY, BALENA_APP_ID in the environment '
        '(balena sets them in services labelled '
        'io.balena.features.supervisor-api)')


@pytest.mark.parametrize('value', ['systemd', 'Balena', '', 3])
def test_bad_adapter_is_one_config_error_line(settings, value):
    settings.ANTHIAS_ROLLBACK_RESTART_ADAPTER = value
    with pytest.raises(ConfigError) as excinfo:
        conf.validate_settings()
    message = str(excinfo.value)
    assert message.startswith('setting ANTHIAS_ROLLBACK_RESTART_ADAPTER=')
    assert 'use one of: command, balena, compose, none' in message
    assert '\n' not in message


# ------------------------------------------------ the other adapters

def test_adapter_none_only_pokes(settings, live):
    settings.ANTHIAS_ROLLBACK_RESTART_ADAPTER = 'none'
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = 'false'
    os.utime(live, (1_000_000, 1_000_000))
    assert restart.restart_after_flip(live) is None
    assert live.stat().st_mtime > time.time() - 60


def test_adapter_compose_restarts_nothing_and_says_who_does(settings, live):
    settings.ANTHIAS_ROLLBACK_RESTART_ADAPTER = 'compose'
    os.utime(live, (1_000_000, 1_000_000))
    result = restart.restart_after_flip(live)
    assert (result.ok, result.returncode, result.adapter) == (
        True, None, 'compose')
    assert result.output.startswith(
        'nothing restarted from inside the container: '
        'deploy/compose/anthias-rollback restarts the services on the '
        'host once this command exits 0 or 4')
    assert live.stat().st_mtime > time.time() - 60


def test_adapter_command_is_the_default(settings, live, tmp_path):
    marker = tmp_path / 'restarted'
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = f'touch {marker}'
    result = restart.restart_after_flip(live)
    assert result.ok and marker.exists()
    assert result.describe() == 'restart command: exit 0'


def test_no_restart_still_pokes_a_missing_file_is_left_alone(settings,
                                                             tmp_path):
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = 'false'
    gone = tmp_path / 'gone.db'
    assert restart.restart_after_flip(gone, restart=False) is None
    assert not gone.exists()
    assert restart.poke_viewer(gone).startswith(
        f'viewer not poked: {gone}: No such file')


# ---------------------------------------------------- the update lock

PROBE = '''
import fcntl, os, sys
path = sys.argv[1]
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
except FileExistsError:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print('exists, flock free')
    except BlockingIOError:
        print('exists, flock held')
else:
    os.unlink(path)
    print('free')
'''


def probe(path: Path) -> str:
    """What another process sees: the supervisor checks the file exists,
    the host OS scripts try its flock."""
    return subprocess.run([sys.executable, '-c', PROBE, str(path)],
                          capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def hold_lock_in_child(path: Path, then: str) -> subprocess.Popen:
    """A second anthias_rollback process that takes the lock, prints
    'held', then waits for a line (then='wait') or dies (then='die')."""
    code = ('import os, sys\n'
            'from anthias_rollback import restart\n'
            'restart.take_update_lock(sys.argv[1])\n'
            'print("held", flush=True)\n'
            + ('sys.stdin.readline()\n' if then == 'wait' else
               'os._exit(0)\n'))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, '-c', code, str(path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout.readline().strip() == 'held'
    return child


def test_update_lock_held_during_released_after(supervisor):
    lock = supervisor.lock_path
    with restart.update_lock() as path:
        assert path == lock
        assert probe(lock) == 'exists, flock held'
        assert lock.read_text().startswith(f'anthias_rollback pid='
                                           f'{os.getpid()}')
        assert lock.stat().st_mode & 0o777 == 0o600
    assert not lock.exists()
    assert probe(lock) == 'free'


def test_update_lock_released_on_error(supervisor):
    with pytest.raises(RuntimeError), restart.update_lock():
        assert supervisor.lock_path.exists()
        raise RuntimeError('boom')
    assert probe(supervisor.lock_path) == 'free'


def test_update_lock_of_another_process_is_refused_untouched(supervisor):
    lock = supervisor.lock_path
    lock.write_text('')
    with pytest.raises(LockHeldError) as excinfo, restart.update_lock():
        pytest.fail('the block ran without the lock')
    assert str(excinfo.value) == (
        f'the balena update lock {lock} is held by another process of '
        'this service; retry when it is released (nothing was changed)')
    assert lock.exists()
    if os.geteuid() == 0:
        os.chown(lock, restart.SUPERVISOR_UID, restart.SUPERVISOR_UID)
        with pytest.raises(LockHeldError, match='held by the balena '
                           'supervisor'), restart.update_lock():
            pass


def test_update_lock_of_a_live_run_is_refused(supervisor):
    child = hold_lock_in_child(supervisor.lock_path, 'wait')
    try:
        with pytest.raises(LockHeldError, match=r'held by another '
                           r'anthias_rollback run \(anthias_rollback pid='
                           f'{child.pid}'), restart.update_lock():
            pass
    finally:
        child.communicate('\n', timeout=30)


def test_update_lock_a_dead_run_left_is_taken_over(supervisor):
    # Killed with the lock held: the file stays (the supervisor would
    # wait for it until a reboot), its flock went with the process.
    child = hold_lock_in_child(supervisor.lock_path, 'die')
    child.wait(timeout=30)
    assert probe(supervisor.lock_path) == 'exists, flock free'
    with restart.update_lock():
        assert probe(supervisor.lock_path) == 'exists, flock held'
    assert not supervisor.lock_path.exists()


def test_update_lock_only_on_balena(settings, tmp_path):
    settings.ANTHIAS_ROLLBACK_UPDATE_LOCK = str(tmp_path / 'updates.lock')
    for adapter in ('command', 'compose', 'none', 'nonsense'):
        settings.ANTHIAS_ROLLBACK_RESTART_ADAPTER = adapter
        with restart.update_lock() as path:
            assert path is None
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------- the compose entry point

FAKE_DOCKER = '''#!{python}
"""A recording docker: one JSON argv per line in $FAKE_DOCKER_LOG."""
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_DOCKER_LOG'], 'a') as log:
    log.write(json.dumps(args) + '\\n')
if 'exec' in args:
    if 'switch_database' in args and '--show' in args:
        print(os.environ.get('FAKE_DOCKER_PROFILE_LINE', ''))
        sys.exit(0)
    if 'manage.py' in args and os.environ.get('FAKE_DOCKER_RUN'):
        # The command itself, for real, in the test project.
        tail = args[args.index('manage.py') + 1:]
        sys.exit(subprocess.run([sys.executable, 'manage.py', *tail],
                                cwd=os.environ['FAKE_DOCKER_RUN']
                                ).returncode)
    sys.exit(int(os.environ.get('FAKE_DOCKER_EXIT', '0')))
if 'restart' in args:
    failing = os.environ.get('FAKE_DOCKER_FAIL_RESTART', '').split()
    sys.exit(1 if args[-1] in failing else 0)
sys.exit(0)
'''


@pytest.fixture
def compose(tmp_path):
    """An Anthias checkout (docker-compose.yml) and a recording docker."""
    home = tmp_path / 'anthias'
    home.mkdir()
    (home / 'docker-compose.yml').write_text('services: {}\n')
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    docker = bin_dir / 'docker'
    docker.write_text(FAKE_DOCKER.replace('{python}', sys.executable))
    docker.chmod(0o755)
    log = tmp_path / 'docker.log'
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('ANTHIAS_', 'FAKE_DOCKER'))}
    env.update(PATH=f'{bin_dir}{os.pathsep}{env["PATH"]}',
               ANTHIAS_HOME=str(home), FAKE_DOCKER_LOG=str(log))

    class Compose:
        def __init__(self):
            self.home, self.env, self.log = home, env, log

        def run(self, *args, **extra) -> subprocess.CompletedProcess:
            if log.exists():
                log.unlink()
            return subprocess.run([str(ENTRY), *args],
                                  env=dict(env, **extra),
                                  stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True,
                                  timeout=600, check=False)

        def calls(self) -> list[list[str]]:
            if not log.exists():
                return []
            return [json.loads(line) for line in
                    log.read_text().splitlines()]

        def prefix(self, ssl: bool = False) -> list[str]:
            files = ['-f', f'{home}/docker-compose.yml']
            if ssl:
                files += ['-f', f'{home}/docker-compose.ssl.override.yml']
            return ['compose', '-p', 'anthias', *files]

        def restarts(self, ssl: bool = False) -> list[list[str]]:
            return [[*self.prefix(ssl), 'restart', s] for s in SERVICES]

    return Compose()


MANAGE = ['python', '-m', 'anthias_server.manage']


@pytest.mark.parametrize('code', [0, 4])
def test_compose_runs_the_command_then_restarts_in_order(compose, code):
    done = compose.run('rollback_migration', '--emergency',
                       FAKE_DOCKER_EXIT=str(code))
    assert done.returncode == code, done.stderr
    assert compose.calls() == [
        [*compose.prefix(), 'exec', '-T', 'anthias-server', *MANAGE,
         'rollback_migration', '--emergency'],
        *compose.restarts()]
    assert done.stderr.splitlines() == [
        f'anthias-rollback: restarting {s}' for s in SERVICES]


def test_compose_manage_py_spelling(compose):
    # The line of the issue, for images that keep manage.py in the
    # working directory (Anthias's runs `python -m anthias_server.manage`).
    done = compose.run('rollback_migration', '--emergency',
                       ANTHIAS_MANAGE='python manage.py')
    assert done.returncode == 0, done.stderr
    assert compose.calls()[0] == [
        'compose', '-p', 'anthias', '-f',
        f'{compose.home}/docker-compose.yml', 'exec', '-T',
        'anthias-server', 'python', 'manage.py', 'rollback_migration',
        '--emergency']


@pytest.mark.parametrize('code', [1, 2, 3])
def test_compose_no_restart_when_nothing_was_flipped(compose, code):
    done = compose.run('rollback_migration', '--emergency',
                       FAKE_DOCKER_EXIT=str(code))
    assert done.returncode == code
    assert compose.calls() == [
        [*compose.prefix(), 'exec', '-T', 'anthias-server', *MANAGE,
         'rollback_migration', '--emergency']]


@pytest.mark.parametrize('args', [
    ('rollback_migration', '--dry-run'),
    ('rollback_migration', '--generate-report'),
    ('switch_database', '--show'),
    ('switch_database', '--to', 'sqlite', '--help'),
    ('validate_migration',),
    ('backup_database',),
])
def test_compose_no_restart_for_commands_that_flip_nothing(compose, args):
    done = compose.run(*args)
    assert done.returncode == 0
    assert len(compose.calls()) == 1


def test_compose_switch_restarts(compose):
    done = compose.run('switch_database', '--to', 'postgres')
    assert done.returncode == 0
    assert compose.calls()[1:] == compose.restarts()


def test_compose_uses_the_ssl_override_as_upgrade_containers_does(compose):
    (compose.home / 'docker-compose.ssl.override.yml').write_text('{}\n')
    done = compose.run('switch_database', '--to', 'sqlite')
    assert done.returncode == 0
    assert compose.calls()[0][:7] == compose.prefix(ssl=True)
    assert compose.calls()[1:] == compose.restarts(ssl=True)


def test_compose_restart_failure_after_success_is_exit_4(compose):
    done = compose.run('rollback_migration', '--emergency',
                       FAKE_DOCKER_FAIL_RESTART='anthias-viewer')
    assert done.returncode == 4
    # The others are still restarted, in order.
    assert compose.calls()[1:] == compose.restarts()
    assert done.stderr.splitlines()[-1] == (
        'anthias-rollback: restart failed: anthias-viewer (the profile '
        'flip stays; restart them with docker compose)')


@pytest.mark.parametrize('line,restarted', [
    ('active profile: sqlite (from state file: /data/.anthias/x)', True),
    ('active profile: postgres (from state file: /data/.anthias/x)',
     False),
])
def test_compose_monitor_restarts_only_after_its_rollback(compose, line,
                                                          restarted):
    done = compose.run('monitor_migration', '--auto-rollback',
                       FAKE_DOCKER_PROFILE_LINE=line)
    assert done.returncode == 0
    calls = compose.calls()
    assert calls[1] == [*compose.prefix(), 'exec', '-T', 'anthias-server',
                        *MANAGE, 'switch_database', '--show']
    assert calls[2:] == (compose.restarts() if restarted else [])
    # Without --auto-rollback the monitor never flips anything.
    compose.run('monitor_migration', FAKE_DOCKER_PROFILE_LINE=line)
    assert len(compose.calls()) == 1


def test_compose_refuses_without_a_checkout(compose, tmp_path):
    done = compose.run('rollback_migration', '--emergency',
                       ANTHIAS_HOME=str(tmp_path / 'nowhere'))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f'anthias-rollback: no {tmp_path}/nowhere/docker-compose.yml: set '
        'ANTHIAS_HOME to the Anthias checkout')
    assert compose.calls() == []
    assert compose.run().returncode == 2


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_compose_real_switch_then_host_restarts(compose, same_data,
                                                host_env, data_dir):
    """The command runs for real (the fake docker's exec runs manage.py
    in the test project); the in-container adapter restarts nothing and
    says so, the viewer is poked, the host restarts the three."""
    live = Path(connections['sqlite'].settings_dict['NAME'])
    os.utime(live, (1_000_000, 1_000_000))
    env = dict(host_env, **{k: v for k, v in compose.env.items()
                            if k in ('PATH', 'ANTHIAS_HOME',
                                     'FAKE_DOCKER_LOG')})
    env.update(ANTHIAS_ROLLBACK_RESTART_ADAPTER='compose',
               ANTHIAS_MANAGE='python manage.py', FAKE_DOCKER_RUN=str(ROOT))
    done = subprocess.run([str(ENTRY), 'switch_database', '--to',
                           'postgres'], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert 'compose restart: ok (nothing restarted from inside the ' \
           'container' in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith(
        'active profile: postgres')
    assert compose.calls()[1:] == compose.restarts()
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    assert live.stat().st_mtime > time.time() - 600


# ------------------------------------- the flip paths and the commands

@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_every_flip_pokes_the_viewer_adapter_none(same_data, data_dir,
                                                  settings):
    settings.ANTHIAS_ROLLBACK_RESTART_ADAPTER = 'none'
    live = Path(connections['sqlite'].settings_dict['NAME'])
    os.utime(live, (1_000_000, 1_000_000))
    result = switch.switch_profile('postgres')
    assert result.restart is None
    assert live.stat().st_mtime > time.time() - 600
    # --no-restart restarts nothing, but the viewer still sees the flip.
    os.utime(live, (1_000_000, 1_000_000))
    switch.switch_profile('sqlite', restart=False)
    assert live.stat().st_mtime > time.time() - 600


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_bad_adapter_refused_by_switch_database(data_dir, host_env):
    host_env['ANTHIAS_ROLLBACK_RESTART_ADAPTER'] = 'systemd'
    done = run_manage(host_env, 'switch_database', '--to', 'sqlite',
                      '--force')
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [("CommandError: environment variable ANTHIAS_ROLLBACK_"
                      "RESTART_ADAPTER='systemd' is not a restart adapter; "
                      "use one of: command, balena, compose, none")]
    assert not profiles.state_file_path(data_dir).exists()


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_switch_database_balena_own_restart_after_the_json(
        same_data, data_dir, supervisor, tmp_path):
    report = tmp_path / 'switch.json'
    supervisor.watch = report.exists
    out, err = _call('switch_database', '--to', 'postgres', '--report',
                     str(report))
    assert supervisor.services() == SERVICES
    # Written before anthias-server's restart, not before the others'.
    assert [c.seen for c in supervisor.calls] == [False, False, True]
    assert 'balena restart: ok (anthias-celery restarted; ' in out
    document = json.loads(report.read_text())
    assert document['restart']['adapter'] == 'balena'
    assert_no_key(out, err, report.read_text())


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_switch_database_balena_own_restart_failure_is_exit_4(
        same_data, data_dir, supervisor):
    supervisor.script = {'anthias-server': [401]}
    with pytest.raises(CommandError) as excinfo:
        _call('switch_database', '--to', 'postgres')
    assert excinfo.value.returncode == 4
    assert str(excinfo.value) == ('anthias-server not restarted: HTTP 401 '
                                  'Unauthorized')
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'


def _call(*args) -> tuple[str, str]:
    from io import StringIO

    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_rollback_on_balena_end_to_end(data_dir, settings, host_env,
                                       supervisor, tmp_path):
    """A real rollback_migration process: the update lock is held while
    it works (paused at rollback:locked), released for the restarts;
    celery and the viewer restart during the run, anthias-server after
    the rollback report and the JSON document."""
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    lock = supervisor.lock_path
    paused = tmp_path / 'paused'
    env = dict(host_env, **supervisor.environ(),
               ANTHIAS_ROLLBACK_RESTART_ADAPTER='balena',
               ANTHIAS_ROLLBACK_UPDATE_LOCK=str(lock),
               ANTHIAS_ROLLBACK_PAUSE_AT='rollback:locked:3',
               ANTHIAS_ROLLBACK_PAUSED_FLAG=str(paused))
    reports = data_dir / 'reports'
    supervisor.watch = lambda: (lock.exists(),
                                len(list(reports.glob('rollback_*.json'))))
    child = subprocess.Popen(
        [sys.executable, str(ROOT / 'manage.py'), 'rollback_migration',
         '--emergency', '--json'], env=env, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not paused.exists() and child.poll() is None and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert paused.exists(), child.communicate()
    assert probe(lock) == 'exists, flock held'
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err
    document = json.loads(out)
    assert document['outcome'] == 'rolled back'
    assert supervisor.services() == SERVICES
    # The lock released for the restarts; the report written before the
    # last call only.
    assert [c.seen for c in supervisor.calls] == [
        (False, 0), (False, 0), (False, 1)]
    assert not lock.exists()
    profile = next(p for p in document['phases']
                   if p['name'] == 'profile')
    assert 'balena restart: ok' in profile['detail']
    assert device.live.stat().st_mtime > time.time() - 600
    assert_no_key(out, err, *(p.read_text() for p in reports.iterdir()),
                  (data_dir / 'rollback.log').read_text())


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_rollback_killed_holding_the_lock_is_rerun(data_dir, settings,
                                                   host_env, supervisor):
    seed_device(settings)
    connections['sqlite'].close()
    env = dict(host_env, **supervisor.environ(),
               ANTHIAS_ROLLBACK_RESTART_ADAPTER='balena',
               ANTHIAS_ROLLBACK_UPDATE_LOCK=str(supervisor.lock_path))
    done = run_manage(dict(env, ANTHIAS_ROLLBACK_KILL_AT='rollback:locked'),
                      'rollback_migration', '--emergency')
    assert done.returncode == -9
    assert supervisor.lock_path.read_text().startswith('anthias_rollback')
    done = run_manage(env, 'rollback_migration', '--emergency')
    assert done.returncode == 0, done.stderr
    assert not supervisor.lock_path.exists()
    assert supervisor.services() == SERVICES


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_rollback_refused_while_the_supervisor_holds_the_lock(
        data_dir, settings, host_env, supervisor):
    seed_device(settings)
    connections['sqlite'].close()
    supervisor.lock_path.write_text('')
    env = dict(host_env, **supervisor.environ(),
               ANTHIAS_ROLLBACK_RESTART_ADAPTER='balena',
               ANTHIAS_ROLLBACK_UPDATE_LOCK=str(supervisor.lock_path))
    done = run_manage(env, 'rollback_migration', '--emergency')
    assert done.returncode == 1
    assert re.search(r'CommandError: the balena update lock .* is held by '
                     r'another process', done.stderr)
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    assert supervisor.calls == []


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_monitor_auto_rollback_on_balena(data_dir, settings, supervisor):
    """The monitor's rollback is the same path: celery and the viewer
    during it, anthias-server after the monitor's own last line."""
    from io import StringIO

    from tests import monitor_views

    settings.ANTHIAS_ROLLBACK_VERIFY_URLS = ['/monitor-test/flaky']
    monitor_views.reset()
    device = seed_device(settings)
    write_on_postgres(device)
    out, err = StringIO(), StringIO()
    supervisor.watch = lambda: out.getvalue().strip().splitlines()[-1]
    monitor_views.queue(monitor_views.FAIL, monitor_views.FAIL)
    try:
        call_command('monitor_migration', '--interval', '0.005',
                     '--window', '4', '--consecutive', '2',
                     '--max-probes', '10', '--auto-rollback', stdout=out,
                     stderr=err)
    finally:
        monitor_views.reset()
    assert supervisor.services() == SERVICES
    # celery: during the rollback (its swap was the last line out)
    assert supervisor.calls[0].seen.startswith('swap ')
    assert supervisor.calls[-1].seen.startswith(
        'rolled back after the trigger')
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'
    assert not supervisor.lock_path.exists()
