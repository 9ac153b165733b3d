"""The standby's files: the cutover file, the standby SQLite file and the
position it holds, the replicator's record of its rounds (record_round,
replicator_health), and what a rollback or a report needs from them
(standby_state, usable_standby, copy_standby). The replicator that keeps
the standby current is window.replicator.

Reads PostgreSQL only for standby_state's pending count; never prints.
"""
import json
import os
import sqlite3
import time
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections

from anthias_rollback import (
    fsutil,
    profiles,
)
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import (
    ReplicationError,
    RollbackError,
)
from anthias_rollback.report import first_line, redact

STANDBY_DIR = 'standby'
CUTOVER_NAME = 'cutover.db'
# What the cutover file is (sha256, window). Named apart from the data
# dir's cutover.json (window.cutover), which it was called before too:
# a device upgraded mid-window has only the old name, read as a fallback.
CUTOVER_INFO_NAME = 'standby_cutover.json'
OLD_CUTOVER_INFO_NAME = 'cutover.json'
STANDBY_NAME = 'standby.db'
LOCK_NAME = 'replicate.lock'
# The replicator's record of its rounds (record_round): beside the
# standby, so a replicator that never built one still says why.
HEALTH_NAME = 'replicator.json'
# The replicator's integrity check of the standby (window.integrity).
INTEGRITY_NAME = 'integrity.json'
POSITION_TABLE = 'anthias_rb_standby'
# Keys per statement: far below SQLite's 999 variables; memory stays flat.
CHUNK = 500
# A position stamped further ahead of this clock than this is a finding.
CLOCK_TOLERANCE = 60.0
DEFAULT_INTERVAL = 0.5
MAX_BACKOFF = 10.0

_POSITION_DDL = (
    f'CREATE TABLE IF NOT EXISTS {POSITION_TABLE} ('
    'id INTEGER PRIMARY KEY CHECK (id = 1), '
    'window TEXT NOT NULL, snapshot TEXT NOT NULL, '
    'journal_id INTEGER NOT NULL, position_ts REAL NOT NULL, '
    'postgres_seen_ts REAL NOT NULL, batches INTEGER NOT NULL, '
    'entries INTEGER NOT NULL, started_from TEXT NOT NULL)')


@dataclass(frozen=True)
class Position:
    """What the standby holds: every write committed on PostgreSQL
    before *position_ts* (the tick), as of journal entry *journal_id*."""
    window: str          # the cutover's txid: one per rollback window
    snapshot: str        # the tick, pg_snapshot text
    journal_id: int
    position_ts: float   # UNIX time taken just before the tick
    postgres_seen_ts: float
    batches: int
    entries: int
    started_from: str    # 'cutover file' | 'full copy'

    @property
    def position_at(self) -> str:
        return _iso(self.position_ts)

    @property
    def behind_seconds(self) -> float:
        """How far behind PostgreSQL the standby was when PostgreSQL
        last answered the replicator."""
        return max(0.0, self.postgres_seen_ts - self.position_ts)


@dataclass(frozen=True)
class StandbyState:
    path: Path
    exists: bool
    position: Position | None
    position_at: str | None
    # The age of the oldest journal entry the standby lacks (PostgreSQL's
    # clock); without PostgreSQL, now - position time; None: not known.
    lag_seconds: float | None
    pending: int | None            # journal entries not applied yet
    problem: str | None = None


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


# --- paths -----------------------------------------------------------------

def standby_dir(data_dir: Path) -> Path:
    return Path(data_dir) / STANDBY_DIR


def standby_path(data_dir: Path) -> Path:
    return standby_dir(data_dir) / STANDBY_NAME


def cutover_path(data_dir: Path) -> Path:
    return standby_dir(data_dir) / CUTOVER_NAME


def private_dir(path: Path) -> Path:
    """*path* made (if missing) and set to 0700."""
    fsutil.ensure_private_dir(path)
    os.chmod(path, 0o700)
    return path


