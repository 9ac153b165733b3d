"""The rollback plan: back onto SQLite with nothing lost and nothing torn.

Phases, each timed, logged and reported:

1. preflight   lock, interrupted-swap recovery, live path, disk, profile
2. source      postgres (zero loss) or a verified backup; `auto` decides
3. fence       PostgreSQL stops accepting writes, so the snapshot is final
4. preserve    optional pg_dump of PostgreSQL into the backup dir
5. build       a NEW SQLite file beside the live one (migrate + copy, or
               the backup), at-risk rows exported when from a backup
6. verify      quick_check always; integrity, foreign keys, row counts
7. swap        swap.swap_in: old or new under the live path, never torn
8. profile     state file -> sqlite, restart command
9. post-verify /health and ANTHIAS_ROLLBACK_VERIFY_URLS through the app's
               own views on the restored file; Django's checks

Until the swap, every failure (or the deadline) leaves the live database
and the profile as they were. The module never prints; commands render
the returned RollbackResult.
"""
import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from django.core import checks as django_checks
from django.core import serializers
from django.core.management import call_command
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, connections
from django.db.migrations.loader import MigrationLoader
from django.test import Client

from anthias_rollback import (
    backup,
    compare,
    conf,
    engines,
    events,
    exit_codes,
    faults,
    fsutil,
    journal,
    locking,
    models_graph,
    preserve,
    profiles,
    schema,
    swap,
    switch,
    transfer,
    window,
)
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import (
    BackupError,
    ConfigError,
    DatabaseDownError,
    DatabaseUnavailableError,
    RollbackError,
)
from anthias_rollback.health import client_host
from anthias_rollback.phases import Deadline, PhaseResult, PhaseRunner
from anthias_rollback.report import (
    describe_alias,
    first_line,
    redact,
    write_json_report,
)

SOURCES = ('auto', 'postgres', 'backup')
STATE_NAME = 'rollback_state.json'
LOG_NAME = 'rollback.log'


@dataclass(frozen=True)
class RollbackOptions:
    source: str = 'auto'
    source_explicit: bool = False
    live_path: Path | None = None
    backup_path: Path | None = None
    postgres_alias: str = profiles.POSTGRES
    sqlite_alias: str = profiles.SQLITE
    emergency: bool = False
    dry_run: bool = False
    verify: bool = True
    preserve_postgres: bool = False
    fence: bool = True
    timeout_seconds: float = 300.0
    restart: bool = True
    batch_size: int = 10_000
    # None: the configured dirs. A drill points them at its sandbox.
    data_dir: Path | None = None
    backup_dir: Path | None = None


@dataclass(frozen=True)
class RollbackResult:
    outcome: str  # rolled back | dry run | follow-up failed | failed
    exit_code: int
    source: str | None
    source_reason: str
    live_path: str
    safety_copy: str | None
    backup_used: str | None
    postgres_dump: str | None
    at_risk_file: str | None
    at_risk_rows: dict[str, int] | None
    at_risk_note: str
    resurrected_rows: dict[str, int] | None
    rows: dict[str, int]
    since_cutover: dict[str, Any] | None
    phases: tuple[PhaseResult, ...]
    warnings: tuple[str, ...]
    error: str | None
    started_at: str
    finished_at: str
    seconds: float
    downtime_seconds: float | None
    report_path: str | None = None
    # The measured loss: 'proven-none' | 'lost' | 'unproven' | 'backup';
    # lost_writes lists what SQLite lacks (model, pk, operation).
    loss: str = 'unproven'
    loss_detail: str = ''
    lost_writes: tuple[dict, ...] = ()
    shortfall: dict[str, dict[str, int]] | None = None
    cutover_forced: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rows_at_risk(self) -> int | None:
        if self.at_risk_rows is None:
            return None
        return sum(self.at_risk_rows.values())


@dataclass
class _Run:
    """Mutable state of one run; turned into a RollbackResult at the end.
    Phases, warnings and the deadline are the shared PhaseRunner's."""
    options: RollbackOptions
    data_dir: Path
    runner: PhaseRunner
    live_path: Path | None = None
    source: str | None = None
    source_reason: str = ''
    safety_copy: Path | None = None
    backup_used: Path | None = None
    dump_path: Path | None = None
    at_risk_file: Path | None = None
    at_risk_rows: dict[str, int] | None = None
    at_risk_note: str = ''
    resurrected_rows: dict[str, int] | None = None
    rows: dict[str, int] = field(default_factory=dict)
    expected_rows: dict[str, int] = field(default_factory=dict)
    since_cutover: dict[str, Any] | None = None
    flipped_at: float | None = None
    fenced: bool = False
    swapped: bool = False
    journal: window.WindowState | None = None
    snapshot: str | None = None
    proof: window.LossProof | None = None
    shortfall: list[window.Shortfall] = field(default_factory=list)

    @property
    def deadline(self) -> Deadline:
        return self.runner.deadline

    @property
    def backup_dir(self) -> Path:
        return Path(self.options.backup_dir or conf.backup_dir())

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / 'reports'

    def phase(self, name: str, check_deadline: bool = True
              ) -> AbstractContextManager[dict[str, str]]:
        return self.runner.phase(name, check_deadline=check_deadline)

    def warn(self, message: str) -> None:
        self.runner.warn(message)


