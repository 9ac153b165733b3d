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
6. chmod the safety copy 0600 (only now is its inode no longer live);
7. remove the intent.

A crash anywhere leaves the old database (steps 1-4) or the new one
(after 5). `recover_interrupted_swap` makes a rerun start clean.
"""
import json
import os
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from anthias_rollback import faults, fsutil
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import SwapError

SIDE_FILES = sqlite_file.SIDE_SUFFIXES


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
    # A garbage intent, renamed aside: what became of that swap is
    # unknown, but the live file is complete either way.
    moved_aside: Path | None = None

    @property
    def warning(self) -> str | None:
        """One line for the operator, or None if nothing was found."""
        if not self.found:
            return None
        if self.moved_aside is not None:
            return (f'an unreadable swap intent was moved aside to '
                    f'{self.moved_aside}; the live file is whichever '
                    'complete database the interrupted swap left')
        return ('an interrupted swap was found and cleared ('
                + ('it had completed' if self.swapped else
                   'the live file is the old database') + ')')


def intent_path(live_path: Path) -> Path:
    return Path(str(live_path) + '.swap-intent.json')


def side_file(path: Path, suffix: str) -> Path:
    return Path(str(path) + suffix)


def safety_copy_path(live_path: Path, when: datetime | None = None) -> Path:
    """`<live>.pre-rollback-YYYYMMDD_HHMMSS` (suffixed, never reused)."""
    stamp = (when or datetime.now(UTC)).strftime('%Y%m%d_%H%M%S')
    candidate = Path(f'{live_path}.pre-rollback-{stamp}')
    n = 1
    while candidate.exists():
        n += 1
        candidate = Path(f'{live_path}.pre-rollback-{stamp}-{n}')
    return candidate


def _usable_intent(raw: bytes) -> dict | None:
    """The intent if it names the new file as a path string, else None."""
    try:
        intent = json.loads(raw.decode('utf-8'))
    except ValueError:   # includes UnicodeDecodeError: a binary file
        return None
    if not isinstance(intent, dict):
        return None
    new = intent.get('new')
    if not isinstance(new, str) or not new:
        return None
    safety = intent.get('safety_copy')
    if safety is not None and not isinstance(safety, str):
        return None
    return intent


def _move_aside(path: Path) -> Path:
    stamp = datetime.now(UTC).strftime('%Y%m%d_%H%M%S_%f')
    aside = Path(f'{path}.invalid-{stamp}')
    os.replace(path, aside)
    os.chmod(aside, 0o600)
    return aside


def recover_interrupted_swap(live_path: Path) -> RecoveryResult:
    """Finish the bookkeeping of a swap that a crash interrupted.

    If the new file is still there, the swap never happened: the live file
    is the old database and the leftover new file is removed. If it is
    gone, the rename happened: the live file is the new database. Either
    way the intent is cleared so the caller can start again. The caller
    holds the operation lock. Raises SwapError (naming the intent and
    what to do) when the intent exists but cannot be read.
    """
    path = intent_path(live_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return RecoveryResult(False, False, ())
    except OSError as err:
        raise SwapError(
            f'cannot read swap intent {path}: {err.strerror}; the live '
            f'file {live_path} is complete either way: fix the intent\'s '
            'permissions, or move it aside, and rerun') from None
    intent = _usable_intent(raw)
    if intent is None:
        # Provably safe to set aside: the live path always holds a
        # complete database (the swap renames atomically), the intent
        # only names leftovers to clean, and the caller's lock rules out
        # a swap in progress. Deleting it by hand was the only way out.
        aside = _move_aside(path)
        fsutil.fsync_dir(Path(live_path).parent)
        return RecoveryResult(True, False, (), moved_aside=aside)
    removed = []
    new_path = Path(intent['new'])
    swapped = not new_path.exists()
    if not swapped:
        for candidate in (new_path, *(side_file(new_path, s)
                                      for s in SIDE_FILES)):
            if candidate.exists():
                candidate.unlink()
                removed.append(candidate)
    safety = intent.get('safety_copy')
    if safety:
        _settle_safety_copy(Path(safety), Path(live_path), removed)
    path.unlink()
    fsutil.fsync_dir(Path(live_path).parent)
    return RecoveryResult(True, swapped, tuple(removed))


def _settle_safety_copy(safety: Path, live_path: Path,
                        removed: list[Path]) -> None:
    """A crash before the rename leaves the safety name as a second link
    to the live inode (not a copy: it changes with the live file), so it
    goes; after the rename it is the old database: make it 0600."""
    try:
        if live_path.exists() and os.path.samefile(safety, live_path):
            safety.unlink()
            removed.append(safety)
        else:
            os.chmod(safety, 0o600)
    except FileNotFoundError:
        pass


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
        'started_at': datetime.now(UTC).isoformat()})
    faults.checkpoint('swap:intent-written')
    if safety is not None:
        # The new file takes the live file's mode, so the host processes
        # can open it as before (SQLite created it with the umask's).
        os.chmod(new_path, stat.S_IMODE(live_path.stat().st_mode))
        if side_file(live_path, '-wal').exists():
            sqlite_file.sqlite_checkpoint_truncate(live_path)
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
    if safety is not None:
        # The hard link kept the live file's mode (0644); only now that
        # its inode is no longer live can it become 0600 without changing
        # the live file. A crash before this: recovery does it.
        os.chmod(safety, 0o600)
    intent_path(live_path).unlink()
    fsutil.fsync_dir(directory)
    return SwapResult(live_path, safety, time.monotonic() - started)
