"""After a profile flip: make the processes that hold the database reopen
it (uvicorn in anthias-server, celery, the viewer), and keep a release
from landing halfway on balena.

ANTHIAS_ROLLBACK_RESTART_ADAPTER chooses how (`Adapter`):
- command  ANTHIAS_ROLLBACK_RESTART_COMMAND, if set (bare metal, systemd);
- balena   the supervisor's restart-service, one call per service of
           ANTHIAS_ROLLBACK_RESTART_SERVICES, this process's own last;
- compose  nothing from here (the container has no docker socket): the
           host entry point deploy/compose/anthias-rollback restarts them;
- none     nothing.
Whatever the adapter, the live SQLite file's mtime is set to now: the
viewer reloads when the newest mtime of anthias.db, -wal and -shm grows
(Anthias's src/anthias_viewer/scheduling.py, get_db_mtime), and a file
swapped in can be older than what it saw last.

balena, in order: `update_lock()` holds the supervisor's lockfile from
before the first change; the adapter releases it just before its calls
(the supervisor answers 423 to restart-service while any service of the
app holds one: withLock in its src/lib/update-lock.ts; `force` would
delete every holder's lock, so it is never sent), then restarts the
other services; the service this process runs in goes last, when the
outermost `last_restart()` block ends: after the verdict, the report and
the JSON document. The supervisor removes and recreates that container,
which ends this process: its exit status is lost, its output is not.
"""
import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from anthias_rollback import conf, logs, profiles
from anthias_rollback.exceptions import ConfigError, LockHeldError
from anthias_rollback.report import register_secret

log = logs.get_logger('restart')


class Adapter(StrEnum):
    COMMAND = 'command'
    BALENA = 'balena'
    COMPOSE = 'compose'
    NONE = 'none'


ADAPTER_SETTING = 'ANTHIAS_ROLLBACK_RESTART_ADAPTER'
# Set by balena in every service labelled io.balena.features.supervisor-api
# (Anthias's compose files label all three).
BALENA_ENVIRONMENT = ('BALENA_SUPERVISOR_ADDRESS',
                      'BALENA_SUPERVISOR_API_KEY', 'BALENA_APP_ID')
COMPOSE_ENTRY_POINT = 'deploy/compose/anthias-rollback'
# balena supervisor v13.1.0+ creates its lockfiles as nobody.
SUPERVISOR_UID = 65534
# First word of the lockfile we write: how a dead run's lock is known.
LOCK_MARK = 'anthias_rollback'
FIRST_PAUSE = 0.5
MAX_PAUSE = 5.0


def check_adapter(value: Any, where: str) -> Adapter:
    """conf's validator of ANTHIAS_ROLLBACK_RESTART_ADAPTER: one of
    Adapter; balena also needs the supervisor's environment."""
    try:
        adapter = Adapter(value)
    except ValueError:
        raise ConfigError(
            f'{where}={value!r} is not a restart adapter; use one of: '
            + ', '.join(a.value for a in Adapter)) from None
    missing = [name for name in BALENA_ENVIRONMENT
               if adapter is Adapter.BALENA and not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f'{where}=balena needs {", ".join(missing)} in the environment '
            '(balena sets them in services labelled '
            'io.balena.features.supervisor-api)')
    return adapter


@dataclass(frozen=True)
class RestartResult:
    """What ran after a flip: the command line or the adapter's calls,
    and the command's exit code (None: no process ran, or timed out)."""
    command: str
    ok: bool
    returncode: int | None
    seconds: float
    output: str
    adapter: str = Adapter.COMMAND

    def describe(self) -> str:
        """One phrase for the command's line and the report's phase."""
        if self.adapter == Adapter.COMMAND:
            return f'restart command: exit {self.returncode}'
        verdict = 'ok' if self.ok else 'FAILED'
        return f'{self.adapter} restart: {verdict} ({self.output})'

    def failure_line(self) -> str:
        what = ('restart command' if self.adapter == Adapter.COMMAND
                else f'{self.adapter} restart')
        return f'{what} failed: {self.output}'


def run_restart_command(command: str, timeout: float) -> RestartResult:
    """Run the configured restart command; never raises for its failure."""
    started = time.monotonic()
    try:
        done = subprocess.run(shlex.split(command), capture_output=True,
                              text=True, timeout=timeout, check=False)
        output = (done.stdout + done.stderr).strip()[-2000:]
        return RestartResult(command, done.returncode == 0,
                             done.returncode,
                             time.monotonic() - started, output)
    except subprocess.TimeoutExpired:
        return RestartResult(command, False, None,
                             time.monotonic() - started,
                             f'timed out after {timeout:g}s')
    except OSError as err:
        return RestartResult(command, False, None,
                             time.monotonic() - started, str(err))


