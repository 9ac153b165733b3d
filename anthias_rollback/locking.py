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
from datetime import datetime, timezone
from pathlib import Path

from anthias_rollback.exceptions import LockHeldError

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


@contextmanager
def operation_lock(data_dir: Path, operation: str) -> Iterator[Path]:
    """Hold the operation lock for the block; LockHeldError if taken."""
    path = lock_path(data_dir)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise LockHeldError(
                f'another operation holds the lock {path}: '
                f'{holder.get("operation", "unknown")} '
                f'(pid {holder.get("pid", "?")}, since '
                f'{holder.get("started_at", "?")}); wait for it or stop it'
            ) from None
        info = {'operation': operation, 'pid': os.getpid(),
                'host': socket.gethostname(),
                'started_at': datetime.now(timezone.utc).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