# -- small helpers -----------------------------------------------------

def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_NAME


def read_run_state(data_dir: Path) -> dict[str, Any]:
    """The last run's recorded state ({} when none or unreadable: it only
    tells preflight that a run was interrupted)."""
    try:
        return fsutil.read_json(state_path(data_dir), 'rollback state',
                                RollbackError) or {}
    except RollbackError:
        return {}


def write_run_state(data_dir: Path, status: str, **extra: Any) -> None:
    state = {'status': status,
             'at': datetime.now(timezone.utc).isoformat(), **extra}
    fsutil.atomic_write_json(state_path(data_dir), state, mode=0o600)


def code_migrations() -> set[str]:
    """Every migration the installed code knows, as `app.name`."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    return {f'{app}.{name}' for app, name in loader.graph.nodes}


def count_rows(alias: str) -> dict[str, int]:
    """Row count per label of every model the transfer moves (including
    `django_migrations`) on *alias*."""
    return {m._meta.label: m._base_manager.using(alias).count()
            for m in transfer.transfer_models()}


def close_connections_to(path: Path) -> None:
    """Close this process's connections to the SQLite file at *path*:
    after the rename they would keep reading the old inode."""
    target = Path(path).resolve()
    for conn in connections.all(initialized_only=True):
        name = conn.settings_dict.get('NAME')
        if name and engines.is_sqlite(conn.alias) and \
                Path(str(name)).resolve() == target:
            conn.close()


SCRATCH_KINDS = ('rollback-new', 'dry-run')


def new_file_path(live_path: Path, dry_run: bool) -> Path:
    kind = SCRATCH_KINDS[1] if dry_run else SCRATCH_KINDS[0]
    stamp = datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S_%f')
    return live_path.with_name(f'{live_path.name}.{kind}-{stamp}')


def remove_stale_scratch_files(live_path: Path) -> list[Path]:
    """Half-built files of a killed run (never live: the swap renames them
    away). Safe to delete: the caller holds the operation lock."""
    found = []
    for kind in SCRATCH_KINDS:
        for path in live_path.parent.glob(f'{live_path.name}.{kind}-*'):
            if path.name.endswith(tuple(swap.SIDE_FILES)):
                continue
            remove_sqlite_file(path)
            found.append(path)
    return found


def remove_sqlite_file(path: Path) -> None:
    for candidate in (path, *(swap.side_file(path, s)
                              for s in swap.SIDE_FILES)):
        candidate.unlink(missing_ok=True)


# -- phases ------------------------------------------------------------

def preflight(run: _Run) -> None:
    opts = run.options
    with run.phase('preflight') as record:
        recovery = swap.recover_interrupted_swap(
            opts.live_path or profiles.sqlite_alias_path(opts.sqlite_alias))
        if recovery.found:
            run.warn('an interrupted swap was found and cleared ('
                     + ('it had completed' if recovery.swapped else
                        'the live file is the old database') + ')')
        live = Path(opts.live_path or
                    profiles.sqlite_alias_path(opts.sqlite_alias))
        run.live_path = live
        stale = remove_stale_scratch_files(live)
        if stale:
            run.warn(f'removed {len(stale)} half-built file(s) of an '
                     f'interrupted run: {", ".join(p.name for p in stale)}')
        if not live.parent.is_dir():
            raise ConfigError(f'live SQLite directory {live.parent} does '
                              'not exist')
        try:
            fd, probe = tempfile.mkstemp(dir=live.parent, prefix='.probe-')
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ConfigError(f'live SQLite path {live} is not writable: '
                              f'{err.strerror}') from None
        if live.exists() and not os.access(live, os.W_OK):
            raise ConfigError(f'live SQLite file {live} is not writable')
        active = profiles.resolve_active_profile(run.data_dir)
        interrupted = read_run_state(run.data_dir).get('status') == 'running'
        if (active.name == profiles.SQLITE and not opts.source_explicit
                and not interrupted):
            raise ConfigError(
                f'the active profile is already sqlite (from '
                f'{active.source}); nothing to roll back. To rebuild the '
                'SQLite file anyway, pass --source postgres or --source '
                'backup')
        size = live.stat().st_size if live.exists() else 0
        free = shutil.disk_usage(live.parent).free
        needed = int(size * 1.5) + 16 * 1024 * 1024
        if free < needed:
            raise ConfigError(
                f'not enough free disk in {live.parent}: {free >> 20} MiB '
                f'free, about {needed >> 20} MiB needed for the new file')
        record['detail'] = (f'live {live} ({size >> 10} KiB), profile '
                            f'{active.name} from {active.source}, '
                            f'{free >> 20} MiB free')


def postgres_usable(run: _Run) -> tuple[bool, str]:
    """Can PostgreSQL be the source: answers, migrated, every table read.
    (False, why) only when the server is down or not serving; a setting
    to fix (bad password, missing database, invalid port, a malformed
    variable) raises: falling back to a backup would then silently drop
    every write since the cutover."""
    alias = run.options.postgres_alias
    try:
        schema.check_connection(alias)
        pending = schema.pending_migrations(alias)
        if pending:
            raise ConfigError(f'{describe_alias(alias)} has unapplied '
                              f'migrations ({", ".join(pending[:5])})')
        budget_ms = int(max(1.0, min(30.0, run.deadline.remaining() / 4))
                        * 1000)
        for model in models_graph.plan_models().models:
            engines.for_alias(alias).probe_table(alias, model, budget_ms)
        run.journal = window.window_state(alias)
        run.shortfall = window.account_cutover(alias)
    except DatabaseDownError as err:
        connections[alias].close()
        return False, first_line(err)
    except (RollbackError, DatabaseError) as err:
        connections[alias].close()
        if isinstance(err, DatabaseError) and engines.for_alias(
                alias).server_down(err):
            return False, first_line(err)
        raise ConfigError(
            f'PostgreSQL is not usable and this is not an outage: '
            f'{first_line(err)}; fix the setting (ANTHIAS_POSTGRES_URL, '
            'POSTGRES_*, --postgres-*) or restore a backup on purpose with '
            '--source backup; nothing was changed') from None
    if run.shortfall:
        shown = ', '.join(f'{s.model} {s.found} of {s.expected}'
                          for s in run.shortfall[:5])
        return False, (f'{describe_alias(alias)} lost rows that no '
                       f'journaled write removed ({shown} rows)')
    return True, (f'{describe_alias(alias)} answers and every table is '
                  'readable')


def choose_source(run: _Run) -> None:
    opts = run.options
    with run.phase('source') as record:
        if opts.source == 'backup':
            run.source = 'backup'
            run.source_reason = 'asked for (--source backup)'
        else:
            usable, why = postgres_usable(run)
            if opts.source == 'postgres' and run.shortfall:
                usable = True   # asked for: done, and the shortfall named
                run.warn(f'--source postgres: {why}')
            if opts.source == 'postgres' and not usable:
                raise DatabaseUnavailableError(
                    f'cannot roll back from PostgreSQL: {why}')
            if usable:
                asked = ('asked for (--source postgres); '
                         if opts.source == 'postgres' else '')
                run.source = 'postgres'
                run.source_reason = asked + why
            else:
                run.source = 'backup'
                run.source_reason = f'PostgreSQL not usable: {why}'
        if run.source == 'backup':
            run.backup_used = pick_backup(run)
        record['detail'] = f'{run.source}: {run.source_reason}'


def pick_backup(run: _Run) -> Path:
    """The backup to restore: --backup-path or the newest verified one."""
    if run.options.backup_path is not None:
        path = Path(run.options.backup_path)
        if not path.is_file():
            raise BackupError(f'backup {path} does not exist')
        return path
    directory = run.backup_dir
    info = backup.latest_verified_backup(directory)
    if info is None:
        raise BackupError(
            f'no verified backup in {directory} and PostgreSQL '
            'cannot be the source; nothing to roll back from')
    return info.path


def fence_postgres(run: _Run) -> None:
    """Stop every journaled write on PostgreSQL (all roles, all open
    sessions) and wait for the transactions that already wrote, so the
    copy's snapshot is final. Refuses (nothing changed, fence lowered)
    when some of them stay open past the budget."""
    opts = run.options
    if run.source != 'postgres' or opts.dry_run or not opts.fence:
        return
    with run.phase('fence') as record:
        if run.journal is None or not run.journal.installed:
            record['status'] = 'warning'
            record['detail'] = 'no change journal: writes cannot be fenced'
            run.warn('PostgreSQL has no change journal (the cutover was '
                     'made without one): writes during the rollback cannot '
                     'be stopped or counted; stop the app first')
            return
        write_run_state(run.data_dir, 'running', fence='up',
                        started_at=run.runner.started_at)
        budget = max(1.0, min(60.0, run.deadline.remaining() / 3))
        result = window.take_fence(opts.postgres_alias, budget)
        run.fenced = True
        if not result.taken:
            shown = ', '.join(f'pid {w["pid"]} ({w["user"]}, '
                              f'{w["state"]})' for w in result.still_open)
            raise RollbackError(
                f'{len(result.still_open)} PostgreSQL session(s) hold '
                f'uncommitted writes after {result.waited_seconds:.1f}s '
                f'({shown}); their commit could not be kept, so nothing was '
                'changed. End them (pg_terminate_backend as their owner or '
                'a superuser) and run again, or restore a backup with '
                '--source backup')
        ended = (f'; ended {len(result.terminated)} session(s)'
                 if result.terminated else '')
        record['detail'] = (f'writes refused for every role; in-flight '
                            f'writers done in {result.waited_seconds:.2f}s'
                            f'{ended}')


def lift_fence(run: _Run) -> None:
    """Before the swap, a failure changed nothing: let writes through."""
    if not run.fenced or run.swapped:
        return
    try:
        window.lower_fence(run.options.postgres_alias)
        run.fenced = False
        write_run_state(run.data_dir, 'failed', fence='open')
    except DatabaseError as err:
        run.warn(f'could not lower the write fence on PostgreSQL '
                 f'({first_line(err)}): run switch_database --to postgres '
                 'once it answers')


def prove_loss(run: _Run) -> None:
    """After the swap: which writes SQLite lacks, measured (the fence
    stays up, so the answer cannot change later)."""
    if run.source != 'postgres' or run.snapshot is None:
        return
    with run.phase('proof', check_deadline=False) as record:
        run.proof = window.prove_copy(run.options.postgres_alias,
                                      run.snapshot, run.rows)
        if run.proof.proven_none:
            record['detail'] = ('no write committed after the copy\'s '
                                'snapshot (' + ', '.join(run.proof.checked)
                                + ' checked)')
        else:
            record['status'] = 'failed'
            record['detail'] = (f'{len(run.proof.lost)} write(s) and '
                                f'{len(run.proof.count_differences)} '
                                'count difference(s) not in SQLite')


def preserve_postgres(run: _Run) -> None:
    opts = run.options
    if not opts.preserve_postgres:
        return
    with run.phase('preserve') as record:
        if opts.dry_run:
            record['status'] = 'skipped'
            record['detail'] = 'dry run: no dump written'
            return
        if preserve.find_pg_dump() is None:
            message = (f'pg_dump not found (ANTHIAS_PG_DUMP='
                       f'{conf.get_setting("ANTHIAS_PG_DUMP")})')
            if not opts.emergency:
                raise RollbackError(message + '; install it, or run with '
                                    '--emergency to skip preservation')
            record['status'] = 'skipped'
            record['detail'] = message
            run.warn(message + '; PostgreSQL was not preserved')
            return
        stamp = datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S')
        dest = run.backup_dir / f'postgresql_pre_rollback_{stamp}.dump'
        try:
            result = preserve.postgres_dump(
                opts.postgres_alias, dest,
                timeout=max(5.0, run.deadline.remaining()))
        except RollbackError as err:
            if not opts.emergency:
                raise
            record['status'] = 'warning'
            record['detail'] = str(err)
            run.warn(f'{err}; continuing (--emergency)')
            return
        run.dump_path = result.path
        record['detail'] = f'{result.path} ({result.size >> 10} KiB)'


def build_from_postgres(run: _Run, new_path: Path) -> None:
    opts = run.options

    def on_progress(event: events.ProgressEvent) -> None:
        run.runner.emit(event.kind, event.name, rows=event.rows,
                        total=event.total, seconds=event.seconds)
        if event.kind == events.MODEL_DONE:
            faults.checkpoint(f'rollback:copied-{event.name}')
        run.deadline.check('the copy from PostgreSQL')

    with profiles.sqlite_file_alias(new_path) as alias:
        call_command('migrate', database=alias, verbosity=0,
                     interactive=False)
        faults.checkpoint('rollback:schema-created')
        # Also raises sqlite_sequence to PostgreSQL's sequences, so no id
        # PostgreSQL handed out is reused after the rollback.
        with contextlib.ExitStack() as stack:
            if run.journal is not None and run.journal.installed:
                run.snapshot = stack.enter_context(
                    window.snapshot_transaction(opts.postgres_alias))
                faults.checkpoint('rollback:snapshot-taken')
            result = transfer.transfer_data(
                opts.postgres_alias, alias, batch_size=opts.batch_size,
                progress=on_progress)
        run.expected_rows = {m.label: m.rows for m in result.models}
    run.rows = dict(run.expected_rows)


def build_from_backup(run: _Run, new_path: Path) -> None:
    checked = backup.verify_backup(run.backup_used)
    # A backup without a manifest (older tools) cannot be checksummed; an
    # operator who names one with --backup-path gets it if everything
    # else checks out (integrity, foreign keys, schema below).
    only_unverified = (not checked.has_manifest
                       and len(checked.reasons) == 1
                       and run.options.backup_path is not None)
    if not checked.valid and not only_unverified:
        raise BackupError(f'backup {run.backup_used} is not valid: '
                          f'{"; ".join(checked.reasons)}')
    if not checked.has_manifest:
        run.warn(f'backup {run.backup_used} has no manifest: checked for '
                 'integrity only, no checksum')
    sqlite_file.sqlite_snapshot(run.backup_used, new_path,
                           timeout=max(1.0, run.deadline.remaining()))
    with profiles.sqlite_file_alias(new_path) as alias:
        applied = {f'{a}.{n}' for a, n in schema.applied_migrations(alias)}
        known = code_migrations()
        unknown, missing = applied - known, known - applied
        if unknown or missing:
            detail = '; '.join(filter(None, [
                f'unknown to this code: {", ".join(sorted(unknown)[:5])}'
                if unknown else '',
                f'not applied in the backup: '
                f'{", ".join(sorted(missing)[:5])}' if missing else '']))
            raise BackupError(f'backup {run.backup_used} does not match '
                              f'this code\'s schema ({detail})')
        run.rows = count_rows(alias)
        run.expected_rows = dict(run.rows)
        at_risk_rows(run, alias)


def at_risk_rows(run: _Run, backup_alias: str) -> None:
    """Rows on PostgreSQL that the backup lacks or holds differently,
    exported as a loaddata fixture; deleted-on-PostgreSQL rows counted."""
    pg = run.options.postgres_alias
    try:
        schema.check_connection(pg)
        found = compare.find_at_risk_keys(
            backup_alias, pg, timeout=max(5.0, run.deadline.remaining()))
    except (RollbackError, DatabaseError) as err:
        connections[pg].close()
        run.at_risk_note = ('could not be computed: PostgreSQL is not '
                            f'usable ({first_line(err)})')
        run.warn(f'at-risk rows {run.at_risk_note}')
        return
    keys, resurrected = found.keys, found.resurrected
    run.at_risk_rows = {label: len(pks) for label, pks in keys.items()}
    run.resurrected_rows = resurrected
    if keys and not run.options.dry_run:
        run.at_risk_file = export_rows(pg, keys, run.reports_dir)
    total = sum(run.at_risk_rows.values())
    run.at_risk_note = (f'{total} rows written on PostgreSQL after the '
                        'backup' + (f', exported to {run.at_risk_file}'
                                    if run.at_risk_file else ''))


def export_rows(alias: str, keys: dict[str, list[Any]],
                directory: Path) -> Path:
    """Write the rows with these keys as a `loaddata` JSON fixture (0600).

    Keys are fetched in chunks far below SQLite's/PostgreSQL's parameter
    limits; the file appears under its final name only when complete.
    """
    fsutil.ensure_private_dir(directory)
    stamp = datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S')
    path = directory / f'at_risk_rows_{stamp}.json'
    objects: list[Any] = []
    order = [m._meta.label for m in models_graph.plan_models().models]
    for label in sorted(keys, key=lambda lb: order.index(lb)
                        if lb in order else len(order)):
        model = models_graph.get_model(label)
        pks = keys[label]
        for start in range(0, len(pks), 500):
            objects.extend(model._base_manager.using(alias).filter(
                pk__in=pks[start:start + 500]).order_by('pk'))
    rows = serializers.serialize('python', objects)
    text = json.dumps(rows, cls=ExactJSONEncoder, indent=1,
                      ensure_ascii=False)
    fsutil.atomic_write_bytes(path, text.encode(), mode=0o600)
    return path


class ExactJSONEncoder(DjangoJSONEncoder):
    """DjangoJSONEncoder cuts datetimes and times to milliseconds (its
    ECMA-262 format); an exported row must come back exactly, and
    loaddata parses full ISO 8601."""

    def default(self, o: Any) -> Any:
        if isinstance(o, (dt.datetime, dt.time)):
            return o.isoformat()
        return super().default(o)


def build_new_file(run: _Run) -> Path:
    new_path = new_file_path(run.live_path, run.options.dry_run)
    with run.phase('build') as record:
        try:
            if run.source == 'postgres':
                build_from_postgres(run, new_path)
            else:
                build_from_backup(run, new_path)
        except BaseException:
            remove_sqlite_file(new_path)
            raise
        total = sum(run.rows.values())
        record['detail'] = (f'{total} rows in {len(run.rows)} models '
                            f'from {run.source} into {new_path.name}')
    return new_path


def verify_new_file(run: _Run, new_path: Path) -> None:
    opts = run.options
    with run.phase('verify') as record:
        quick = sqlite_file.sqlite_quick_check(new_path)
        if quick != 'ok':
            raise RollbackError(f'new file {new_path} fails quick_check: '
                                f'{quick}')
        done = ['quick_check']
        if opts.verify and not opts.emergency:
            problems = sqlite_file.sqlite_full_check(new_path)
            if problems:
                raise RollbackError(f'new file {new_path} fails its '
                                    f'checks: {problems[0]}')
            done += ['integrity_check', 'foreign_key_check']
        if opts.verify or opts.emergency:
            with profiles.sqlite_file_alias(new_path) as alias:
                found = count_rows(alias)
            wrong = {label: (found.get(label), n)
                     for label, n in run.expected_rows.items()
                     if found.get(label) != n}
            if wrong:
                label, (got, want) = next(iter(wrong.items()))
                raise RollbackError(f'new file {new_path}: {label} has '
                                    f'{got} rows, the source {want}')
            done.append('row counts')
        else:
            record['status'] = 'warning'
            run.warn('--no-verify: only quick_check was run')
        record['detail'] = ', '.join(done)


def swap_and_flip(run: _Run, new_path: Path) -> switch.RestartResult | None:
    """Swap the file in and make sqlite the active profile."""
    opts = run.options
    with run.phase('swap') as record:
        close_connections_to(run.live_path)
        result = swap.swap_in(new_path, run.live_path)
        run.swapped = True
        run.safety_copy = result.safety_copy
        record['detail'] = (f'safety copy of the old database: '
                            f'{result.safety_copy}' if result.safety_copy
                            else 'there was no old database')
    with run.phase('profile', check_deadline=False) as record:
        profiles.write_active_profile(
            run.data_dir, profiles.SQLITE,
            {'previous': profiles.POSTGRES, 'reason': 'rollback'})
        run.flipped_at = time.monotonic()
        restart = switch.restart_after_flip() if opts.restart else None
        record['detail'] = 'active profile: sqlite'
        if restart is not None:
            record['detail'] += (f'; restart command exit '
                                 f'{restart.returncode}')
            if not restart.ok:
                record['status'] = 'failed'
                run.warn(f'restart command failed: {restart.output}')
    return restart


def verify_urls() -> list[str]:
    return ['/health'] + [u for u in conf.get_list_setting(
        'ANTHIAS_ROLLBACK_VERIFY_URLS') if u != '/health']


def post_verify(run: _Run) -> bool:
    """Requests through the app's own views on the restored file."""
    with run.phase('post-verify', check_deadline=False) as record:
        failures = []
        with profiles.sqlite_file_alias(run.live_path, wal=True) as alias, \
                profiles.default_as(alias):
            client = Client(HTTP_HOST=client_host())
            for url in verify_urls():
                try:
                    response = client.get(url)
                    if response.status_code != 200:
                        failures.append(f'{url} -> HTTP '
                                        f'{response.status_code}')
                except Exception as err:  # noqa: BLE001  a view's crash is a verdict
                    failures.append(f'{url} -> {first_line(err)}')
            errors = [m for m in django_checks.run_checks(
                databases=[alias]) if m.is_serious()]
            failures += [f'check {m.id}: {m.msg}' for m in errors]
        record['detail'] = (f'{len(verify_urls())} URLs, Django checks'
                            + (': ' + '; '.join(failures) if failures
                               else ': ok'))
        if failures:
            record['status'] = 'failed'
            for failure in failures:
                run.warn(f'post-verification: {failure}')
        return not failures