def poke_viewer(live_path: Path) -> str:
    """Set *live_path*'s mtime to now (never creates it); one line saying
    what happened. Never raises."""
    try:
        os.utime(live_path)
    except OSError as err:
        return f'viewer not poked: {live_path}: {err.strerror or err}'
    return f'viewer poked: mtime of {live_path} set to now'


def restart_after_flip(live_path: Path | None = None,
                       restart: bool = True) -> RestartResult | None:
    """Poke the viewer through *live_path* (default: the sqlite alias's
    file), then, if *restart*, run the configured adapter.

    Reads settings and the environment; on balena calls the supervisor
    and releases the update lock this process holds. Never raises for
    the restart's own failure (ok False says it). None when nothing was
    restarted: *restart* False, adapter none, or no command configured.
    """
    path = Path(live_path) if live_path else profiles.sqlite_alias_path()
    poked = poke_viewer(path)
    log.info(poked)
    if not restart:
        return None
    adapter = conf.get_setting(ADAPTER_SETTING)
    timeout = float(conf.get_setting('ANTHIAS_ROLLBACK_RESTART_TIMEOUT'))
    if adapter is Adapter.BALENA:
        return restart_balena(timeout, poked)
    if adapter is Adapter.COMPOSE:
        # The container has no docker socket: saying "ok, restarted"
        # here would be a lie; the entry point restarts after we exit.
        return RestartResult(
            f'{COMPOSE_ENTRY_POINT} (on the host)', True, None, 0.0,
            f'nothing restarted from inside the container: '
            f'{COMPOSE_ENTRY_POINT} restarts the services on the host '
            f'once this command exits 0 or 4 (run without it, restart '
            f'them with docker compose); {poked}', Adapter.COMPOSE)
    if adapter is Adapter.NONE:
        return None
    command = conf.get_setting('ANTHIAS_ROLLBACK_RESTART_COMMAND')
    if not command:
        return None
    return run_restart_command(command, timeout)


# ------------------------------------------------------------- balena

@dataclass(frozen=True)
class Supervisor:
    """The balena supervisor's API as this service sees it."""
    address: str
    api_key: str = field(repr=False)
    app_id: str = ''

    @classmethod
    def from_environment(cls) -> 'Supervisor':
        found = {name: os.environ.get(name, '') for name in
                 BALENA_ENVIRONMENT}
        missing = [name for name, value in found.items() if not value]
        if missing:
            raise ConfigError(f'{", ".join(missing)} not set: is this a '
                              'balena service with the supervisor-api '
                              'label?')
        # Every later output of this process, logs included, hides it.
        key = found['BALENA_SUPERVISOR_API_KEY']
        register_secret(key)
        register_secret(urllib.parse.quote(key, safe=''))
        return cls(*found.values())

    def url(self, action: str) -> str:
        app = urllib.parse.quote(self.app_id, safe='')
        key = urllib.parse.quote(self.api_key, safe='')
        return (f'{self.address.rstrip("/")}/v2/applications/{app}/'
                f'{action}?apikey={key}')

    def hide(self, text: str) -> str:
        for secret in (self.api_key,
                       urllib.parse.quote(self.api_key, safe='')):
            text = text.replace(secret, '***')
        return text


class Answer(NamedTuple):
    status: int | None    # None: no HTTP answer at all
    message: str
    timed_out: bool = False


# No proxy, ever: Anthias passes HTTP_PROXY to its services (GH #3239),
# and the supervisor's URL carries the API key.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _message(body: bytes) -> str:
    text = body.decode('utf-8', 'replace').strip()
    with contextlib.suppress(ValueError, AttributeError):
        text = str(json.loads(text).get('message') or text)
    return ' '.join(text.split())[:200]


