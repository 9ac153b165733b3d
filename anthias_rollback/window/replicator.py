"""The replicator: keeps the standby (window.standby) current from
PostgreSQL's change journal, so PostgreSQL dying costs seconds of writes,
not every write since the cutover.

- At the cutover (`switch_database --to postgres`),
  window.journal.open_window calls window.standby.take_cutover_file: an
  online snapshot of the live SQLite file, taken with PostgreSQL's tables
  locked, into `<data dir>/standby/cutover.db` (what SQLite held at the
  switch, which the switch just checked equals PostgreSQL).
- `run_replicator` (replicate_changes) copies it into `standby.db` (WAL)
  once per window, then applies the journal in PgQ-style batches: each
  round takes a tick (the snapshot of a REPEATABLE READ READ ONLY
  transaction); the batch is the entries of transactions visible in the
  tick and not in the previous one, so a long transaction that commits
  late is never skipped. The changed keys' current rows are read in that
  same snapshot by the Applier (window.applier) and applied in ONE SQLite
  transaction that also records the position (tick, journal id, times)
  in `anthias_rb_standby`: a kill at any instant leaves the last
  committed batch and its position.
- The standby is open only under the standby lock (window.integrity),
  for a round or an integrity check, and closed between: a rollback may
  take the file itself and rename it into the live database's place.
  Once a round finds nothing to apply, quick_check runs on it and the
  result is recorded with the position it read (check_if_needed); a
  failed check discards the standby and the next round rebuilds it.

PostgreSQL is only read; the live SQLite file is only read (the cutover
snapshot). Never prints.
"""
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections, transaction

from anthias_rollback import (
    conf,
    engines,
    events,
    faults,
    fsutil,
    locking,
    profiles,
    schema,
)
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import (
    ConfigError,
    ReplicationError,
    ReplicationRefusedError,
)
from anthias_rollback.phases import PhaseStatus
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.window import integrity
from anthias_rollback.window.applier import Applier
from anthias_rollback.window.standby import (
    CHUNK,
    DEFAULT_INTERVAL,
    LOCK_NAME,
    MAX_BACKOFF,
    POSITION_TABLE,
    STANDBY_NAME,
    Position,
    cutover_path,
    private_dir,
    read_position,
    record_idle_round,
    standby_dir,
    standby_path,
    write_start_position,
)

# Longest a standby's schema build may take (a Pi's SD card, every
# migration of a CMS): the replicator has no deadline of its own.
SCHEMA_TIMEOUT = 600.0
# Longest a round waits for the standby lock (an integrity check of a
# large standby, a rollback promoting it) before it counts as failed.
ROUND_LOCK_WAIT = 10.0


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