def cutover_summary(run: _Run) -> None:
    recorded = journal.read_cutover(run.data_dir)
    if recorded is None or run.source != 'postgres':
        return
    try:
        since = journal.rows_since_cutover(run.options.postgres_alias,
                                           recorded)
    except (RollbackError, DatabaseError):
        return
    run.since_cutover = {
        'cutover_at': recorded.get('cutover_at'),
        'models': {s.label: {'rows_at_cutover': s.rows_at_cutover,
                             'rows_now': s.rows_now,
                             'new_rows': s.new_rows}
                   for s in since if s.rows_at_cutover != s.rows_now
                   or s.new_rows},
    }


# -- the plan ----------------------------------------------------------

def run_rollback(options: RollbackOptions,
                 progress: events.Progress = None) -> RollbackResult:
    """Roll back onto SQLite. See the module docstring for the phases.

    Reads the `postgres` alias (or options.postgres_alias) and/or a backup
    file; writes a new SQLite file beside the live one, swaps it in,
    writes the profile state file, the report and the rollback log. Holds
    the operation lock throughout. Raises RollbackError (LockHeldError,
    ConfigError, BackupError, DeadlineError, ...) when refused or failed
    before the swap: then the live database and profile are unchanged,
    and the error carries `report_path`. Returns a result whose exit_code
    is 0 (done and verified) or 4 (swapped, a follow-up failed).
    """
    if options.source not in SOURCES:
        raise ConfigError(f'unknown source {options.source!r}')
    if options.timeout_seconds <= 0:
        raise ConfigError('the deadline must be positive')
    data_dir = Path(options.data_dir or conf.data_dir())
    data_dir.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(options.timeout_seconds,
                        'deadline of {seconds:.0f}s reached during {what}; '
                        'stopped before touching the live database')
    run = _Run(options, data_dir, PhaseRunner(
        deadline, progress, log_path=data_dir / LOG_NAME,
        checkpoint='rollback'))
    with locking.operation_lock(data_dir, 'rollback_migration'):
        faults.checkpoint('rollback:locked')
        try:
            return _execute(run)
        except (RollbackError, DatabaseError, OSError) as err:
            lift_fence(run)
            if run.swapped:
                # The new database is live; what failed came after. Say
                # so with exit 4 instead of pretending nothing changed.
                run.warn(f'after the swap: {first_line(err)}')
                return finish(run, 'follow-up failed',
                              exit_codes.FOLLOW_UP, error=first_line(err))
            result = finish(run, 'failed', exit_codes.FAILED,
                            error=first_line(err))
            err.report_path = result.report_path
            raise
        except BaseException:
            lift_fence(run)
            raise


