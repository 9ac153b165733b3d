"""The standby: a SQLite file on the device kept current from PostgreSQL's
change journal, so PostgreSQL dying costs seconds of writes, not every
write since the cutover.

- At the cutover (`switch_database --to postgres`), window.open_window
  calls `take_cutover_file`: an online snapshot of the live SQLite file,
  taken with PostgreSQL's tables locked, into `<data dir>/standby/
  cutover.db` (what SQLite held at the switch, which the switch just
  checked equals PostgreSQL).
- `run_replicator` (replicate_changes) copies it into `standby.db` (WAL)
  once per window, then applies the journal in PgQ-style batches: each
  round takes a tick (the snapshot of a REPEATABLE READ READ ONLY
  transaction); the batch is the entries of transactions visible in the
  tick and not in the previous one, so a long transaction that commits
  late is never skipped. The changed keys' current rows are read in that
  same snapshot through the transfer's value pipeline (the values a full
  copy writes) and applied in ONE SQLite transaction that also records
  the position (tick, journal id, times) in `anthias_rb_standby`: a kill
  at any instant leaves the last committed batch and its position.
- `standby_state` says how far behind the standby is; `copy_standby`
  gives a rollback a copy of it, with the bound it proves.

PostgreSQL is only read; the live SQLite file is only read (the cutover
snapshot). Never prints.
"""
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections, transaction

from anthias_rollback import (
    conf,
    engines,
    events,
    faults,
    fields,
    fsutil,
    models_graph,
    profiles,
)
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import ConfigError, RollbackError
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.transfer.values import _Converter, _ModelSpec

STANDBY_DIR = 'standby'
CUTOVER_NAME = 'cutover.db'
CUTOVER_INFO = 'cutover.json'
STANDBY_NAME = 'standby.db'
LOCK_NAME = 'replicate.lock'
POSITION_TABLE = 'anthias_rb_standby'
# Keys per statement: far below SQLite's 999 variables; memory stays flat.
CHUNK = 500
DEFAULT_INTERVAL = 0.5
MAX_BACKOFF = 10.0
_SIDE = ('-wal', '-shm', '-journal')

_POSITION_DDL = (
    f'CREATE TABLE IF NOT EXISTS {POSITION_TABLE} ('
    'id INTEGER PRIMARY KEY CHECK (id = 1), '
    'window TEXT NOT NULL, snapshot TEXT NOT NULL, '
    'journal_id INTEGER NOT NULL, position_ts REAL NOT NULL, '
    'postgres_seen_ts REAL NOT NULL, batches INTEGER NOT NULL, '
    'entries INTEGER NOT NULL, started_from TEXT NOT NULL)')


class ReplicationError(RollbackError):
    """The standby could not be brought up to date (exit 1)."""


class ReplicationRefusedError(ReplicationError):
    """Nothing to replicate: no window, or the profile is not postgres."""


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
    lag_seconds: float | None      # now - position time
    pending: int | None            # journal entries not applied yet
    problem: str | None = None


@dataclass(frozen=True)
class RoundResult:
    entries: int
    keys: int
    tables: tuple[str, ...]
    seconds: float
    position: Position


@dataclass(frozen=True)
class ReplicationResult:
    rounds: int
    entries: int
    position: Position | None
    stopped: str                   # why it returned


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


# --- paths -----------------------------------------------------------------

def standby_dir(data_dir: Path) -> Path:
    return Path(data_dir) / STANDBY_DIR


def standby_path(data_dir: Path) -> Path:
    return standby_dir(data_dir) / STANDBY_NAME


def cutover_path(data_dir: Path) -> Path:
    return standby_dir(data_dir) / CUTOVER_NAME


def _remove_db(path: Path) -> None:
    for candidate in (path, *(Path(f'{path}{s}') for s in _SIDE)):
        candidate.unlink(missing_ok=True)


