"""Could we roll back right now, and how? A list of small checks.

Each check is a function `(ReadinessContext) -> ReadinessCheck`; CHECKS is
the list `check_readiness` runs, in order. A later feature (last drill
result, cutover journal) adds itself by appending one function. Checks
marked informational are reported but do not decide `ready`.
"""
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path

from django.db import DatabaseError

from anthias_rollback import backup, locking, profiles, schema
from anthias_rollback.drill import history as drill_history
from anthias_rollback.exceptions import (
    ConfigError,
    DatabaseDownError,
    RollbackError,
)
from anthias_rollback.report import first_line
from anthias_rollback.rollback import preserve
from anthias_rollback.window import standby as window_standby

DISK_FACTOR = 3


@dataclass(frozen=True)
class ReadinessCheck:
    name: str
    ok: bool
    reason: str
    informational: bool = False


@dataclass(frozen=True)
class ReadinessReport:
    ready: bool
    checks: tuple[ReadinessCheck, ...]
    checked_at: datetime
    latest_backup: Path | None

    @property
    def failed(self) -> tuple[ReadinessCheck, ...]:
        return tuple(c for c in self.checks
                     if not c.ok and not c.informational)


class ReadinessContext:
    """The inputs of one readiness run, plus facts several checks share
    (computed once, on first use)."""

    def __init__(self, *, data_dir: Path, sqlite_path: Path,
                 backup_dir: Path, postgres_alias: str | None,
                 pg_dump: str, max_age_hours: float,
                 free_bytes: int | None, now: datetime):
        self.data_dir = Path(data_dir)
        self.sqlite_path = Path(sqlite_path)
        self.backup_dir = Path(backup_dir)
        self.postgres_alias = postgres_alias
        self.pg_dump = pg_dump
        self.max_age_hours = max_age_hours
        self.free_bytes_override = free_bytes
        self.now = now

    @cached_property
    def window_expected(self) -> bool:
        """The device runs on PostgreSQL, so a standby is kept (an
        unreadable profile counts: better a finding than a silence)."""
        try:
            active = profiles.resolve_active_profile(self.data_dir)
        except RollbackError:
            return True
        return active.name == profiles.POSTGRES

    @cached_property
    def replicator(self) -> window_standby.ReplicatorHealth:
        return window_standby.replicator_health(self.data_dir)

    @cached_property
    def replicator_broken(self) -> bool:
        """replicate_changes' last rounds failed, and not because
        PostgreSQL is down (then the standby is as current as it can
        be): a replicator that cannot reach a PostgreSQL that answers
        here is misconfigured, not waiting."""
        health = self.replicator
        if not (self.window_expected and health.failing):
            return False
        return not health.postgres_down or self.postgres_answers

    @cached_property
    def postgres_answers(self) -> bool:
        if self.postgres_alias is None:
            return False
        try:
            schema.check_connection(self.postgres_alias)
        except RollbackError:
            return False
        return True

    @cached_property
    def usable_standby(self) -> tuple[window_standby.Position | None, str]:
        """(position, '') of a standby a rollback could restore with
        PostgreSQL down, or (None, why not)."""
        position, why = window_standby.usable_standby(self.data_dir)
        if position is None:
            return None, why
        if self.replicator_broken:
            return None, self.replicator.describe()
        state = self.standby_migrations
        if state is not None and state.unknown:
            path = window_standby.standby_path(self.data_dir)
            return None, f'standby {path} {schema.describe_state(state)}'
        return position, ''

    @cached_property
    def standby_migrations(self) -> schema.MigrationState | None:
        labels = window_standby.standby_migrations(self.data_dir)
        return None if labels is None else file_migration_state(labels)

    @cached_property
    def backups(self) -> list[backup.BackupInfo]:
        return backup.list_backups(self.backup_dir)

    @cached_property
    def newest_verification(self) -> backup.BackupVerification | None:
        if not self.backups:
            return None
        return backup.verify_backup(self.backups[0].path)

    @cached_property
    def latest_verified(self) -> backup.BackupInfo | None:
        newest = self.newest_verification
        if newest is None:
            return None
        if newest.valid:
            return self.backups[0]
        return backup.latest_verified_backup(self.backup_dir, skip=1)

    def free_bytes(self) -> int:
        if self.free_bytes_override is not None:
            return self.free_bytes_override
        return shutil.disk_usage(self.data_dir).free

    def database_bytes(self) -> int:
        total = 0
        for suffix in ('', '-wal'):
            try:
                total += os.stat(f'{self.sqlite_path}{suffix}').st_size
            except FileNotFoundError:
                pass
        return total


