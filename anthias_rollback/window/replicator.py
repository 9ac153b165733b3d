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
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from anthias_rollback.engines import sqlite as lite
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import (
    ConfigError,
    ReplicationError,
    ReplicationRefusedError,
)
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.standby import (
    _POSITION_DDL,
    CHUNK,
    DEFAULT_INTERVAL,
    LOCK_NAME,
    MAX_BACKOFF,
    POSITION_TABLE,
    STANDBY_NAME,
    Position,
    _private_dir,
    _remove_db,
    cutover_path,
    read_position,
    standby_dir,
    standby_path,
)
from anthias_rollback.transfer.values import _Converter, _ModelSpec


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


def keys_for(model, texts: list[str], sqlite_alias: str
             ) -> tuple[list, list]:
    """Journal keys (text) as PostgreSQL and SQLite parameters, through
    the primary key field itself."""
    pk = model._meta.pk
    values = [pk.to_python(t) for t in texts]
    kind = fields.key_kind(model)
    pg_keys = [str(v) if kind == 'uuid' else v for v in values]
    connection = connections[sqlite_alias]
    sqlite_keys = [pk.get_db_prep_value(v, connection, prepared=False)
                   for v in values]
    return pg_keys, sqlite_keys


@dataclass(frozen=True)
class AppliedBatch:
    """One journal batch applied onto a SQLite file."""
    batch: pj.JournalBatch
    keys: int                      # keys re-read (or rows of truncated
                                   # tables re-read whole)


class Applier:
    """Applies journal batches from one PostgreSQL alias onto one SQLite
    alias: the changed keys' rows as the batch's snapshot holds them,
    through the transfer's converters (the values a full copy writes).
    The replicator uses it for the standby; an incremental rollback for
    its new file. Holds the converters per model."""

    def __init__(self, postgres_alias: str, sqlite_alias: str,
                 chunk: int = CHUNK) -> None:
        self.pg = postgres_alias
        self.target = sqlite_alias
        self.chunk = chunk
        self._converters: dict[str, _Converter] = {}
        self.by_table = {m._meta.db_table: m
                         for m in models_graph.plan_models().models}

    def apply(self, prev: str, tick: str,
              on_keys: Callable[[Any, list[str]], None] | None = None,
              batch: pj.JournalBatch | None = None) -> AppliedBatch:
        """Apply what the journal holds between the snapshots *prev* (the
        file's) and *tick* (the caller's open REPEATABLE READ transaction
        on the PostgreSQL alias). The caller holds a transaction on the
        SQLite alias: the batch commits whole or not at all. *on_keys*
        sees every applied chunk of keys (model, keys as text). *batch*:
        postgres_batch(prev, tick) when the caller already read it."""
        if batch is None:
            batch = pj.postgres_batch(self.pg, prev, tick)
        unknown = [t for t in batch.tables if t not in self.by_table]
        if unknown:
            raise ReplicationError(
                f'the journal names tables this code has no model for '
                f'({", ".join(unknown[:5])}); update the code or end '
                'the window')
        # SQLite: the constraints hold at COMMIT, when the file is again
        # one PostgreSQL snapshot.
        connections[self.target].connection.execute(
            'PRAGMA defer_foreign_keys = ON')
        keys = 0
        for table in batch.tables:
            model = self.by_table[table]
            if table in batch.truncated:
                keys += self._refetch_table(model)
                continue
            for texts in pj.postgres_batch_keys(self.pg, prev, tick, table,
                                                self.chunk):
                keys += self._apply_keys(model, texts)
                if on_keys is not None:
                    on_keys(model, texts)
                faults.checkpoint('replicate:chunk-applied')
        return AppliedBatch(batch, keys)

    def converter(self, model) -> _Converter:
        table = model._meta.db_table
        if table not in self._converters:
            self._converters[table] = _Converter(
                _ModelSpec.of(model), self.pg, self.target, [], [0])
        return self._converters[table]

    def _insert(self, model, rows: list[tuple]) -> int:
        converter = self.converter(model)
        converted = converter.convert(rows)
        if converter.counter[0]:
            problem = converter.problems[0] if converter.problems else ''
            converter.problems.clear()
            converter.counter[0] = 0
            raise ReplicationError(f'a value of {model._meta.label} cannot '
                                   f'be written to SQLite: {problem}')
        if converted:
            spec = converter.spec
            # SQLite: OR REPLACE drops a row whose unique value the
            # snapshot gave to another key; that row's key is in this
            # batch too (the file was one snapshot), so it comes back.
            lite.sqlite_insert_rows(self.target, spec.table,
                                    list(spec.columns), converted,
                                    replace=True)
        return len(converted)

    def _apply_keys(self, model, texts: list[str]) -> int:
        pg_keys, sqlite_keys = keys_for(model, texts, self.target)
        meta = model._meta
        lite.sqlite_delete_rows(self.target, meta.db_table, meta.pk.column,
                                sqlite_keys)
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
        lite.sqlite_delete_rows(self.target, model._meta.db_table)
        spec = self.converter(model).spec
        rows_done = 0
        engine = engines.for_alias(self.pg)
        for rows in engine.fetch_chunks(self.pg, spec.select_sql(self.pg),
                                        chunk_rows=self.chunk):
            rows_done += self._insert(model, rows)
        return rows_done

    def raise_sequences(self, model_list: list | None = None) -> None:
        """sqlite_sequence at least PostgreSQL's sequences (of every
        planned model by default): no id handed out on PostgreSQL is
        reused after a rollback onto this file."""
        if model_list is None:
            model_list = list(self.by_table.values())
        keyed = [(m._meta.db_table, m._meta.pk.column) for m in model_list
                 if fields.has_auto_key(m)]
        if keyed:
            values = engines.for_alias(self.pg).sequence_values(self.pg,
                                                                keyed)
            engines.for_alias(self.target).sqlite_sync_sequences(
                self.target, values)