def _private_dir(path: Path) -> Path:
    fsutil.ensure_private_dir(path)
    os.chmod(path, 0o700)
    return path


def discard_standby(data_dir: Path) -> Path:
    """A new window begins: remove the standby and cutover files of the
    previous one (their rows are older than this cutover). Returns the
    standby dir (0700)."""
    folder = _private_dir(standby_dir(data_dir))
    for name in (STANDBY_NAME, CUTOVER_NAME):
        _remove_db(folder / name)
    (folder / CUTOVER_INFO).unlink(missing_ok=True)
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
    folder = _private_dir(Path(folder))
    target = folder / CUTOVER_NAME
    tmp = folder / f'.{CUTOVER_NAME}.{os.getpid()}.tmp'
    _remove_db(tmp)
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
            _remove_db(tmp)
            return {'problem': f'SQLite changed after the check: {table} '
                               f'has {got} rows, PostgreSQL {want}'}
        fsutil.fsync_file(tmp)
        os.replace(tmp, target)
        fsutil.fsync_dir(folder)
        digest, size = sqlite_file.file_sha256(target)
        info = {'path': str(target), 'sha256': digest, 'size': size,
                'window': window, 'taken_at': taken.isoformat()}
        fsutil.atomic_write_json(folder / CUTOVER_INFO, info, mode=0o600)
        return info
    except (OSError, sqlite3.Error, RollbackError) as err:
        _remove_db(tmp)
        return {'problem': f'cannot snapshot {live_path}: '
                           f'{first_line(err)}'}


def _cutover_info(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((standby_dir(data_dir) / CUTOVER_INFO)
                          .read_text())
    except (OSError, ValueError):
        return None


# --- the position ------------------------------------------------------------

def _position_of(conn: sqlite3.Connection) -> Position | None:
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
    """The position recorded in the standby at *path* (read-only), or
    None when it has none. Raises sqlite3.Error for an unreadable file."""
    if sqlite_file.sqlite_file_problem(Path(path)):
        return None
    conn = sqlite_file.sqlite_open_readonly(Path(path), timeout)
    try:
        return _position_of(conn)
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
                            'no standby (replicate_changes not run)')
    try:
        position = read_position(path)
    except sqlite3.Error as err:
        return StandbyState(path, True, None, None, None, None,
                            f'unreadable: {first_line(err)}')
    if position is None:
        return StandbyState(path, True, None, None, None, None,
                            'no position recorded')
    pending, problem = None, None
    alias = postgres_alias or profiles.POSTGRES
    try:
        if pj.postgres_journal_installed(alias):
            pending = pj.postgres_pending_entries(alias, position.snapshot)
    except (DatabaseError, RollbackError) as err:
        connections[alias].close()
        problem = f'PostgreSQL not answering: {first_line(err)}'
    return StandbyState(path, True, position, position.position_at,
                        round(max(0.0, time.time()
                                  - position.position_ts), 3),
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
        cutover = _cutover_info(data_dir)
        if cutover is not None and cutover.get('window') != position.window:
            return None, (f'standby {path} belongs to an older rollback '
                          'window')
        conn = sqlite_file.sqlite_open_readonly(path, 5.0)
        try:
            quick = conn.execute('PRAGMA quick_check').fetchone()[0]
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
        conn = sqlite3.connect(target, isolation_level=None)
        try:
            position = _position_of(conn)
            conn.execute(f'DROP TABLE IF EXISTS {POSITION_TABLE}')
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise ReplicationError(f'cannot copy the standby {source}: '
                               f'{first_line(err)}') from None
    if position is None:
        raise ReplicationError(f'the standby {source} has no position')
    return position


# --- the replicator -------------------------------------------------------

@contextmanager
def _replicator_lock(folder: Path) -> Iterator[None]:
    """One replicator per data dir (flock: released when the process
    dies, however)."""
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors='replace').strip()
            raise ReplicationRefusedError(
                f'another replicate_changes is running on {folder} '
                f'(pid {holder or "unknown"})') from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def _postgres_reader(alias: str) -> Iterator[str]:
    """A private alias copying *alias*'s settings, with TCP keepalives so
    a lost network ends a read instead of hanging it (libpq ignores them
    on a Unix socket)."""
    config = dict(connections[alias].settings_dict)
    options = dict(config.get('OPTIONS') or {})
    options.setdefault('connect_timeout', 5)
    for key, value in (('keepalives', 1), ('keepalives_idle', 5),
                       ('keepalives_interval', 2),
                       ('keepalives_count', 3)):
        options.setdefault(key, value)
    options.setdefault('application_name', 'anthias_replicate_changes')
    config['OPTIONS'] = options
    with profiles.temporary_alias(config, prefix='anthias_replica') as name:
        yield name