Check = Callable[[ReadinessContext], ReadinessCheck]


def file_migration_state(labels: list[str]) -> schema.MigrationState:
    """The migrations a file records (`app.name`), held against this
    code's by Django's loader: unknown ones (the file is ahead: no
    rollback may use it) and pending ones (behind: the rollback
    migrates it forward in isolation). The same check as the rollback's
    and backup_database's (schema.migration_state)."""
    return schema.migration_state(schema.parse_labels(labels))


def _migrations_note(state: schema.MigrationState | None) -> str:
    if state is None or not state.pending:
        return ''
    return (f'; {len(state.pending)} migrations behind this code: a '
            'rollback migrates it forward in isolation')


# A backup dated further ahead than this is a finding, not fresh.
FUTURE_TOLERANCE = timedelta(minutes=5)


def _age(ctx: ReadinessContext, created_at: datetime) -> str:
    hours = (ctx.now - created_at).total_seconds() / 3600
    return f'{hours:.1f}h old'


def check_backup_fresh(ctx: ReadinessContext) -> ReadinessCheck:
    """A verified backup exists and is younger than max_age_hours."""
    name = 'backup_age'
    latest = ctx.latest_verified
    if latest is None:
        position, why = ctx.usable_standby
        # With PostgreSQL down a rollback restores a backup or the
        # standby: say when neither would do.
        standby = ('; with PostgreSQL down a rollback would restore the '
                   'standby' if position is not None else
                   f' and no usable standby ({why}): with PostgreSQL down '
                   'no rollback could run')
        return ReadinessCheck(name, False, f'no verified backup in '
                              f'{ctx.backup_dir}{standby}; run '
                              'backup_database')
    limit = timedelta(hours=ctx.max_age_hours)
    age = _age(ctx, latest.created_at)
    ahead = latest.created_at - ctx.now
    if ahead > FUTURE_TOLERANCE:
        # Never "fresh": its date says only that a clock was wrong, then
        # or now; the order of backups comes from their sequence.
        return ReadinessCheck(name, False, f'latest verified backup '
                              f'{latest.path.name} is dated in the future '
                              f'({latest.created_at.isoformat()}, '
                              f'{ahead.total_seconds() / 3600:.1f}h ahead '
                              'of this clock): check the clock, then run '
                              'backup_database')
    if ctx.now - latest.created_at > limit:
        return ReadinessCheck(name, False, f'latest verified backup '
                              f'{latest.path.name} is {age}, older than '
                              f'{ctx.max_age_hours:g}h')
    return ReadinessCheck(name, True, f'{latest.path.name} is {age}')


def check_backup_integrity(ctx: ReadinessContext) -> ReadinessCheck:
    """The newest backup passes verify_backup (a bad newest backup means
    the backup job itself is broken, even if an older one is fine)."""
    name = 'backup_integrity'
    verification = ctx.newest_verification
    if verification is None:
        return ReadinessCheck(name, False, 'no backup to check')
    if not verification.valid:
        return ReadinessCheck(name, False, f'{verification.path.name}: '
                              f'{verification.reasons[0]}')
    # (verify_backup refuses a backup ahead of this code: only a file
    # behind it is left to note.)
    labels = (verification.manifest or {}).get('migrations')
    state = (file_migration_state(labels) if isinstance(labels, list)
             else None)
    return ReadinessCheck(name, True, f'{verification.path.name}: sha256, '
                          f'integrity and row counts match'
                          f'{_migrations_note(state)}')