def _execute(run: _Run) -> RollbackResult:
    opts = run.options
    preflight(run)
    if not opts.dry_run:
        write_run_state(run.data_dir, 'running',
                        started_at=run.runner.started_at)
    choose_source(run)
    cutover_summary(run)
    fence_postgres(run)
    preserve_postgres(run)
    new_path = build_new_file(run)
    try:
        verify_new_file(run, new_path)
        run.deadline.check('the swap')
    except BaseException:
        remove_sqlite_file(new_path)
        raise
    if opts.dry_run:
        remove_sqlite_file(new_path)
        return finish(run, 'dry run', exit_codes.OK)
    restart = swap_and_flip(run, new_path)
    # The fence stays up: no stale process may write into PostgreSQL now
    # that nobody reads it (switch_database --to postgres lifts it).
    prove_loss(run)
    verified = post_verify(run)
    write_run_state(run.data_dir, 'done', fence='up' if run.fenced else
                    'none', finished_at=datetime.now(
                        timezone.utc).isoformat())
    if not verified or (restart is not None and not restart.ok):
        return finish(run, 'follow-up failed', exit_codes.FOLLOW_UP)
    loss, _ = measured_loss(run)
    if run.source == 'postgres' and loss != 'proven-none':
        return finish(run, 'rolled back with a loss', exit_codes.FOLLOW_UP)
    return finish(run, 'rolled back', exit_codes.OK)