def post(supervisor: Supervisor, action: str, data: dict[str, Any],
         timeout: float) -> Answer:
    """One POST of JSON *data* to /v2/applications/<app>/<action>."""
    request = urllib.request.Request(
        supervisor.url(action), data=json.dumps(data).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Answer(response.status, _message(response.read()))
    except urllib.error.HTTPError as err:
        return Answer(err.code, _message(err.read()))
    except urllib.error.URLError as err:
        reason = err.reason
        return Answer(None, supervisor.hide(str(reason)),
                      isinstance(reason, TimeoutError))
    except TimeoutError:
        return Answer(None, 'no answer', True)
    except OSError as err:
        return Answer(None, supervisor.hide(str(err)))


def restart_service(supervisor: Supervisor, service: str,
                    deadline: float) -> tuple[bool, str]:
    """restart-service for *service*, until HTTP 200 or the monotonic
    *deadline*. 423 (an update lock is held), 503 (the supervisor is busy
    or failing) and no answer are retried with backoff; any other answer
    and a timeout (the restart may be under way) are final. Returns (ok,
    one line); the API key is never in it."""
    started, tries, pause = time.monotonic(), 0, FIRST_PAUSE
    while True:
        tries += 1
        answer = post(supervisor, 'restart-service',
                      {'serviceName': service},
                      max(deadline - time.monotonic(), 0.1))
        log.info('balena restart-service %s: %s %s', service,
                 answer.status or 'no answer', answer.message)
        if answer.status == 200:
            return True, f'{service} restarted' + (
                f' ({tries} tries)' if tries > 1 else '')
        if answer.timed_out:
            return False, (f'{service}: no answer from the supervisor in '
                           f'time (the restart may still be under way)')
        if answer.status not in (423, 503, None):
            return False, (f'{service} not restarted: HTTP {answer.status}'
                           f' {answer.message}').rstrip()
        if time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE)
    spent = f'{tries} tries in {time.monotonic() - started:.1f}s'
    if answer.status == 423:
        why = 'the balena update lock is held'
    elif answer.status == 503:
        why = 'the supervisor is busy or failing (HTTP 503)'
    else:
        why = 'the supervisor is not answering'
    return False, (f'{service} not restarted: {why} ({spent}: '
                   f'{answer.message or "no message"})')


def own_service(services: list[str]) -> str | None:
    """The listed service this process runs in: BALENA_SERVICE_NAME, or
    the last listed when balena did not say; None if not listed."""
    name = os.environ.get('BALENA_SERVICE_NAME')
    if name:
        return name if name in services else None
    return services[-1] if services else None


def restart_balena(timeout: float, poked: str) -> RestartResult:
    """The other services now, in ANTHIAS_ROLLBACK_RESTART_SERVICES's
    order; this process's own when the outermost last_restart() block
    ends (at once, last, outside one)."""
    started = time.monotonic()
    supervisor = Supervisor.from_environment()
    services = conf.get_list_setting('ANTHIAS_ROLLBACK_RESTART_SERVICES')
    own = own_service(services)
    order = [s for s in services if s != own] + ([own] if own else [])
    notes = []
    if release_update_lock():
        notes.append('update lock released for the restarts')
    failed: list[str] = []
    done: list[str] = []
    deadline = started + timeout
    for service in order[:-1] if own else order:
        ok, line = restart_service(supervisor, service, deadline)
        (done if ok else failed).append(line)
    if own:
        session = _LAST.get()
        if session is None:
            ok, line = restart_service(supervisor, own,
                                       time.monotonic() + timeout)
            (done if ok else failed).append(line)
        else:
            session.pending.append(lambda: restart_service(
                supervisor, own, time.monotonic() + timeout))
            notes.append(f'{own}: restart requested last, after the '
                         'report (it recreates this container, which '
                         'ends this process)')
    return RestartResult(
        'balena supervisor restart-service: ' + ', '.join(order),
        not failed, None, time.monotonic() - started,
        supervisor.hide('; '.join(failed + done + notes + [poked])),
        Adapter.BALENA)


@dataclass
class LastRestart:
    """The restarts kept for the end of the outermost last_restart()
    block; `error` is the first one's failure line, if any."""
    pending: list[Callable[[], tuple[bool, str]]] = field(
        default_factory=list)
    error: str | None = None


_LAST: ContextVar[LastRestart | None] = ContextVar(
    'anthias_rollback_last_restart', default=None)


