"""The rollback rehearsed end to end in a sandbox: PASS or FAIL, timed.

Steps, each timed and reported (setup steps failing = the drill could
not run, exit 1; loop steps failing = FAIL, exit 3):

1. preflight  options, no live operation running, the PostgreSQL server
              (configured, or a throwaway embedded one), scratch name
2. sandbox    a fresh private directory (temp dir, or inside --workdir)
3. copy|seed  the live SQLite file copied with the backup API, reading
              only; or N generated rows per model through the ORM
4. backup     create_backup + verify_backup of the sandbox file
5. create-db  CREATE DATABASE anthias_drill_<stamp>_<pid>_<n>
6. schema     migrate the scratch database, same migrations as SQLite
7. transfer   transfer_data sandbox -> scratch PostgreSQL
8. validate   compare_aliases sandbox vs scratch: must be 100 %
9. writes     production-like creates, edits, deletes on PostgreSQL
10. profile   the sandbox's profile state -> postgres
11. rollback  run_rollback(emergency, source postgres) on the sandbox
12. verify    compare_aliases restored file vs scratch: must be 100 %,
              and every simulated write is there
13. cleanup   drop the scratch database, stop the embedded server,
              delete the sandbox (unless keep)

Nothing live is written: the live SQLite file is only read, the live
profile, lock, backups and reports are never touched. The drill's own
report and history go to <data dir>/drills/ (drill.history, which also
defines the returned DrillResult). The module never prints; the command
renders the result. Generated rows come from `drill.seeder`, the server
from `engines.postgres_server`, the sandbox copy from
`engines.sqlite_file`; the run scaffold is `phases`.
"""
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.apps import apps
from django.db import DatabaseError, connections

from anthias_rollback import (
    backup,
    compare,
    conf,
    events,
    exit_codes,
    fsutil,
    locking,
    logs,
    models_graph,
    phases,
    profiles,
    rollback,
    routers,
    schema,
    schema_build,
    transfer,
)
from anthias_rollback.drill import seeder as drill_seeder
from anthias_rollback.drill.history import (
    ERROR,
    FAIL,
    PASS,
    DrillResult,
    drills_dir,
    record_drill,
)
from anthias_rollback.engines import postgres_server as pg
from anthias_rollback.engines.sqlite_file import sqlite_copy_readonly
from anthias_rollback.exceptions import (
    ConfigError,
    DeadlineError,
    DrillError,
    RollbackError,
)
from anthias_rollback.report import (
    describe_alias,
    first_line,
    redact,
)
from anthias_rollback.window import journal as window_journal

SANDBOX_DB_NAME = 'anthias.db'
DEFAULT_SEED_ROWS = 1000
DEFAULT_TIMEOUT_SECONDS = 30 * 60
SETUP, LOOP = 'setup', 'loop'
# The drill's deadline text (tests and operators grep for it).
EXPIRED = 'the drill ran past its {seconds:g}s limit before {what}'
# What fails a step (setup: ERROR, loop: FAIL) instead of the drill.
STEP_ERRORS = (RollbackError, DatabaseError, OSError, sqlite3.Error)


@dataclass(frozen=True)
class DrillOptions:
    seed_rows: int | None = None      # None: copy the live file
    # None: the configured server, an embedded one if it does not answer;
    # True: always embedded; False: never embedded.
    embedded: bool | None = None
    workdir: Path | None = None
    keep: bool = False
    batch_size: int = transfer.DEFAULT_BATCH_SIZE
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    live_path: Path | None = None     # None: the sqlite alias's file
    postgres_alias: str = profiles.POSTGRES
    data_dir: Path | None = None      # None: conf.data_dir()


class _StepFailed(Exception):
    """Raised by a failed step to skip the rest of the loop."""