def check_disk_space(ctx: ReadinessContext) -> ReadinessCheck:
    """Free space in the data dir >= 3 x the live database: the rollback
    writes a new file beside it and keeps the old one."""
    size = ctx.database_bytes()
    try:
        free = ctx.free_bytes()
    except OSError as err:
        return ReadinessCheck('disk_space', False, f'cannot measure free '
                              f'space in {ctx.data_dir}: {err.strerror}')
    need = DISK_FACTOR * size
    detail = (f'{_mb(free)} free in {ctx.data_dir}, need {_mb(need)} '
              f'({DISK_FACTOR} x {_mb(size)} database)')
    return ReadinessCheck('disk_space', free >= need, detail)


def _mb(n: int) -> str:
    return f'{n / 1e6:.1f} MB'


def check_sqlite_writable(ctx: ReadinessContext) -> ReadinessCheck:
    """The live SQLite file and its folder can be written (the swap
    creates a file beside it and renames it over the old one)."""
    path = ctx.sqlite_path
    folder = path.parent
    if not folder.is_dir():
        return ReadinessCheck('sqlite_writable', False,
                              f'folder {folder} does not exist')
    if not os.access(folder, os.W_OK | os.X_OK):
        return ReadinessCheck('sqlite_writable', False,
                              f'folder {folder} is not writable')
    if path.exists() and not os.access(path, os.W_OK):
        return ReadinessCheck('sqlite_writable', False,
                              f'{path} is not writable')
    return ReadinessCheck('sqlite_writable', True, f'{path} is writable')


def check_postgres_reachable(ctx: ReadinessContext) -> ReadinessCheck:
    """Informational: a reachable PostgreSQL allows a zero-loss rollback
    from it; otherwise the rollback starts from the backup."""
    name = 'postgres_reachable'
    if ctx.postgres_alias is None:
        return ReadinessCheck(name, False, 'no PostgreSQL alias given',
                              informational=True)
    try:
        schema.check_connection(ctx.postgres_alias)
    except DatabaseDownError as err:
        return ReadinessCheck(name, False, f'{err}; a rollback would '
                              f'start from the backup', informational=True)
    except RollbackError as err:
        return ReadinessCheck(name, False, f'{err}; a rollback would '
                              'refuse until the setting is fixed (a bad '
                              'setting is not an outage)',
                              informational=True)
    return ReadinessCheck(name, True, f'{ctx.postgres_alias} answers: a '
                          'rollback from PostgreSQL is possible',
                          informational=True)


def check_pg_dump(ctx: ReadinessContext) -> ReadinessCheck:
    """pg_dump runs and can dump the server: the rollback dumps
    PostgreSQL before leaving it (pg_dump refuses a newer server)."""
    name = 'pg_dump'
    exe = shutil.which(ctx.pg_dump)
    if exe is None:
        return ReadinessCheck(name, False, f'{ctx.pg_dump} not found '
                              f'(setting ANTHIAS_PG_DUMP)')
    try:
        found = preserve.check_pg_dump_version(None, exe)
    except ConfigError as err:
        return ReadinessCheck(name, False, str(err))
    if ctx.postgres_alias is None:
        return ReadinessCheck(name, True, f'{found.client}; no PostgreSQL '
                              'alias to compare versions with')
    try:
        found = preserve.check_pg_dump_version(ctx.postgres_alias, exe)
    except ConfigError as err:
        return ReadinessCheck(name, False, str(err))
    except (DatabaseError, RollbackError) as err:
        return ReadinessCheck(name, True, f'{found.client}; server version '
                              f'not checked: {first_line(err)}')
    return ReadinessCheck(name, True, f'{found.client}; server is '
                          f'PostgreSQL {found.server_major}')