def measured_loss(run: _Run) -> tuple[str, str]:
    """('proven-none' | 'lost' | 'unproven' | 'backup', one line)."""
    if run.source != 'postgres':
        return 'backup', ''
    if run.shortfall:
        shown = '; '.join(f'{s.model}: {s.found} rows, {s.expected} '
                          'expected' for s in run.shortfall[:5])
        return 'lost', (f'PostgreSQL had lost rows before the rollback '
                        f'that no journaled write removed ({shown})')
    if run.proof is None:
        return 'unproven', ('not proven: PostgreSQL has no change journal '
                            '(cutover made without one), so writes made '
                            'during the rollback cannot be counted')
    if run.proof.proven_none:
        return 'proven-none', ('none (proven: no write committed after the '
                               'copy\'s snapshot; journal, row versions '
                               'and row counts checked)')
    parts = [f'{w.model} pk={w.pk} {w.operation}'
             for w in run.proof.lost[:10]]
    parts += [f'{label}: {copied} rows copied, {now} on PostgreSQL'
              for label, (copied, now) in
              run.proof.count_differences.items()]
    more = len(run.proof.lost) - 10
    return 'lost', (f'{len(run.proof.lost)} write(s) not in SQLite: '
                    + '; '.join(parts)
                    + (f' (and {more} more in the report)' if more > 0
                       else ''))


