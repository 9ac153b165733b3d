"""One operation at a time: an advisory file lock in the data dir.

flock(2) is released by the kernel when the holder dies (even SIGKILL), so
a crashed rollback never leaves a stale lock; the file's content only says
who holds it, for the refusal message.
"""
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from anthias_rollback.exceptions import ConfigError, LockHeldError

LOCK_FILE_NAME = 'anthias_rollback.lock'


def lock_path(data_dir: Path) -> Path:
    return Path(data_dir) / LOCK_FILE_NAME


def read_lock_holder(data_dir: Path) -> dict | None:
    """Who holds the lock now, or None if nobody does."""
    path = lock_path(data_dir)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or '{}')
    except (OSError, ValueError):
        return {}


def live_lock_path(live_path: Path) -> Path:
    """`.<name>.anthias-rollback.lock` beside the live file, found through
    its resolved path: every data dir that points at one live file (one
    ANTHIAS_SQLITE_PATH, or a symlink to it) meets on the same lock."""
    real = Path(os.path.realpath(live_path))
    return real.with_name(f'.{real.name}.anthias-rollback.lock')


@contextmanager
def _hold(fd: int, path: Path, operation: str, what: str) -> Iterator[Path]:
    """Hold an exclusive flock on the open lock file *fd* for the block,
    with the holder recorded in it; LockHeldError if taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        raise LockHeldError(
            f'another operation holds the {what} {path}: '
            f'{holder.get("operation", "unknown")} '
            f'(pid {holder.get("pid", "?")}, since '
            f'{holder.get("started_at", "?")}); wait for it or stop it'
        ) from None
    info = {'operation': operation, 'pid': os.getpid(),
            'host': socket.gethostname(),
            'started_at': datetime.now(UTC).isoformat()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def operation_lock(data_dir: Path, operation: str,
                   live_path: Path | None = None) -> Iterator[Path]:
    """Hold the operation lock for the block; LockHeldError if taken.

    With *live_path*, also lock the live SQLite file itself (beside it,
    see live_lock_path): two data dirs sharing one live file once let a
    second rollback delete the first's new file mid-swap. The data dir
    lock is taken first; ConfigError if the live lock cannot be created.
    """
    path = lock_path(data_dir)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with _hold(fd, path, operation, 'lock'):
            live_lock = (None if live_path is None
                         else live_lock_path(live_path))
            # No folder, no live file to race on: the caller refuses a
            # live path whose folder is missing, with its own message.
            if live_lock is None or not live_lock.parent.is_dir():
                yield path
                return
            try:
                live_fd = os.open(live_lock, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as err:
                raise ConfigError(f'live SQLite path {live_path} is not '
                                  f'writable: cannot create {live_lock}: '
                                  f'{err.strerror}') from None
            try:
                with _hold(live_fd, live_lock, operation,
                           f'lock of the live database {live_path} at'):
                    yield path
            finally:
                os.close(live_fd)
    finally:
        os.close(fd)