class Replicator:
    """One standby kept current from one PostgreSQL alias. Holds the
    standby's alias and its Applier between rounds."""

    def __init__(self, data_dir: Path, postgres_alias: str,
                 chunk: int = CHUNK) -> None:
        self.data_dir = Path(data_dir)
        self.pg = postgres_alias
        self.chunk = chunk
        self.path = standby_path(data_dir)
        self._standby_cm = None
        self.standby: str | None = None
        self.applier: Applier | None = None

    # -- the standby's alias
    def open(self) -> str:
        if self.standby is None:
            self._standby_cm = profiles.sqlite_file_alias(self.path,
                                                          wal=True)
            self.standby = self._standby_cm.__enter__()
            self.applier = Applier(self.pg, self.standby, self.chunk)
        return self.standby

    def close(self) -> None:
        if self._standby_cm is not None:
            self._standby_cm.__exit__(None, None, None)
        self._standby_cm = self.standby = None
        self.applier = None

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
            # A forced cutover skipped the check that SQLite held
            # PostgreSQL's rows: its file is not PostgreSQL's snapshot.
            if (info.get('sha256') and info.get('window') == cutover['txid']
                    and not cutover.get('forced') and cut.exists()
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
            with transaction.atomic(using=alias):
                applied = self.applier.apply(position.snapshot, tick)
                batch = applied.batch
                if batch.entries:
                    self.applier.raise_sequences(
                        [self.applier.by_table[t] for t in batch.tables])
                new = Position(
                    position.window, tick,
                    batch.max_id or position.journal_id, ts, time.time(),
                    position.batches + 1, position.entries + batch.entries,
                    position.started_from)
                connections[alias].connection.execute(
                    f'UPDATE {POSITION_TABLE} SET snapshot = ?, '
                    'journal_id = ?, position_ts = ?, postgres_seen_ts = '
                    '?, batches = ?, entries = ? WHERE id = 1',
                    [new.snapshot, new.journal_id, new.position_ts,
                     new.postgres_seen_ts, new.batches, new.entries])
                faults.checkpoint('replicate:before-commit')
        faults.checkpoint('replicate:committed')
        return RoundResult(batch.entries, applied.keys, batch.tables,
                           time.monotonic() - started, new)


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