@dataclass
class DrillRun:
    """One drill's state; `runner` times the steps and sends the events."""
    options: DrillOptions
    data_dir: Path
    runner: phases.PhaseRunner
    outcome: str = PASS
    failed_step: str | None = None
    error: str | None = None
    source: str = ''
    rows: dict[str, int] = field(default_factory=dict)
    server: pg.PostgresServer | None = None
    scratch_name: str = ''
    scratch_created: bool = False
    postgres: str = ''
    sandbox: Path | None = None
    writes: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollback_result: rollback.RollbackResult | None = None

    def remaining(self) -> float:
        return self.runner.deadline.remaining()

    @contextmanager
    def step(self, name: str, group: str, check_deadline: bool = True
             ) -> Iterator[dict[str, Any]]:
        """One timed step; a STEP_ERRORS error inside fails it (setup:
        ERROR, loop: FAIL) and skips the later ones."""
        try:
            # The deadline is checked inside the phase so that running
            # out of time is a failed step in the report, not a crash.
            with self.runner.phase(name, group,
                                   check_deadline=False) as record:
                if check_deadline:
                    self.runner.deadline.check(name)
                yield record
        except STEP_ERRORS as err:
            if self.failed_step is None:
                self.failed_step = name
                self.error = redact(first_line(err))
                self.outcome = ERROR if group == SETUP else FAIL
            raise _StepFailed(name) from None


# -- preflight: options, live lock --------------------------------------

def check_options(options: DrillOptions, data_dir: Path) -> None:
    """ConfigError for unusable options, before anything is created."""
    if options.seed_rows is not None and options.seed_rows < 1:
        raise ConfigError('--seed must be at least 1')
    if options.batch_size < 1:
        raise ConfigError('--batch-size must be at least 1')
    if options.timeout_seconds <= 0:
        raise ConfigError('the time limit must be positive')
    if options.workdir is not None:
        workdir = Path(options.workdir).expanduser().resolve()
        live_dir = Path(data_dir).expanduser().resolve()
        if workdir == live_dir or live_dir in workdir.parents:
            raise ConfigError(
                f'--workdir {workdir} is inside the live data dir '
                f'{live_dir}; the drill never writes there (use a '
                'directory outside it)')
        if workdir.exists() and not workdir.is_dir():
            raise ConfigError(f'--workdir {workdir} is not a directory')


def check_no_live_operation(data_dir: Path) -> None:
    """DrillError when a migration or rollback holds the live lock (a
    drill then would only compete with it for disk and CPU)."""
    holder = locking.read_lock_holder(data_dir)
    if holder is not None:
        raise DrillError(
            f'{holder.get("operation", "another operation")} (pid '
            f'{holder.get("pid", "?")}) holds the lock in {data_dir}; '
            'run the drill when it is done')


# -- counts and comparisons ---------------------------------------------

def count_model_rows(alias: str) -> dict[str, int]:
    """Rows per model the transfer moves, django_migrations left out
    (rollback.count_rows counts it too)."""
    return {m._meta.label: m._base_manager.using(alias).count()
            for m in models_graph.plan_models().models}


def excluded_rows(alias: str) -> dict[str, int]:
    """Rows in models ANTHIAS_ROLLBACK_EXCLUDE leaves out: a rollback
    would not bring them back."""
    excluded = set(conf.get_list_setting('ANTHIAS_ROLLBACK_EXCLUDE'))
    if not excluded:
        return {}
    found = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy or not meta.managed or meta.swapped:
            continue
        if models_graph.is_excluded(model, excluded):
            try:
                rows = model._base_manager.using(alias).count()
            except DatabaseError:
                continue
            if rows:
                found[meta.label] = rows
    return found


def require_identical(report: compare.CompareReport, what: str) -> str:
    """DrillError unless the comparison is complete and 100 %."""
    if not report.complete:
        raise DeadlineError(f'{what}: comparison stopped '
                            f'({report.stopped_reason})')
    if not report.ok or report.integrity < 100.0:
        worst = next((m for m in report.models if not m.ok), None)
        if worst is None:
            raise DrillError(f'{what}: {report.integrity:.2f} % identical')
        raise DrillError(
            f'{what}: {report.integrity:.2f} % identical; {worst.label}: '
            f'{worst.left_rows} vs {worst.right_rows} rows, '
            f'{len(worst.missing_keys)} missing, {len(worst.extra_keys)} '
            f'extra, {len(worst.changed)} changed')
    return (f'100 % identical: {report.left_rows} rows in '
            f'{len(report.models)} models ({report.seconds:.2f}s)')


# -- the drill -----------------------------------------------------------