@contextlib.contextmanager
def last_restart(on_failure: Callable[[str], None] | None = None
                 ) -> Iterator[LastRestart]:
    """Restart this process's own service (balena) when the block ends,
    after everything in it; commands wrap their whole handle() in it.

    Nested blocks share the outermost. A restart that fails leaves its
    line in `.error` (the caller turns it into exit 4); when the block is
    already failing, the line goes to *on_failure* and the block's own
    error stands.
    """
    outer = _LAST.get()
    if outer is not None:
        yield outer
        return
    session = LastRestart()
    token = _LAST.set(session)
    failing = True
    try:
        yield session
        failing = False
    finally:
        _LAST.reset(token)
        for call in session.pending:
            ok, line = call()
            if not ok and session.error is None:
                session.error = line
                if failing and on_failure is not None:
                    on_failure(line)


# -------------------------------------------------- balena's update lock

class UpdateLock:
    """balena's lockfile, held by this process until release()."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    def release(self) -> None:
        """Remove the lockfile if it is still ours (the supervisor deletes
        the locks it overrides, and a new file is someone else's), then
        drop the flock. Idempotent."""
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.stat(self.path), os.fstat(self.fd)):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None


_HELD: ContextVar[UpdateLock | None] = ContextVar(
    'anthias_rollback_update_lock', default=None)


def take_update_lock(path: Path) -> UpdateLock:
    """Create balena's lockfile exclusively (O_CREAT|O_EXCL: the file's
    existence is what the supervisor checks before it kills a service)
    and flock it (what the host OS update scripts check). A lockfile a
    dead anthias_rollback run left (ours by its first word, its flock
    gone with its process) is taken over; any other is refused.

    Raises LockHeldError naming the holder, or ConfigError when the
    lock's folder does not exist (not a balena service).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f'ANTHIAS_ROLLBACK_UPDATE_LOCK: {path.parent} '
                          'does not exist (balena mounts /tmp/balena into '
                          'every service)')
    fd = _create(path)
    if fd is None and _clear_dead_lock(path):
        fd = _create(path)
    if fd is None:
        raise LockHeldError(_holder_line(path))
    # flock before the content: a reader that finds our mark always
    # finds the flock too, so it never takes a live lock for a dead one.
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f'{LOCK_MARK} pid={os.getpid()}\n'.encode())
    return UpdateLock(path, fd)


def _create(path: Path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                       | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return None


def _read_head(fd: int) -> str:
    return os.read(fd, 200).decode('utf-8', 'replace').strip()


def _clear_dead_lock(path: Path) -> bool:
    """Remove *path* if a dead anthias_rollback left it; True when the
    path is free to try again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        if not _read_head(fd).startswith(LOCK_MARK):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if os.path.samestat(os.stat(path), os.fstat(fd)):
            os.unlink(path)
        log.warning('removed the balena update lock %s a dead '
                    'anthias_rollback run left', path)
        return True
    except FileNotFoundError:
        return True
    finally:
        os.close(fd)


def _holder_line(path: Path) -> str:
    try:
        st = os.stat(path)
        with open(path, 'rb') as handle:
            head = handle.read(200).decode('utf-8', 'replace').strip()
    except OSError:
        st, head = None, ''
    if head.startswith(LOCK_MARK):
        holder = f'another anthias_rollback run ({head})'
    elif st is not None and st.st_uid == SUPERVISOR_UID:
        holder = ('the balena supervisor (it is applying a release or '
                  'restarting a service)')
    else:
        holder = 'another process of this service'
    return (f'the balena update lock {path} is held by {holder}; retry '
            'when it is released (nothing was changed)')


@contextlib.contextmanager
def update_lock() -> Iterator[Path | None]:
    """Hold balena's update lock for the block, so no release lands
    halfway through a switch or rollback (adapter balena; otherwise, or
    nested, nothing is taken and None is yielded). Released at the end,
    also on error, or earlier by the balena adapter before its restarts.

    A bad adapter setting takes no lock: the operation's own settings
    check reports it, in one line. Raises LockHeldError or ConfigError
    (see take_update_lock) before the block runs.
    """
    try:
        adapter = conf.get_setting(ADAPTER_SETTING)
    except ConfigError:
        adapter = None
    if adapter is not Adapter.BALENA or _HELD.get() is not None:
        yield None
        return
    held = take_update_lock(conf.get_setting('ANTHIAS_ROLLBACK_UPDATE_LOCK'))
    token = _HELD.set(held)
    try:
        yield held.path
    finally:
        _HELD.reset(token)
        held.release()


def release_update_lock() -> bool:
    """Release the update lock this block holds; True if one was held."""
    held = _HELD.get()
    if held is None or held.fd is None:
        return False
    held.release()
    return True