def check_lock(ctx: ReadinessContext) -> ReadinessCheck:
    """No other rollback or migration holds the operation lock."""
    holder = locking.read_lock_holder(ctx.data_dir)
    if holder is None:
        return ReadinessCheck('lock', True, 'no operation running')
    operation = holder.get('operation', 'an operation')
    return ReadinessCheck('lock', False, f'{operation} holds the lock (pid '
                          f'{holder.get("pid", "?")}, since '
                          f'{holder.get("started_at", "?")})')


def check_last_drill(ctx: ReadinessContext) -> ReadinessCheck:
    """The last rehearsal: date, result, measured rollback time. A failed
    last drill means the rollback itself is in doubt: not ready. Never
    drilled is reported, not held against the device."""
    name = 'last_drill'
    try:
        last = drill_history.last_drill(ctx.data_dir)
    except RollbackError as err:
        return ReadinessCheck(name, False, str(err))
    if last is None:
        return ReadinessCheck(name, True, 'no drill has run yet; run '
                              '`manage.py rollback_drill`',
                              informational=True)
    age = _age(ctx, last.finished_at)
    if not last.passed:
        return ReadinessCheck(name, False, f'last drill {last.outcome} '
                              f'({age}) at step {last.failed_step}: '
                              f'{last.error}')
    timing = (f'rollback took {last.rollback_seconds:.2f}s'
              if last.rollback_seconds is not None else 'no timing')
    return ReadinessCheck(name, True, f'last drill PASS ({age}); {timing}')


def check_cutover(ctx: ReadinessContext) -> ReadinessCheck:
    """Informational: when the device moved to PostgreSQL, and how many
    rows were written there since (what a backup-only rollback loses)."""
    from anthias_rollback.window import cutover as window_cutover

    recorded = window_cutover.read_cutover(ctx.data_dir)
    if recorded is None:
        return ReadinessCheck('cutover', True, 'no cutover recorded',
                              informational=True)
    reason = f'cutover to PostgreSQL at {recorded.get("cutover_at")}'
    if ctx.postgres_alias is not None:
        try:
            since = window_cutover.rows_since_cutover(ctx.postgres_alias,
                                                      recorded)
            new = sum(s.new_rows or 0 for s in since)
            changed = sum(abs(s.rows_now - (s.rows_at_cutover or 0))
                          for s in since)
            reason += (f'; since then {new} new rows by key, row counts '
                       f'moved by {changed} on PostgreSQL')
        except (RollbackError, DatabaseError):
            reason += '; PostgreSQL not readable for the rows since'
    return ReadinessCheck('cutover', True, reason, informational=True)


def check_window(ctx: ReadinessContext) -> ReadinessCheck:
    """The rollback window on PostgreSQL: journal size and age, fence
    state (a fence left up by a killed or finished rollback is named)."""
    from anthias_rollback.health import FENCE_MISSING
    from anthias_rollback.rollback import state as run_state
    from anthias_rollback.window import journal as window_journal

    if run_state.fence_pending(ctx.data_dir):
        return ReadinessCheck('window', False, FENCE_MISSING)
    if ctx.postgres_alias is None:
        return ReadinessCheck('window', True, 'PostgreSQL not configured',
                              informational=True)
    try:
        state = window_journal.window_state(ctx.postgres_alias)
    except (RollbackError, DatabaseError) as err:
        return ReadinessCheck('window', True, 'PostgreSQL not readable '
                              f'for the window: {first_line(err)}',
                              informational=True)
    if state.problems:
        return ReadinessCheck('window', False, '; '.join(state.problems))
    if not state.installed:
        return ReadinessCheck(
            'window', True, 'no change journal on PostgreSQL: a rollback '
            'from it cannot prove what it keeps', informational=True)
    reason = (f'journal since {state.cutover_at}: {state.entries} entries, '
              f'{state.bytes >> 10} KiB, triggers on {len(state.tables)} '
              f'tables; fence {state.fence}')
    if state.forced:
        reason += '; the cutover was FORCED past the row check'
    if state.fence == 'up':
        reason += (' (PostgreSQL refuses writes: a rollback took it; '
                   'switch_database --to postgres lifts it)')
    return ReadinessCheck('window', True, reason, informational=True)