class Replicator:
    """One standby kept current from one PostgreSQL alias. Holds the
    standby's alias and its Applier between rounds."""

    def __init__(self, data_dir: Path, postgres_alias: str,
                 chunk: int = CHUNK) -> None:
        self.data_dir = Path(data_dir)
        self.pg = postgres_alias
        self.chunk = chunk
        self.path = standby_path(data_dir)
        self._standby_cm: AbstractContextManager[str] | None = None
        self.standby: str | None = None
        self.applier: Applier | None = None

    # -- the standby's alias
    def open(self) -> str:
        if self.standby is None:
            cm = profiles.sqlite_file_alias(self.path, wal=True)
            self._standby_cm = cm
            self.standby = cm.__enter__()
            self.applier = Applier(self.pg, self.standby, self.chunk)
        return self.standby

    def release(self) -> None:
        """Close the standby's connection (the alias stays): nothing of
        this process keeps the file open between rounds."""
        if self.standby is not None:
            connections[self.standby].close()

    def discard(self, why: str) -> None:
        """Remove a standby that failed its integrity check (the next
        round rebuilds it) and raise ReplicationError saying so."""
        with integrity.standby_lock(self.data_dir, ROUND_LOCK_WAIT):
            self.close()
            sqlite_file.remove_sqlite_file(self.path)
        raise ReplicationError(f'{why}: removed; the next round rebuilds '
                               'it')

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
        self.check_may_build()
        return self.bootstrap(cutover)

    def check_may_build(self) -> None:
        """ReplicationError when no standby may be built now: a rollback
        is running (it may have just promoted the standby to be the live
        file), or the device has left PostgreSQL."""
        holder = locking.read_lock_holder(self.data_dir)
        if holder is not None:
            raise ReplicationError(
                f'{holder.get("operation") or "another operation"} is '
                'running on this data dir: no standby is built meanwhile')
        check_can_replicate(self.data_dir)

    def bootstrap(self, cutover: dict[str, Any],
                  full: bool = False) -> Position:
        """Build standby.db for this window: a copy of the cutover file
        (when it is this window's, unchanged, and *full* is not asked),
        else a full copy of PostgreSQL in one snapshot. Built beside it,
        renamed in whole."""
        folder = private_dir(self.path.parent)
        tmp = folder / f'.{STANDBY_NAME}.{os.getpid()}.tmp'
        sqlite_file.remove_sqlite_file(tmp)
        info = cutover['info'].get('standby_cutover') or {}
        cut = cutover_path(self.data_dir)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            os.close(fd)
            # A forced cutover skipped the check that SQLite held
            # PostgreSQL's rows: its file is not PostgreSQL's snapshot.
            if (not full and info.get('sha256')
                    and info.get('window') == cutover['txid']
                    and not cutover.get('forced') and cut.exists()
                    and sqlite_file.file_sha256(cut)[0] == info['sha256']):
                sqlite_file.sqlite_snapshot(cut, tmp, 20.0)
                snapshot, started = cutover['snapshot'], 'cutover file'
                ts = cutover['at'].timestamp()
            else:
                snapshot, ts = self._full_copy(tmp)
                started = 'full copy'
            faults.checkpoint('replicate:bootstrap-copied')
            write_start_position(tmp, cutover['txid'], snapshot, ts,
                                 started)
            os.chmod(tmp, 0o600)
            fsutil.fsync_file(tmp)
            # A stale -wal beside the new file would be applied to it.
            sqlite_file.remove_sqlite_file(self.path)
            os.replace(tmp, self.path)
            fsutil.fsync_dir(folder)
        except BaseException:
            sqlite_file.remove_sqlite_file(tmp)
            raise
        position = read_position(self.path)
        assert position is not None   # written just above
        return position

    def _full_copy(self, tmp: Path) -> tuple[str, float]:
        from anthias_rollback import schema_build, transfer

        # The schema in a child where tmp is the only database: from an
        # in-process migrate, a data migration's default-manager writes
        # went to `default`, the production PostgreSQL.
        schema_build.migrate_file(tmp, timeout=SCHEMA_TIMEOUT)
        # replace: the data migrations' rows in tmp go; the copy leaves
        # exactly PostgreSQL's rows.
        with profiles.sqlite_file_alias(tmp) as alias, \
                pj.postgres_tick(self.pg) as (snapshot, ts):
            transfer.transfer_data(self.pg, alias, replace=True)
        return snapshot, ts

    # -- following PostgreSQL's schema
    def schema_moved(self) -> bool:
        """True when PostgreSQL records migrations the standby lacks (a
        `migrate` ran during the window). The other way round (this
        code's build gave the standby migrations PostgreSQL has not run
        yet) is no reason: rebuilding would not change it. Raises
        ReplicationError when PostgreSQL records migrations this code
        does not know: the standby can only be rebuilt by the new code
        (a failed round, retried: the service restarted on the new
        release carries on)."""
        pg = schema.applied_migrations(self.pg)
        if not pg - schema.applied_migrations(self.open()):
            return False
        unknown = schema.migration_state(pg).unknown
        if unknown:
            raise ReplicationError(
                f'PostgreSQL has migrations this code does not know '
                f'({", ".join(unknown[:5])}): restart replicate_changes '
                'with the new release')
        return True

    # -- one batch
    def apply_round(self) -> RoundResult | None:
        """Apply the next batch (possibly empty) and record the position,
        in one SQLite transaction, holding the standby lock and closing
        the file after. None when no window is open any more. Raises
        DatabaseError, sqlite3.Error, ReplicationError."""
        with integrity.standby_lock(self.data_dir, ROUND_LOCK_WAIT):
            try:
                return self._apply_round()
            finally:
                self.release()

    def _apply_round(self) -> RoundResult | None:
        started = time.monotonic()
        cutover = pj.postgres_cutover(self.pg)
        if cutover is None:
            return None
        position = self.ensure(cutover)
        if self.schema_moved():
            # Rebuilt (a full copy in one snapshot), not migrated forward
            # in place: tables a migration creates have no journal
            # triggers, and its data migration's rows on the standby
            # would be rows PostgreSQL may not hold (they ran twice, with
            # other ids); re-reading every touched table would be a full
            # copy anyway. The position stays in the same window.
            self.close()
            position = self.bootstrap(cutover, full=True)
        alias = self.open()
        applier = self.applier
        assert applier is not None   # open() made it
        # PostgreSQL's time before the tick (not this process's clock):
        # every write acknowledged before position_ts is visible in the
        # tick, so the bound is true whatever the local clock did.
        with pj.postgres_tick(self.pg) as (tick, ts):
            now = pj.postgres_cutover(self.pg)
            if now is None or now['txid'] != position.window:
                raise ReplicationError('a new rollback window began '
                                       'meanwhile; starting again')
            with transaction.atomic(using=alias):
                applied = applier.apply(position.snapshot, tick)
                batch = applied.batch
                if batch.entries:
                    applier.raise_sequences(
                        [applier.by_table[t] for t in batch.tables])
                new = Position(
                    position.window, tick,
                    batch.max_id or position.journal_id, ts,
                    pj.postgres_clock(self.pg),
                    position.batches + 1, position.entries + batch.entries,
                    position.started_from)
                if batch.entries:
                    connections[alias].connection.execute(
                        f'UPDATE {POSITION_TABLE} SET snapshot = ?, '
                        'journal_id = ?, position_ts = ?, postgres_seen_ts '
                        '= ?, batches = ?, entries = ? WHERE id = 1',
                        [new.snapshot, new.journal_id, new.position_ts,
                         new.postgres_seen_ts, new.batches, new.entries])
                faults.checkpoint('replicate:before-commit')
            if not batch.entries:
                # Nothing applied: the file is left as it is (as its
                # integrity check saw it); the newer tick goes beside it.
                record_idle_round(self.path, new)
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
    folder = private_dir(standby_dir(data_dir))
    with _replicator_lock(folder), _postgres_reader(postgres_alias) as pg:
        replicator = Replicator(data_dir, pg, chunk)
        try:
            return _loop(replicator, data_dir, once, interval, max_backoff,
                         stop, progress, describe_alias(postgres_alias))
        finally:
            replicator.close()


