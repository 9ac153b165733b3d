"""Crash-safe replacement of the live SQLite file (WAL/SHM aware).

The promise: at every instant the live path holds either the complete old
database or the complete new one, and a stale `-wal` is never applied to
the new file. SQLite's WAL header does not identify the database it
belongs to, so a `-wal` left beside a renamed-in file would be replayed
into it (https://www.sqlite.org/walformat.html). Hence the order:

1. fsync the new file, record the intent (a small JSON file beside the
   live one);
2. checkpoint the old database with TRUNCATE, so its main file alone is
   complete; refuse if another process keeps the WAL busy;
3. hard-link the old main file to the safety-copy name (no data copied);
4. remove the old, now empty, `-wal`/`-shm`;
5. rename(new, live): atomic on POSIX; fsync the directory;
6. remove the intent.

A crash anywhere leaves the old database (steps 1-4) or the new one
(after 5). `recover_interrupted_swap` makes a rerun start clean.
"""
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from anthias_rollback import faults, fsutil
from anthias_rollback.exceptions import SwapError

SIDE_FILES = ('-wal', '-shm', '-journal')


@dataclass(frozen=True)
class SwapResult:
    live_path: Path
    safety_copy: Path | None
    seconds: float


@dataclass(frozen=True)
class RecoveryResult:
    found: bool
    swapped: bool  # True: the interrupted swap had already completed
    removed: tuple[Path, ...]


def intent_path(live_path: Path) -> Path:
    return Path(str(live_path) + '.swap-intent.json')


def side_file(path: Path, suffix: str) -> Path:
    return Path(str(path) + suffix)


def safety_copy_path(live_path: Path, when: datetime | None = None) -> Path:
    """`<live>.pre-rollback-YYYYMMDD_HHMMSS` (suffixed, never reused)."""
    stamp = (when or datetime.now(timezone.utc)).strftime('%Y%m%d_%H%M%S')
    candidate = Path(f'{live_path}.pre-rollback-{stamp}')
    n = 1
    while candidate.exists():
        n += 1
        candidate = Path(f'{live_path}.pre-rollback-{stamp}-{n}')
    return candidate


def sqlite_checkpoint_truncate(path: Path, attempts: int = 20,
                               wait: float = 0.25) -> None:
    """SQLite: move every WAL frame into the main file and empty the WAL.

    Retries while readers hold old snapshots; SwapError if the WAL stays
    busy, with the live file untouched.
    """
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        for _ in range(attempts):
            busy, _log, _done = conn.execute(
                'PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
            if not busy:
                return
            time.sleep(wait)
    finally:
        conn.close()
    raise SwapError(f'cannot checkpoint {path}: other processes keep its '
                    'WAL busy; stop the app processes and rerun')


def recover_interrupted_swap(live_path: Path) -> RecoveryResult:
    """Finish the bookkeeping of a swap that a crash interrupted.

    If the new file is still there, the swap never happened: the live file
    is the old database and the leftover new file is removed. If it is
    gone, the rename happened: the live file is the new database. Either
    way the intent is cleared so the caller can start again.
    """
    path = intent_path(live_path)
    try:
        intent = json.loads(path.read_text())
    except FileNotFoundError:
        return RecoveryResult(False, False, ())
    except (OSError, ValueError):
        intent = {}
    removed = []
    new_path = Path(intent['new']) if intent.get('new') else None
    swapped = new_path is not None and not new_path.exists()
    if new_path is not None and new_path.exists():
        for candidate in (new_path, *(side_file(new_path, s)
                                      for s in SIDE_FILES)):
            if candidate.exists():
                candidate.unlink()
                removed.append(candidate)
    path.unlink()
    fsutil.fsync_dir(Path(live_path).parent)
    return RecoveryResult(True, swapped, tuple(removed))


def swap_in(new_path: Path, live_path: Path) -> SwapResult:
    """Replace *live_path* with the complete SQLite file *new_path*.

    *new_path* must be closed, in the same directory, with no side files.
    The old database stays available under the returned safety-copy name.
    Raises SwapError with the live file untouched when it cannot proceed.
    """
    started = time.monotonic()
    new_path, live_path = Path(new_path), Path(live_path)
    if new_path.parent.resolve() != live_path.parent.resolve():
        raise SwapError(f'{new_path} must be in the same directory as '
                        f'{live_path} for an atomic rename')
    for suffix in SIDE_FILES:
        if side_file(new_path, suffix).exists():
            raise SwapError(f'{new_path} has a {suffix} file: it is still '
                            'open or was not closed cleanly')
    directory = live_path.parent
    # The new file may have been written with synchronous=OFF (bulk
    # load): its bytes must be on disk before its name becomes the live
    # one, or a power cut after the rename could leave a torn database.
    fsutil.fsync_file(new_path)
    safety = safety_copy_path(live_path) if live_path.exists() else None
    fsutil.atomic_write_json(intent_path(live_path), {
        'new': str(new_path), 'live': str(live_path),
        'safety_copy': str(safety) if safety else None,
        'started_at': datetime.now(timezone.utc).isoformat()})
    faults.checkpoint('swap:intent-written')
    if safety is not None:
        if side_file(live_path, '-wal').exists():
            sqlite_checkpoint_truncate(live_path)
        faults.checkpoint('swap:checkpointed')
        # A hard link: the old database is kept without copying a byte.
        os.link(live_path, safety)
        fsutil.fsync_dir(directory)
        faults.checkpoint('swap:safety-linked')
        for suffix in ('-wal', '-shm'):
            side_file(live_path, suffix).unlink(missing_ok=True)
        fsutil.fsync_dir(directory)
        faults.checkpoint('swap:side-files-removed')
    os.replace(new_path, live_path)
    fsutil.fsync_dir(directory)
    faults.checkpoint('swap:renamed')
    intent_path(live_path).unlink()
    fsutil.fsync_dir(directory)
    return SwapResult(live_path, safety, time.monotonic() - started)