def run_drill(options: DrillOptions,
              progress: events.Progress = None) -> DrillResult:
    """Rehearse migrate -> write -> rollback in a sandbox. See the module
    docstring for the steps.

    Reads the live SQLite file (read-only) and the `postgres` alias's
    server (or starts an embedded one); creates and drops one scratch
    database there; writes only the sandbox and <data dir>/drills/ (the
    JSON report, 0600, and history.jsonl). Raises ConfigError for bad
    options and LockHeldError when another drill runs; every other
    problem is a failed step in the returned result (outcome PASS, FAIL
    or ERROR with exit_code 0, 3 or 1). *progress* receives
    events.ProgressEvents: the drill's steps (group setup | loop), its
    warnings, and its rollback's phase-done events (group rollback).
    """
    data_dir = Path(options.data_dir or conf.data_dir())
    check_options(options, data_dir)
    drills = fsutil.ensure_private_dir(drills_dir(data_dir))
    runner = phases.PhaseRunner(
        phases.Deadline(options.timeout_seconds, expired=EXPIRED),
        progress=progress, name='drill')
    run = DrillRun(options, data_dir, runner)
    # Templates of the live data dir are read, never written: the drill
    # writes only its sandbox and drills/.
    with locking.operation_lock(drills, 'rollback_drill'), \
            schema_build.templates_read_only():
        try:
            _execute(run)
        except _StepFailed:
            pass
        finally:
            _cleanup(run)
        return _finish(run)


def _execute(run: DrillRun) -> None:
    opts = run.options
    with run.step('preflight', SETUP) as record:
        check_no_live_operation(run.data_dir)
        run.scratch_name = pg.postgres_scratch_name()
        if not opts.embedded:
            settings_dict = connections[opts.postgres_alias].settings_dict
            pg.postgres_check_scratch_name(run.scratch_name,
                               str(settings_dict.get('NAME') or ''),
                               describe_alias(opts.postgres_alias))
        run.server = pg.postgres_choose_server(
            opts.postgres_alias, opts.embedded, run.runner.warn)
        record['detail'] = (f'{run.server.description}; scratch database '
                            f'{run.scratch_name}')
    with run.step('sandbox', SETUP) as record:
        parent = opts.workdir
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        run.sandbox = Path(tempfile.mkdtemp(prefix='anthias-drill-',
                                            dir=parent))
        record['detail'] = str(run.sandbox)
    sandbox_db = run.sandbox / SANDBOX_DB_NAME
    make_sandbox_database(run, sandbox_db)
    with run.step('backup', LOOP) as record:
        made = backup.create_backup(sandbox_db, run.sandbox / 'backups')
        checked = backup.verify_backup(made.path)
        if not checked.valid:
            raise DrillError(f'backup {made.path} failed its check: '
                             f'{"; ".join(checked.reasons)}')
        record['detail'] = (f'{made.path.name} ({made.size >> 10} KiB, '
                            f'sha256 {made.sha256[:12]}), verified')
    with run.step('create-db', SETUP) as record:
        pg.postgres_create_database(run.server, run.scratch_name)
        run.scratch_created = True
        record['detail'] = f'{run.scratch_name} ({run.server.kind} server)'
    with pg.postgres_server_alias(run.server, run.scratch_name) as scratch:
        run.postgres = describe_alias(scratch)
        migrate_and_compare(run, sandbox_db, scratch)
        with run.step('writes', LOOP) as record:
            # As the app writes: through `default` (third-party code
            # ignores `using`: treebeard's node deletes read `default`),
            # which is the scratch database's connection for the block.
            with routers.migrating(scratch), \
                    logs.others_counted() as logged:
                run.writes = drill_seeder.simulate_writes(scratch)
            totals = {k: sum(len(w[k]) for w in run.writes.values())
                      for k in ('created', 'edited', 'deleted')}
            if not any(totals.values()):
                raise DrillError('no write could be simulated on '
                                 f'{run.postgres}')
            record['detail'] = (f'{totals["created"]} created, '
                                f'{totals["edited"]} edited, '
                                f'{totals["deleted"]} deleted in '
                                f'{len(run.writes)} models on PostgreSQL'
                                + refused_note(run.writes)
                                + logged_note(logged))
        with run.step('profile', LOOP) as record:
            path = profiles.write_active_profile(
                run.sandbox, profiles.POSTGRES, {'reason': 'drill'})
            record['detail'] = f'sandbox profile postgres ({path.name})'
        with run.step('rollback', LOOP) as record:
            run.rollback_result = sandbox_rollback(run, sandbox_db, scratch)
            result = run.rollback_result
            if result.exit_code != exit_codes.OK:
                why = '; '.join(result.warnings) or result.error
                raise DrillError(f'rollback {result.outcome}: {why}')
            record['detail'] = (f'{result.outcome} from {result.source} in '
                                f'{result.seconds:.2f}s (downtime '
                                f'{result.downtime_seconds:.2f}s), loss '
                                f'{result.loss}')
        with run.step('verify', LOOP) as record, \
                profiles.sqlite_file_alias(sandbox_db, wal=True) as restored:
            report = compare.compare_aliases(restored, scratch,
                                             timeout=run.remaining())
            detail = require_identical(report, 'restored file vs PostgreSQL')
            kept = drill_seeder.check_writes_kept(restored, scratch,
                                                  run.writes)
            record['detail'] = f'{detail}; {kept} simulated writes kept'