def check_standby(ctx: ReadinessContext) -> ReadinessCheck:
    """The standby replicate_changes keeps (what a rollback with
    PostgreSQL down would restore) and how far behind: informational,
    but not ready when replicate_changes' last rounds failed (the
    standby stopped following) or the standby records migrations this
    code does not know (no rollback may use it)."""
    if ctx.replicator_broken:
        return ReadinessCheck('standby', False, ctx.replicator.describe())
    migrations = ctx.standby_migrations
    if migrations is not None and migrations.unknown:
        return ReadinessCheck(
            'standby', False, f'standby '
            f'{window_standby.standby_path(ctx.data_dir)} '
            f'{schema.describe_state(migrations)}: a rollback with '
            'PostgreSQL down cannot restore it; deploy the code that '
            'applied them, or switch_database --to postgres again for a '
            'new standby')
    state = window_standby.standby_state(ctx.data_dir, ctx.postgres_alias)
    if state.position is None:
        return ReadinessCheck('standby', False, state.problem or
                              'no standby: with PostgreSQL down, a rollback '
                              'restores a backup', informational=True)
    pending = (f', {state.pending} journal entries pending'
               if state.pending is not None else '')
    if state.lag_seconds is None:
        return ReadinessCheck('standby', False, f'standby at '
                              f'{state.position_at}{pending}: '
                              f'{state.problem}', informational=True)
    problem = f'; {state.problem}' if state.problem else ''
    health = ctx.replicator
    if ctx.window_expected and health.failing:   # PostgreSQL down
        problem += f'; {health.describe()}'
    return ReadinessCheck(
        'standby', True, f'standby at {state.position_at} '
        f'({state.lag_seconds:.1f}s behind{pending}){problem}'
        f'{_migrations_note(migrations)}', informational=True)


CHECKS: list[Check] = [
    check_backup_fresh,
    check_backup_integrity,
    check_disk_space,
    check_sqlite_writable,
    check_postgres_reachable,
    check_pg_dump,
    check_lock,
    check_last_drill,
    check_cutover,
    check_window,
    check_standby,
]


def check_readiness(*, data_dir: Path, sqlite_path: Path, backup_dir: Path,
                    postgres_alias: str | None, pg_dump: str = 'pg_dump',
                    max_age_hours: float = 24,
                    free_bytes: int | None = None,
                    now: datetime | None = None,
                    checks: list[Check] | None = None) -> ReadinessReport:
    """Run *checks* (default CHECKS) and say whether a rollback could run.

    Reads the backup dir and the live SQLite file's metadata, and
    connects to *postgres_alias* (SELECT 1, no transaction). *free_bytes*
    replaces the measured free space (tests). Raises RollbackError only
    when a check cannot run at all (e.g. the backup dir cannot be listed).
    """
    ctx = ReadinessContext(
        data_dir=data_dir, sqlite_path=sqlite_path, backup_dir=backup_dir,
        postgres_alias=postgres_alias, pg_dump=pg_dump,
        max_age_hours=max_age_hours, free_bytes=free_bytes,
        now=now or datetime.now(UTC))
    results = tuple(check(ctx) for check in (checks or CHECKS))
    ready = all(c.ok for c in results if not c.informational)
    latest = ctx.latest_verified
    return ReadinessReport(ready=ready, checks=results, checked_at=ctx.now,
                           latest_backup=latest.path if latest else None)