def discard_standby(data_dir: Path) -> Path:
    """A new window begins: remove the standby and cutover files of the
    previous one (their rows are older than this cutover). Returns the
    standby dir (0700)."""
    folder = private_dir(standby_dir(data_dir))
    for name in (STANDBY_NAME, CUTOVER_NAME):
        sqlite_file.remove_sqlite_file(folder / name)
    for name in (CUTOVER_INFO_NAME, OLD_CUTOVER_INFO_NAME, HEALTH_NAME,
                 INTEGRITY_NAME, IDLE_NAME):
        (folder / name).unlink(missing_ok=True)
    return folder


# --- the cutover file --------------------------------------------------------

def take_cutover_file(live_path: Path, folder: Path, *, window: str,
                      expected_rows: dict[str, int],
                      timeout: float = 20.0) -> dict[str, Any]:
    """Snapshot the live SQLite file into *folder*/cutover.db (0600; the
    dir 0700), checking its row counts per table against
    *expected_rows* (PostgreSQL's, taken under the cutover's lock).
    Returns {'path', 'sha256', 'window'} for the cutover row, or
    {'problem': why} when there is no usable file (never raises: the
    standby is an extra, the switch goes on without it)."""
    folder = private_dir(Path(folder))
    target = folder / CUTOVER_NAME
    tmp = folder / f'.{CUTOVER_NAME}.{os.getpid()}.tmp'
    sqlite_file.remove_sqlite_file(tmp)
    try:
        problem = sqlite_file.sqlite_file_problem(Path(live_path))
        if problem:
            return {'problem': problem}
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.close(fd)
        taken = sqlite_file.sqlite_snapshot(Path(live_path), tmp, timeout)
        conn = sqlite_file.sqlite_open_readonly(tmp, timeout)
        try:
            counts = sqlite_file.sqlite_table_counts(conn)
        finally:
            conn.close()
        wrong = {t: (counts.get(t), n) for t, n in expected_rows.items()
                 if counts.get(t) != n}
        if wrong:
            table, (got, want) = next(iter(wrong.items()))
            sqlite_file.remove_sqlite_file(tmp)
            return {'problem': f'SQLite changed after the check: {table} '
                               f'has {got} rows, PostgreSQL {want}'}
        fsutil.fsync_file(tmp)
        os.replace(tmp, target)
        fsutil.fsync_dir(folder)
        # quick_check once here, beside the sha256 (both read the file,
        # neither holds the GIL): a rollback that finds the same sha256
        # need not read the whole file again.
        with futures.ThreadPoolExecutor(1) as pool:
            checking = pool.submit(_quick_check_readonly, target, timeout)
            digest, size = sqlite_file.file_sha256(target)
            quick = checking.result()
        if quick != 'ok':
            sqlite_file.remove_sqlite_file(target)
            return {'problem': f'the snapshot of {live_path} fails '
                               f'quick_check: {quick}'}
        info = {'path': str(target), 'sha256': digest, 'size': size,
                'window': window, 'taken_at': taken.isoformat(),
                'quick_check': quick,
                # What a rollback compares instead of reading it again.
                'file': sqlite_file.file_state(target)}
        fsutil.atomic_write_json(folder / CUTOVER_INFO_NAME, info,
                                 mode=0o600)
        return info
    except (OSError, sqlite3.Error, RollbackError) as err:
        sqlite_file.remove_sqlite_file(tmp)
        return {'problem': f'cannot snapshot {live_path}: '
                           f'{first_line(err)}'}


def _quick_check_readonly(path: Path, timeout: float) -> str:
    conn = sqlite_file.sqlite_open_readonly(path, timeout)
    try:
        return sqlite_file.quick_check_line(conn)
    finally:
        conn.close()