def finish(run: _Run, outcome: str, code: int,
           error: str | None = None) -> RollbackResult:
    """Build the result and write the JSON + text report (0600)."""
    now = time.monotonic()
    result = RollbackResult(
        outcome=outcome, exit_code=code, source=run.source,
        source_reason=run.source_reason,
        live_path=str(run.live_path or ''),
        safety_copy=str(run.safety_copy) if run.safety_copy else None,
        backup_used=str(run.backup_used) if run.backup_used else None,
        postgres_dump=str(run.dump_path) if run.dump_path else None,
        at_risk_file=str(run.at_risk_file) if run.at_risk_file else None,
        at_risk_rows=run.at_risk_rows,
        at_risk_note=run.at_risk_note,
        resurrected_rows=run.resurrected_rows, rows=run.rows,
        since_cutover=run.since_cutover, phases=tuple(run.runner.phases),
        warnings=tuple(run.runner.warnings), error=error,
        started_at=run.runner.started_at,
        finished_at=datetime.now(timezone.utc).isoformat(),
        seconds=round(now - run.runner.started, 3),
        downtime_seconds=(round(run.flipped_at - run.runner.started, 3)
                          if run.flipped_at else None),
        loss=measured_loss(run)[0], loss_detail=measured_loss(run)[1],
        lost_writes=tuple(asdict(w) for w in run.proof.lost)
        if run.proof else (),
        shortfall={s.model: {'expected': s.expected, 'found': s.found}
                   for s in run.shortfall} or None,
        cutover_forced=bool(run.journal and run.journal.forced))
    stamp = datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S_%f')
    path = run.reports_dir / f'rollback_{stamp}.json'
    result = replace(result, report_path=str(path))
    write_json_report(path, result.as_dict())
    fsutil.atomic_write_bytes(path.with_suffix('.txt'),
                              redact(render_summary(result)).encode(),
                              mode=0o600)
    return result