def _keys_for(model, texts: list[str], pg: str, standby: str
              ) -> tuple[list, list]:
    """Journal keys (text) as PostgreSQL and SQLite parameters, through
    the primary key field itself."""
    pk = model._meta.pk
    values = [pk.to_python(t) for t in texts]
    kind = fields.key_kind(model)
    pg_keys = [str(v) if kind == 'uuid' else v for v in values]
    connection = connections[standby]
    sqlite_keys = [pk.get_db_prep_value(v, connection, prepared=False)
                   for v in values]
    return pg_keys, sqlite_keys


class Replicator:
    """One standby kept current from one PostgreSQL alias. Holds the
    converters per model and the standby's alias between rounds."""

    def __init__(self, data_dir: Path, postgres_alias: str,
                 chunk: int = CHUNK) -> None:
        self.data_dir = Path(data_dir)
        self.pg = postgres_alias
        self.chunk = chunk
        self.path = standby_path(data_dir)
        self._standby_cm = None
        self.standby: str | None = None
        self._converters: dict[str, _Converter] = {}
        self.by_table = {m._meta.db_table: m
                         for m in models_graph.plan_models().models}

    # -- the standby's alias
    def open(self) -> str:
        if self.standby is None:
            self._standby_cm = profiles.sqlite_file_alias(self.path,
                                                          wal=True)
            self.standby = self._standby_cm.__enter__()
            self._converters = {}
        return self.standby

    def close(self) -> None:
        if self._standby_cm is not None:
            self._standby_cm.__exit__(None, None, None)
        self._standby_cm = self.standby = None
        self._converters = {}

    # -- starting a window's standby
    def ensure(self, cutover: dict[str, Any]) -> Position:
        """The standby's position, (re)building the standby when it is
        missing or belongs to another window."""
        position = None
        if self.path.exists():
            self.close()
            position = read_position(self.path)
        if position is not None and position.window == cutover['txid']:
            return position
        self.close()
        return self.bootstrap(cutover)

    def bootstrap(self, cutover: dict[str, Any]) -> Position:
        """Build standby.db for this window: a copy of the cutover file
        (when it is this window's, unchanged), else a full copy of
        PostgreSQL in one snapshot. Built beside it, renamed in whole."""
        folder = _private_dir(self.path.parent)
        tmp = folder / f'.{STANDBY_NAME}.{os.getpid()}.tmp'
        _remove_db(tmp)
        info = cutover['info'].get('standby_cutover') or {}
        cut = cutover_path(self.data_dir)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            os.close(fd)
            if (info.get('sha256') and info.get('window') == cutover['txid']
                    and cut.exists()
                    and sqlite_file.file_sha256(cut)[0] == info['sha256']):
                sqlite_file.sqlite_snapshot(cut, tmp, 20.0)
                snapshot, started = cutover['snapshot'], 'cutover file'
                ts = cutover['at'].timestamp()
            else:
                snapshot, ts = self._full_copy(tmp)
                started = 'full copy'
            faults.checkpoint('replicate:bootstrap-copied')
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute('PRAGMA journal_mode=WAL')
                conn.execute(_POSITION_DDL)
                conn.execute(
                    f'INSERT INTO {POSITION_TABLE} VALUES '
                    '(1, ?, ?, 0, ?, ?, 0, 0, ?)',
                    [cutover['txid'], snapshot, ts, time.time(), started])
            finally:
                conn.close()
            os.chmod(tmp, 0o600)
            fsutil.fsync_file(tmp)
            # A stale -wal beside the new file would be applied to it.
            _remove_db(self.path)
            os.replace(tmp, self.path)
            fsutil.fsync_dir(folder)
        except BaseException:
            _remove_db(tmp)
            raise
        return read_position(self.path)

    def _full_copy(self, tmp: Path) -> tuple[str, float]:
        from django.core.management import call_command

        from anthias_rollback import transfer

        with profiles.sqlite_file_alias(tmp) as alias:
            call_command('migrate', database=alias, verbosity=0,
                         interactive=False)
            ts = time.time()
            with pj.postgres_snapshot_transaction(self.pg) as snapshot:
                transfer.transfer_data(self.pg, alias)
        return snapshot, ts

    # -- one batch
    def converter(self, model) -> _Converter:
        table = model._meta.db_table
        if table not in self._converters:
            self._converters[table] = _Converter(
                _ModelSpec.of(model), self.pg, self.standby, [], [0])
        return self._converters[table]

    def apply_round(self) -> RoundResult | None:
        """Apply the next batch (possibly empty) and record the position,
        in one SQLite transaction. None when no window is open any more.
        Raises DatabaseError, sqlite3.Error, ReplicationError."""
        started = time.monotonic()
        cutover = pj.postgres_cutover(self.pg)
        if cutover is None:
            return None
        position = self.ensure(cutover)
        alias = self.open()
        # The local time before the tick: every write acknowledged before
        # position_ts is visible in the tick, so the bound is true.
        ts = time.time()
        with pj.postgres_snapshot_transaction(self.pg) as tick:
            now = pj.postgres_cutover(self.pg)
            if now is None or now['txid'] != position.window:
                raise ReplicationError('a new rollback window began '
                                       'meanwhile; starting again')
            batch = pj.postgres_batch(self.pg, position.snapshot, tick)
            unknown = [t for t in batch.tables if t not in self.by_table]
            if unknown:
                raise ReplicationError(
                    f'the journal names tables this code has no model for '
                    f'({", ".join(unknown[:5])}); update the code or end '
                    'the window')
            keys = 0
            with transaction.atomic(using=alias):
                raw = connections[alias].connection
                # SQLite: the constraints hold at COMMIT, when the standby
                # is again one PostgreSQL snapshot.
                raw.execute('PRAGMA defer_foreign_keys = ON')
                for table in batch.tables:
                    model = self.by_table[table]
                    if table in batch.truncated:
                        keys += self._refetch_table(model)
                    else:
                        for texts in pj.postgres_batch_keys(
                                self.pg, position.snapshot, tick, table,
                                self.chunk):
                            keys += self._apply_keys(model, texts)
                            faults.checkpoint('replicate:chunk-applied')
                if batch.entries:
                    self._raise_sequences([self.by_table[t]
                                           for t in batch.tables])
                new = Position(
                    position.window, tick,
                    batch.max_id or position.journal_id, ts, time.time(),
                    position.batches + 1, position.entries + batch.entries,
                    position.started_from)
                raw.execute(
                    f'UPDATE {POSITION_TABLE} SET snapshot = ?, '
                    'journal_id = ?, position_ts = ?, postgres_seen_ts = '
                    '?, batches = ?, entries = ? WHERE id = 1',
                    [new.snapshot, new.journal_id, new.position_ts,
                     new.postgres_seen_ts, new.batches, new.entries])
                faults.checkpoint('replicate:before-commit')
        faults.checkpoint('replicate:committed')
        return RoundResult(batch.entries, keys, batch.tables,
                           time.monotonic() - started, new)

    def _insert(self, model, rows: list[tuple]) -> int:
        converter = self.converter(model)
        converted = converter.convert(rows)
        if converter.counter[0]:
            problem = converter.problems[0] if converter.problems else ''
            converter.problems.clear()
            converter.counter[0] = 0
            raise ReplicationError(f'a value of {model._meta.label} cannot '
                                   f'be written to the standby: {problem}')
        if converted:
            spec = converter.spec
            quote = connections[self.standby].ops.quote_name
            # SQLite: OR REPLACE drops a standby row whose unique value the
            # snapshot gave to another key; that row's key is in this
            # batch too (the standby was one snapshot), so it comes back.
            sql = (f'INSERT OR REPLACE INTO {quote(spec.table)} '
                   f'({", ".join(quote(c) for c in spec.columns)}) VALUES '
                   f'({", ".join("?" * len(spec.columns))})')
            connections[self.standby].connection.executemany(sql,
                                                             converted)
        return len(converted)

    def _apply_keys(self, model, texts: list[str]) -> int:
        pg_keys, sqlite_keys = _keys_for(model, texts, self.pg,
                                         self.standby)
        meta = model._meta
        quote = connections[self.standby].ops.quote_name
        column = quote(meta.pk.column)
        connections[self.standby].connection.execute(
            f'DELETE FROM {quote(meta.db_table)} WHERE {column} IN '
            f'({", ".join("?" * len(sqlite_keys))})', sqlite_keys)
        engine = engines.for_alias(self.pg)
        kind = fields.key_kind(model)
        pg_column = connections[self.pg].ops.quote_name(meta.pk.column)
        if kind is None:
            clause, params = f'{pg_column}::text = ANY(%s)', [list(texts)]
        else:
            clause, params = engine.key_in_clause(pg_column, kind, pg_keys)
        spec = self.converter(model).spec
        sql = f'{spec.select_sql(self.pg)} WHERE {clause}'
        for rows in engine.fetch_chunks(self.pg, sql, params,
                                        chunk_rows=self.chunk):
            self._insert(model, rows)
        return len(texts)

    def _refetch_table(self, model) -> int:
        """A TRUNCATE in the batch: the table again, whole, from the
        tick (in chunks)."""
        quote = connections[self.standby].ops.quote_name
        connections[self.standby].connection.execute(
            f'DELETE FROM {quote(model._meta.db_table)}')
        spec = self.converter(model).spec
        rows_done = 0
        engine = engines.for_alias(self.pg)
        for rows in engine.fetch_chunks(self.pg, spec.select_sql(self.pg),
                                        chunk_rows=self.chunk):
            rows_done += self._insert(model, rows)
        return rows_done

    def _raise_sequences(self, model_list: list) -> None:
        """sqlite_sequence at least PostgreSQL's sequences: no id handed
        out on PostgreSQL is reused after a rollback onto the standby."""
        keyed = [(m._meta.db_table, m._meta.pk.column) for m in model_list
                 if fields.has_auto_key(m)]
        if keyed:
            values = engines.for_alias(self.pg).sequence_values(self.pg,
                                                                keyed)
            engines.for_alias(self.standby).sqlite_sync_sequences(
                self.standby, values)