def read_cutover_file_info(data_dir: Path) -> dict[str, Any] | None:
    """What take_cutover_file recorded (None: nothing readable). Read
    under the old name when the new one is missing (a standby made by
    an older version, mid-window)."""
    folder = standby_dir(data_dir)
    for name in (CUTOVER_INFO_NAME, OLD_CUTOVER_INFO_NAME):
        try:
            return json.loads((folder / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
    return None


# --- the position ------------------------------------------------------------

def position_of(conn: sqlite3.Connection) -> Position | None:
    """The position recorded in the open standby *conn*, or None."""
    try:
        row = conn.execute(
            f'SELECT window, snapshot, journal_id, position_ts, '
            f'postgres_seen_ts, batches, entries, started_from FROM '
            f'{POSITION_TABLE} WHERE id = 1').fetchone()
    except sqlite3.OperationalError as err:
        if 'no such table' in str(err):
            return None
        raise
    return Position(*row) if row else None


def read_position(path: Path, timeout: float = 5.0) -> Position | None:
    """The position of the standby at *path* (read-only): the one its
    file records, advanced by the idle rounds since (advanced), or None
    when it has none. Raises sqlite3.Error for an unreadable file."""
    if sqlite_file.sqlite_file_problem(Path(path)):
        return None
    conn = sqlite_file.sqlite_open_readonly(Path(path), timeout)
    try:
        position = position_of(conn)
    finally:
        conn.close()
    return advanced(position, path)


# A round that applies nothing does not write the standby (its rows, and
# so its bytes, stay as the integrity check saw them: window.integrity);
# the newer tick it proved empty is recorded beside it instead.
IDLE_NAME = 'idle_position.json'


def _inode(path: Path) -> list[int]:
    return sqlite_file.file_state(path)[:2]


def advanced(position: Position | None, path: Path) -> Position | None:
    """*position* (read from the standby at *path*, or from a copy of
    it) moved to the newest idle round's tick when that round followed
    it on the same file: same inode, window, journal entry and count of
    entries applied. A stale or unreadable record is ignored."""
    if position is None:
        return None
    try:
        data = fsutil.read_json(Path(path).parent / IDLE_NAME,
                                'idle position', OSError,
                                invalid=lambda _: None)
        inode = _inode(Path(path))
    except OSError:
        return position
    if not isinstance(data, dict) or data.get('inode') != inode:
        return position
    if (data.get('window'), data.get('journal_id'), data.get('entries')
            ) != (position.window, position.journal_id, position.entries):
        return position
    batches = data.get('batches')
    if not isinstance(batches, int) or batches <= position.batches:
        return position
    try:
        return Position(position.window, str(data['snapshot']),
                        position.journal_id, float(data['position_ts']),
                        float(data['postgres_seen_ts']), batches,
                        position.entries, position.started_from)
    except (KeyError, TypeError, ValueError):
        return position


def record_idle_round(path: Path, position: Position) -> None:
    """Record that the standby at *path* holds PostgreSQL's rows as of
    *position* too (a round found no entry since its file's position).
    0600, replaced atomically, not fsynced: written up to twice a second
    on an SD card, and a record lost or torn by a power cut is ignored
    (`advanced`), the standby's own older position then stands. Raises
    OSError."""
    fsutil.atomic_write_json(Path(path).parent / IDLE_NAME, {
        'inode': _inode(Path(path)), 'window': position.window,
        'snapshot': position.snapshot, 'journal_id': position.journal_id,
        'position_ts': position.position_ts,
        'postgres_seen_ts': position.postgres_seen_ts,
        'batches': position.batches, 'entries': position.entries,
    }, mode=0o600, durable=False)


def write_start_position(path: Path, window: str, snapshot: str,
                         position_ts: float, started_from: str) -> None:
    """Make the new standby file at *path* a WAL database holding its
    first position: *snapshot* of *window*, no batch applied yet."""
    conn = sqlite_file.sqlite_connect(Path(path))
    try:
        sqlite_file.sqlite_set_wal(conn)
        conn.execute(_POSITION_DDL)
        conn.execute(
            f'INSERT INTO {POSITION_TABLE} VALUES '
            '(1, ?, ?, 0, ?, ?, 0, 0, ?)',
            # PostgreSQL last seen at the position's own time: what the
            # first round replaces (never this process's clock).
            [window, snapshot, position_ts, position_ts, started_from])
    finally:
        conn.close()


def standby_state(data_dir: Path, postgres_alias: str | None = None
                  ) -> StandbyState:
    """How far behind the standby in *data_dir* is: its position time,
    the lag (now - position time) and, when *postgres_alias* answers,
    the journal entries committed since. Reads only."""
    path = standby_path(data_dir)
    if not path.exists():
        return StandbyState(path, False, None, None, None, None,
                            _missing_reason(data_dir))
    try:
        position = read_position(path)
    except sqlite3.Error as err:
        return StandbyState(path, True, None, None, None, None,
                            f'unreadable: {first_line(err)}')
    if position is None:
        return StandbyState(path, True, None, None, None, None,
                            'no position recorded')
    pending, problem, lag = None, None, None
    alias = postgres_alias or profiles.POSTGRES
    try:
        if pj.postgres_journal_installed(alias):
            # The lag is the age of the oldest write the standby lacks,
            # on PostgreSQL's clock: 0 when it lacks none, whatever any
            # clock says of the position's time.
            pending, lag = pj.postgres_pending(alias, position.snapshot)
    except (DatabaseError, RollbackError) as err:
        connections[alias].close()
        problem = f'PostgreSQL not answering: {first_line(err)}'
    if lag is None:
        ahead = position.position_ts - time.time()
        if ahead > CLOCK_TOLERANCE:
            problem = (f'its position is stamped {position.position_at}, '
                       f'{ahead / 3600:.1f}h in the future of this clock '
                       '(a clock moved): its lag is not known')
        else:
            lag = max(0.0, -ahead)
    return StandbyState(path, True, position, position.position_at,
                        None if lag is None else round(lag, 3),
                        pending, problem)


def usable_standby(data_dir: Path) -> tuple[Position | None, str]:
    """The standby a rollback may restore (PostgreSQL down): it exists,
    has a position, belongs to the current window (the cutover file's),
    and passes quick_check. (position, '') or (None, why not)."""
    path = standby_path(data_dir)
    if not path.exists():
        return None, 'no standby'
    try:
        position = read_position(path)
        if position is None:
            return None, f'standby {path} has no recorded position'
        cutover = read_cutover_file_info(data_dir)
        if cutover is not None and cutover.get('window') != position.window:
            return None, (f'standby {path} belongs to an older rollback '
                          'window')
        conn = sqlite_file.sqlite_open_readonly(path, 5.0)
        try:
            quick = sqlite_file.quick_check_line(conn)
        finally:
            conn.close()
    except sqlite3.Error as err:
        return None, f'standby {path} is unreadable: {first_line(err)}'
    if quick != 'ok':
        return None, f'standby {path} fails quick_check: {quick}'
    return position, ''


def copy_standby(data_dir: Path, target: Path,
                 timeout: float = 20.0) -> Position:
    """Snapshot the standby into the new file *target* and drop the
    position table from the copy. Returns the position read from the
    copy itself (so it describes exactly the rows copied). Raises
    ReplicationError. Writes only *target*."""
    source = standby_path(data_dir)
    try:
        sqlite_file.sqlite_snapshot(source, Path(target), timeout)
        conn = sqlite_file.sqlite_connect(Path(target))
        try:
            position = position_of(conn)
            conn.execute(f'DROP TABLE IF EXISTS {POSITION_TABLE}')
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise ReplicationError(f'cannot copy the standby {source}: '
                               f'{first_line(err)}') from None
    if position is None:
        raise ReplicationError(f'the standby {source} has no position')
    # The copy holds the source's rows as of its file position; idle
    # rounds recorded for that same position hold for the copy too.
    return advanced(position, source) or position


# --- the replicator's rounds ------------------------------------------------

@dataclass(frozen=True)
class ReplicatorHealth:
    """What replicate_changes recorded of its rounds in *path*.

    `failing`: its last round failed (consecutive_failures > 0), decided
    by the count, never by a clock; `postgres_down`: that failure was
    PostgreSQL not answering (the standby is then as current as it can
    be). The *_at times are for people to read."""
    path: Path
    recorded: bool                 # False: no round recorded here
    consecutive_failures: int = 0
    last_error: str | None = None  # first line, redacted
    postgres_down: bool = False
    first_failure_at: str | None = None
    last_success_at: str | None = None
    last_position_at: str | None = None
    last_journal_id: int | None = None
    pid: int | None = None
    problem: str | None = None     # the record itself is unreadable

    @property
    def failing(self) -> bool:
        return self.consecutive_failures > 0

    def describe(self) -> str:
        """One line for --show, readiness, /health and the monitor."""
        if self.problem:
            return self.problem
        if not self.recorded:
            return 'no round recorded (replicate_changes not run)'
        if self.failing:
            return (f'replicate_changes is failing: {self.last_error} '
                    f'({self.consecutive_failures} rounds in a row since '
                    f'{self.first_failure_at}, pid {self.pid}); see its log')
        if self.last_success_at is None:
            return f'no successful round yet (pid {self.pid})'
        return (f'last round ok at {self.last_success_at} (position '
                f'{self.last_position_at}, pid {self.pid})')


def health_path(data_dir: Path) -> Path:
    return standby_dir(data_dir) / HEALTH_NAME


def record_round(data_dir: Path, error: str | None, *,
                 position: Position | None = None,
                 postgres_down: bool = False) -> None:
    """Record one round of the replicator in *data_dir*'s standby dir
    (0700; the file 0600, replaced atomically): *error* None is a
    success (at *position*, if any), which clears the failure fields;
    else the round failed with *error* (its first line is kept,
    redacted). One replicator per data dir holds the lock, so this
    read-modify-write has no competitor. Raises OSError."""
    path = health_path(data_dir)
    previous = _read_health_document(path) or {}
    # Times are for display only: whether it is failing is the count.
    now = datetime.now(UTC).isoformat()
    data = {key: previous.get(key) for key in (
        'last_success_at', 'last_position_at', 'last_journal_id')}
    data['pid'] = os.getpid()
    if error is None:
        data.update(consecutive_failures=0, first_failure_at=None,
                    last_error=None, postgres_down=False)
        if position is not None:
            data.update(last_success_at=now,
                        last_position_at=position.position_at,
                        last_journal_id=position.journal_id)
    else:
        failures = _count(previous.get('consecutive_failures'))
        lines = str(redact(error)).strip().splitlines() or ['unknown error']
        data.update(consecutive_failures=failures + 1,
                    first_failure_at=(previous.get('first_failure_at')
                                      if failures else now) or now,
                    last_error=lines[0], postgres_down=postgres_down)
    private_dir(path.parent)
    fsutil.atomic_write_json(path, data, mode=0o600)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _read_health_document(path: Path) -> dict[str, Any] | None:
    """The recorded document; None when missing or unreadable (a new
    record replaces an unreadable one)."""
    try:
        return fsutil.read_json(path, 'replicator state', OSError,
                                invalid=lambda _: None)
    except OSError:
        return None


def replicator_health(data_dir: Path) -> ReplicatorHealth:
    """What the replicator recorded in *data_dir* (record_round). Reads
    one small file; never raises."""
    path = health_path(data_dir)
    try:
        data = fsutil.read_json(path, 'replicator state', ReplicationError,
                                'replicate_changes rewrites it next round')
    except ReplicationError as err:
        return ReplicatorHealth(path, True, problem=str(err))
    if data is None:
        return ReplicatorHealth(path, False)

    def text(key: str) -> str | None:
        value = data.get(key)
        return str(value) if value is not None else None

    journal_id, pid = data.get('last_journal_id'), data.get('pid')
    return ReplicatorHealth(
        path, True, _count(data.get('consecutive_failures')),
        text('last_error'), data.get('postgres_down') is True,
        text('first_failure_at'), text('last_success_at'),
        text('last_position_at'),
        journal_id if isinstance(journal_id, int) else None,
        pid if isinstance(pid, int) else None)


def _missing_reason(data_dir: Path) -> str:
    """Why there is no standby file: never run, or failing (and how)."""
    health = replicator_health(data_dir)
    if health.recorded and (health.failing or health.problem):
        return f'no standby: {health.describe()}'
    return 'no standby (replicate_changes not run)'


def standby_migrations(data_dir: Path) -> list[str] | None:
    """`app.name` of the migrations the standby records (read-only),
    None when there is no readable standby."""
    path = standby_path(data_dir)
    if sqlite_file.sqlite_file_problem(path):
        return None
    try:
        conn = sqlite_file.sqlite_open_readonly(path, 5.0)
        try:
            return sqlite_file.sqlite_applied_migrations(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return None