def refused_note(writes: dict[str, dict[str, list[Any]]]) -> str:
    """"; 3 refused by the models' own code or constraints
    (wagtailimages.Image: OSError 2, ...)" or ''. A generated write an
    app refuses is not a failure of the rollback, but the drill says it
    skipped it."""
    refused = {label: keys['refused'] for label, keys in writes.items()
               if keys.get('refused')}
    if not refused:
        return ''
    shown = ', '.join(
        f'{label}: ' + ' '.join(f'{name} {n}' for name, n in
                                Counter(names).most_common())
        for label, names in sorted(refused.items())[:5])
    more = f' and {len(refused) - 5} more models' if len(refused) > 5 else ''
    total = sum(len(names) for names in refused.values())
    return (f"; {total} refused by the models' own code or constraints "
            f'({shown}{more})')


def logged_note(logged: dict[str, int]) -> str:
    """'; 12 warnings or errors logged by other apps' code (modelsearch
    12)' or ''."""
    if not logged:
        return ''
    shown = ', '.join(f'{name} {n}' for name, n in
                      sorted(logged.items(), key=lambda i: -i[1])[:3])
    return (f"; {sum(logged.values())} warnings or errors logged by other "
            f"apps' code, not shown ({shown})")


def make_sandbox_database(run: DrillRun, sandbox_db: Path) -> None:
    opts = run.options
    live = Path(opts.live_path or profiles.sqlite_alias_path(profiles.SQLITE))
    rows = opts.seed_rows
    if rows is None and not live.exists():
        rows = DEFAULT_SEED_ROWS
        run.runner.warn(f'no live database at {live}: seeding {rows} '
                        'generated rows per model instead')
    if rows is not None:
        with run.step('seed', SETUP) as record, \
                profiles.sqlite_file_alias(sandbox_db) as alias:
            schema.ensure_schema(alias)
            made = drill_seeder.seed_database(alias, rows)
            run.rows = count_model_rows(alias)
            run.source = f'generated: {rows} rows per model'
            record['detail'] = (f'{sum(made.values())} generated rows in '
                                f'{len(made)} models (' + ', '.join(
                                    f'{k} {v}' for k, v in made.items()
                                    if v) + ')')
        return
    with run.step('copy', SETUP) as record:
        how = sqlite_copy_readonly(live, sandbox_db,
                                   float(conf.get_setting(
                                       'ANTHIAS_BACKUP_TIMEOUT')))
        with profiles.sqlite_file_alias(sandbox_db) as alias:
            run.rows = count_model_rows(alias)
        run.source = f'copy of {live}'
        record['detail'] = (f'{live} -> {sandbox_db.name} ({how}), '
                            f'{sum(run.rows.values())} rows')