def check_if_needed(data_dir: Path, position: Position
                    ) -> integrity.Integrity | None:
    """quick_check of the standby, recorded with the position it read
    (integrity.check_standby), unless a recorded check covers its rows
    as they are at *position* (the round's just committed). None when
    nothing was checked. Raises ReplicationError (the lock stayed
    taken), sqlite3.Error, OSError."""
    path = standby_path(data_dir)
    with integrity.standby_lock(data_dir, ROUND_LOCK_WAIT):
        if not path.exists() or not integrity.needs_check(data_dir,
                                                          position):
            return None
        return integrity.check_standby(data_dir)


def _loop(replicator: Replicator, data_dir: Path, once: bool,
          interval: float, max_backoff: float, stop: threading.Event,
          progress: events.Progress, where: str) -> ReplicationResult:
    from anthias_rollback.window.standby import record_round

    rounds = entries = 0
    position = None
    state = None
    delay = interval
    unrecorded: str | None = None

    def record(error: str | None, **kwargs: Any) -> None:
        # Every round's outcome, durably (--show, readiness, /health and
        # the monitor read it): one log line per state is not enough.
        # Not recorded is a warning once: the replicating goes on.
        nonlocal unrecorded
        try:
            record_round(data_dir, error, **kwargs)
            unrecorded = None
        except OSError as err:
            if unrecorded is None:
                events.emit(progress, events.WARNING, 'replicate',
                            detail='cannot record the round in '
                                   f'{data_dir}: {err.strerror or err}')
            unrecorded = str(err)

    while True:
        try:
            result = replicator.apply_round()
            if result is not None and (once or not result.entries):
                # Once a round finds nothing to apply (or a cron run is
                # done), the standby's rows are checked and the result
                # recorded: what a rollback promotes without reading
                # the whole file again. Between writing rounds it waits.
                checked = check_if_needed(data_dir, result.position)
                if checked is not None and not checked.ok:
                    replicator.discard(f'the standby fails quick_check '
                                       f'({checked.result})')
        # A round's failure is a state to report and retry, not a crash.
        except Exception as err:  # noqa: BLE001
            connections[replicator.pg].close()
            replicator.close()
            down = isinstance(err, DatabaseError) and engines.for_alias(
                replicator.pg).server_down(err)
            what = (f'PostgreSQL {where} unreachable' if down
                    else 'round failed')
            record(f'{what}: {first_line(err)}', postgres_down=down)
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
            if result is None and once and rounds == 0:
                # A cron `--once` with nothing to follow is a setup to
                # fix, not a success (the docs' exit codes say 1).
                raise ReplicationRefusedError(
                    'no rollback window is open on PostgreSQL: there is '
                    'nothing to replicate (switch_database --to postgres '
                    'opens one)')
            if result is None:
                # Nothing left to fail at: earlier failures no longer say
                # anything about a standby.
                record(None)
                events.emit(progress, events.PHASE_DONE, 'replicate',
                            status=PhaseStatus.OK,
                            detail='the rollback window was ended: nothing '
                                   'to replicate; stopped')
                return ReplicationResult(rounds, entries, position,
                                         'window ended')
            rounds += 1
            entries += result.entries
            position = result.position
            # A success is recorded when it changes something a reader
            # shows (the first, a recovery, applied entries), else every
            # 60th round: two fsyncs per idle round would wear an SD card.
            if (state != 'replicating' or result.entries or unrecorded
                    or rounds % 60 == 0):
                record(None, position=position)
            delay = interval
            if state != 'replicating':
                events.emit(progress, events.PHASE_DONE, 'replicate',
                            status=PhaseStatus.OK, detail=(
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
                        status=PhaseStatus.OK, detail=f'{err}; stopped')
            return ReplicationResult(rounds, entries, position,
                                     'profile changed')