def latest_report(reports_dir: Path) -> Path | None:
    found = sorted(Path(reports_dir).glob('rollback_*.json'))
    return found[-1] if found else None


def load_result(path: Path) -> RollbackResult:
    data = json.loads(Path(path).read_text())
    data['phases'] = tuple(PhaseResult(**p) for p in data['phases'])
    data['warnings'] = tuple(data['warnings'])
    return RollbackResult(**data)


# -- rendering (plain text; commands add colour) -----------------------

def data_loss_line(result: RollbackResult) -> str:
    """The loss as measured in the run (never assumed)."""
    if result.source == 'postgres':
        return result.loss_detail or 'not proven (no proof recorded)'
    if result.at_risk_rows is None:
        return ('UNKNOWN: restored from a backup and PostgreSQL could not '
                'be compared; writes made after the backup may be lost')
    total = result.rows_at_risk or 0
    where = f', saved in {result.at_risk_file}' if result.at_risk_file \
        else ''
    return f'{total} rows at risk (written after the backup{where})'


def render_summary(result: RollbackResult) -> str:
    lines = [f'Rollback {result.outcome.upper()} in {result.seconds:.2f}s',
             f'  live database: {result.live_path}',
             f'  source:        {result.source} ({result.source_reason})']
    if result.backup_used:
        lines.append(f'  backup used:   {result.backup_used}')
    if result.safety_copy:
        lines.append(f'  safety copy:   {result.safety_copy}')
    if result.postgres_dump:
        lines.append(f'  pg_dump:       {result.postgres_dump}')
    lines.append(f'  data loss:     {data_loss_line(result)}')
    if result.resurrected_rows:
        lines.append('  deleted on PostgreSQL but back from the backup: '
                     + ', '.join(f'{k} {v}' for k, v in
                                 result.resurrected_rows.items()))
    if result.since_cutover and result.since_cutover.get('models'):
        lines.append(f'  since the cutover at '
                     f'{result.since_cutover["cutover_at"]}:')
        for label, m in result.since_cutover['models'].items():
            lines.append(f'    {label}: {m["rows_at_cutover"]} -> '
                         f'{m["rows_now"]} rows'
                         + (f' ({m["new_rows"]} new)' if m['new_rows']
                            else ''))
    lines.append('  phases:')
    for p in result.phases:
        lines.append(f'    {p.name:<12} {p.status:<8} {p.seconds:7.3f}s  '
                     f'{p.detail}')
    if result.rows:
        lines.append(f'  rows: {sum(result.rows.values())} in '
                     f'{len(result.rows)} models')
    for warning in result.warnings:
        lines.append(f'  WARNING: {warning}')
    if result.error:
        lines.append(f'  ERROR: {result.error}')
    if result.report_path:
        lines.append(f'  report: {result.report_path}')
    return '\n'.join(lines) + '\n'


def urgent_notice(reason: str, started_at: str) -> str:
    return (
        'URGENT: Database Migration Rollback Required\n\n'
        f'Issue: {reason}\n'
        'Impact: the app is being moved back onto SQLite; screens keep '
        'their cached content, edits are paused\n'
        f'Action Taken: rollback_migration started at {started_at}\n')


def resolved_notice(result: RollbackResult) -> str:
    downtime = (f'{result.downtime_seconds:.1f}s'
                if result.downtime_seconds is not None else 'unknown')
    return (
        'RESOLVED: Database Migration Rollback Completed\n\n'
        f'Resolution: service restored to the SQLite database '
        f'{result.live_path}\n'
        f'Source: {result.source} ({result.source_reason})\n'
        f'Downtime: {downtime}\n'
        f'Data Loss: {data_loss_line(result)}\n'
        f'Safety copy of the replaced database: {result.safety_copy}\n'
        f'Report: {result.report_path}\n')