def check_can_replicate(data_dir: Path) -> None:
    """Refuse (ReplicationRefusedError) unless the active profile is
    postgres: the standby follows PostgreSQL only while it is live."""
    active = profiles.resolve_active_profile(Path(data_dir))
    if active.name != profiles.POSTGRES:
        raise ReplicationRefusedError(
            f'the active profile is {active.name} (from {active.source}): '
            'a standby follows PostgreSQL only while the device runs on it')


def run_replicator(postgres_alias: str, *, data_dir: Path | None = None,
                   once: bool = False, interval: float = DEFAULT_INTERVAL,
                   max_backoff: float = MAX_BACKOFF, chunk: int = CHUNK,
                   stop: threading.Event | None = None,
                   progress: events.Progress = None) -> ReplicationResult:
    """Keep the standby in *data_dir* current from *postgres_alias*
    (reads only there, in short REPEATABLE READ READ ONLY transactions;
    writes only the standby files). Round after round every *interval*
    seconds until *stop* is set, the profile leaves postgres or the
    window ends; *once*: one round. PostgreSQL down or any failed round:
    one WARNING event per change of state, retries with backoff doubling
    up to *max_backoff*, never raises (with *once* it raises
    ReplicationError). Raises ReplicationRefusedError before starting
    when the profile is not postgres or no window is open."""
    data_dir = Path(data_dir or conf.data_dir())
    stop = stop or threading.Event()
    check_can_replicate(data_dir)
    live = profiles.sqlite_alias_path(profiles.SQLITE)
    if live.resolve() == standby_path(data_dir).resolve():
        raise ConfigError(f'the standby {standby_path(data_dir)} would be '
                          'the live SQLite file')
    folder = _private_dir(standby_dir(data_dir))
    with _replicator_lock(folder), _postgres_reader(postgres_alias) as pg:
        replicator = Replicator(data_dir, pg, chunk)
        try:
            return _loop(replicator, data_dir, once, interval, max_backoff,
                         stop, progress, describe_alias(postgres_alias))
        finally:
            replicator.close()