def migrate_and_compare(run: DrillRun, sandbox_db: Path, scratch: str) -> None:
    """schema, transfer and validate: the forward move, checked."""
    opts = run.options
    with profiles.sqlite_file_alias(sandbox_db) as source:
        with run.step('schema', LOOP) as record:
            migrated = schema.ensure_schema(scratch)
            schema.check_same_migrations(source, scratch)
            record['detail'] = (f'{len(migrated)} migrations applied on '
                                'the scratch database')
        with run.step('transfer', LOOP) as record:
            moved = transfer.transfer_data(source, scratch,
                                           batch_size=opts.batch_size)
            record['detail'] = (f'{moved.rows} rows in {len(moved.models)} '
                                f'models ({moved.seconds:.2f}s)')
        with run.step('validate', LOOP) as record:
            report = compare.compare_aliases(source, scratch,
                                             timeout=run.remaining())
            record['detail'] = require_identical(report,
                                                 'sandbox vs PostgreSQL')
            # The cutover, as switch_database makes it: the change
            # journal and fence installed with the rows recorded.
            window_journal.open_window(source, scratch)
            left_out = excluded_rows(source)
            if left_out:
                record['status'] = phases.PhaseStatus.WARNING
                shown = ', '.join(f'{k} ({v} rows)'
                                  for k, v in left_out.items())
                run.runner.warn(f'ANTHIAS_ROLLBACK_EXCLUDE leaves out {shown}'
                                ': a rollback would not bring these rows '
                                'back')


def sandbox_rollback(run: DrillRun, sandbox_db: Path,
                     scratch: str) -> rollback.RollbackResult:
    """The real rollback_migration --emergency, aimed at the sandbox."""
    progress = run.runner.progress

    def forward(event: events.ProgressEvent) -> None:
        # Phase-done only: a line per rollback phase under the drill's
        # 'rollback' step; its per-model events would drown the steps.
        if event.kind == events.PHASE_DONE and progress is not None:
            progress(replace(event, group='rollback'))

    assert run.sandbox is not None   # made by the sandbox step
    options = rollback.RollbackOptions(
        source='postgres', source_explicit=True, live_path=sandbox_db,
        postgres_alias=scratch, emergency=True, restart=False,
        timeout_seconds=max(1.0, run.remaining()),
        batch_size=run.options.batch_size, data_dir=run.sandbox,
        backup_dir=run.sandbox / 'backups')
    return rollback.run_rollback(
        options, progress=forward if progress is not None else None)


def _cleanup(run: DrillRun) -> None:
    """Always runs: drop the scratch database, stop the embedded server,
    delete the sandbox unless asked to keep it."""
    if run.server is None and run.sandbox is None:
        return
    kind = SETUP if run.outcome == ERROR else LOOP
    done = []
    try:
        with run.step('cleanup', kind, check_deadline=False) as record:
            errors = []
            if run.scratch_created:
                try:
                    assert run.server is not None   # it made the database
                    pg.postgres_drop_database(run.server, run.scratch_name)
                    done.append(f'dropped {run.scratch_name}')
                except DatabaseError as err:
                    errors.append(f'could not drop {run.scratch_name}: '
                                  f'{first_line(err)}')
            if run.server is not None and run.server.kind == pg.EMBEDDED:
                pg.postgres_stop_embedded(run.server)
                done.append('embedded server stopped')
            if run.sandbox is not None:
                if run.options.keep:
                    done.append(f'sandbox kept: {run.sandbox}')
                else:
                    shutil.rmtree(run.sandbox)
                    done.append('sandbox deleted')
            record['detail'] = '; '.join(done + errors)
            if errors:
                raise DrillError('; '.join(errors))
    except _StepFailed:
        pass


def _finish(run: DrillRun) -> DrillResult:
    code = {PASS: exit_codes.OK, FAIL: exit_codes.NO,
            ERROR: exit_codes.FAILED}[run.outcome]
    rb = run.rollback_result
    result = DrillResult(
        outcome=run.outcome, exit_code=code, failed_step=run.failed_step,
        error=run.error, steps=tuple(run.runner.phases), source=run.source,
        rows=run.rows, server=run.server.kind if run.server else '',
        postgres=run.postgres, scratch_database=run.scratch_name,
        writes={label: {k: len(v) for k, v in keys.items()}
                for label, keys in run.writes.items()},
        rollback_seconds=rb.seconds if rb else None,
        downtime_seconds=rb.downtime_seconds if rb else None,
        rollback=rb.as_dict() if rb else None,
        sandbox=str(run.sandbox or ''),
        kept=bool(run.options.keep and run.sandbox),
        warnings=tuple(run.runner.warnings),
        started_at=run.runner.started_at,
        finished_at=datetime.now(UTC).isoformat(),
        seconds=round(run.runner.elapsed(), 3))
    return record_drill(run.data_dir, result)
