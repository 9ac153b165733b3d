"""What lets a rollback take the standby file itself instead of a copy.

- **The standby lock** (`standby/standby.lock`, flock): held by whoever
  has standby.db open for more than a glance, the replicator for each
  round and each integrity check, a rollback while it promotes the file.
  A promoted file is renamed to become the live database: a connection
  still open on it would keep its WAL index under the old name beside a
  live database, two indexes for one WAL.
- **The integrity record** (`standby/integrity.json`): the replicator
  runs `PRAGMA quick_check` on the standby in one read transaction with
  the position it reads there, and records both. A rollback whose
  standby is byte for byte what was checked (same inode, size and
  mtime, no WAL frames since, same window and entries applied; a round
  that applies nothing leaves the file alone: standby.record_idle_round)
  takes the recorded result instead of reading the whole file again,
  the step that made the incremental rollback O(rows). A file changed
  by anything else (an editor, a restore) no longer matches: the
  rollback then checks it itself.
"""
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anthias_rollback import fsutil
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import ReplicationError
from anthias_rollback.report import first_line
from anthias_rollback.window.standby import (
    INTEGRITY_NAME,
    Position,
    position_of,
    private_dir,
    standby_dir,
    standby_path,
)

STANDBY_LOCK_NAME = 'standby.lock'
# How often a waiter retries the flock (a round holds it for ms; an
# integrity check for about a second per 500 MB).
POLL = 0.02


@contextmanager
def standby_lock(data_dir: Path, timeout: float) -> Iterator[None]:
    """Hold the standby lock of *data_dir*, waiting up to *timeout*
    seconds for it. Raises ReplicationError naming the holder when it
    stays taken."""
    folder = private_dir(standby_dir(data_dir))
    path = folder / STANDBY_LOCK_NAME
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(
                        errors='replace').strip()
                    raise ReplicationError(
                        f'the standby {standby_path(data_dir)} is in use '
                        f'(pid {holder or "unknown"})') from None
                time.sleep(POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the flock


# --- the integrity record ---------------------------------------------------

@dataclass(frozen=True)
class Integrity:
    """quick_check's first line for the standby as of *position*."""
    result: str
    position: Position | None
    inode: tuple[int, int]
    checked_at: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.result == 'ok'


def integrity_path(data_dir: Path) -> Path:
    return standby_dir(data_dir) / INTEGRITY_NAME


def check_standby(data_dir: Path) -> Integrity:
    """quick_check of the standby, reading its position in the same read
    transaction, recorded in integrity.json (0600, atomic). The caller
    holds the standby lock. A file too broken to read is the check's
    answer, recorded like any other. Raises OSError when it cannot be
    recorded, ReplicationError when there is no standby."""
    path = standby_path(data_dir)
    if not path.exists():
        raise ReplicationError(f'no standby at {path}')
    started = time.monotonic()
    position: Position | None = None
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        try:
            conn.execute('BEGIN')
            position = position_of(conn)
            result = sqlite_file.quick_check_line(conn)
        except sqlite3.DatabaseError as err:
            result = first_line(err)
    finally:
        conn.close()
    state = sqlite_file.file_state(path)
    found = Integrity(result, position, (state[0], state[1]),
                      datetime.now(UTC).isoformat(),
                      round(time.monotonic() - started, 3))
    fsutil.atomic_write_json(integrity_path(data_dir), {
        'result': found.result, 'file': state,
        'window': position.window if position else None,
        'snapshot': position.snapshot if position else None,
        'entries': position.entries if position else None,
        'checked_at': found.checked_at, 'seconds': found.seconds,
    }, mode=0o600)
    return found


def recorded_check(data_dir: Path, position: Position
                   ) -> dict[str, Any] | None:
    """The recorded integrity check when it was made of the standby as
    it is now at *position* (same bytes by inode, size, mtime and an
    empty WAL; same window and entries applied), else None. Never
    raises."""
    try:
        data = fsutil.read_json(integrity_path(data_dir), 'integrity',
                                OSError, invalid=lambda _: None)
        state = sqlite_file.file_state(standby_path(data_dir))
    except OSError:
        return None
    if not isinstance(data, dict):
        return None
    same = (data.get('file') == state
            and data.get('window') == position.window
            and data.get('entries') == position.entries)
    return data if same else None


def needs_check(data_dir: Path, position: Position | None) -> bool:
    """True when no recorded check covers the standby at *position*."""
    return position is not None and recorded_check(data_dir,
                                                   position) is None