def _loop(replicator: Replicator, data_dir: Path, once: bool,
          interval: float, max_backoff: float, stop: threading.Event,
          progress: events.Progress, where: str) -> ReplicationResult:
    rounds = entries = 0
    position = None
    state = None
    delay = interval
    while True:
        try:
            result = replicator.apply_round()
        # A round's failure is a state to report and retry, not a crash.
        except Exception as err:  # noqa: BLE001
            connections[replicator.pg].close()
            replicator.close()
            down = isinstance(err, DatabaseError) and engines.for_alias(
                replicator.pg).server_down(err)
            what = (f'PostgreSQL {where} unreachable' if down
                    else 'round failed')
            if once:
                raise ReplicationError(f'{what}: {first_line(err)}; the '
                                       'standby is unchanged') from None
            # One line per state, not per message: a restart says
            # "closed", then "refused", then "starting up".
            delay = (interval if state is None or state == 'replicating'
                     else min(max_backoff, max(delay, interval) * 2))
            if what != state:
                events.emit(progress, events.WARNING, 'replicate',
                            detail=f'{what}: {first_line(err)}; retrying '
                                   f'(backoff up to {max_backoff:g}s)')
            state = what
        else:
            if result is None:
                events.emit(progress, events.PHASE_DONE, 'replicate',
                            status='ok', detail='the rollback window was '
                            'ended: nothing to replicate; stopped')
                return ReplicationResult(rounds, entries, position,
                                         'window ended')
            rounds += 1
            entries += result.entries
            position = result.position
            delay = interval
            if state != 'replicating':
                events.emit(progress, events.PHASE_DONE, 'replicate',
                            status='ok', detail=(
                                f'replicating into {replicator.path} '
                                f'(position {position.position_at}, '
                                f'started from the {position.started_from})'
                                ))
                state = 'replicating'
            if result.entries:
                events.emit(progress, events.BATCH, 'replicate',
                            rows=result.entries, total=result.keys,
                            seconds=result.seconds)
        if once:
            return ReplicationResult(rounds, entries, position, 'once')
        if stop.wait(delay):
            return ReplicationResult(rounds, entries, position, 'stopped')
        try:
            check_can_replicate(data_dir)
        except ReplicationRefusedError as err:
            events.emit(progress, events.PHASE_DONE, 'replicate',
                        status='ok', detail=f'{err}; stopped')
            return ReplicationResult(rounds, entries, position,
                                     'profile changed')
