"""The plan: run_rollback validates the options, takes the operation lock
and runs the phases in order (listed in the package docstring,
anthias_rollback.rollback), lowering the fence and reporting whenever
one fails before the swap, and turning a failure after it into exit 4.
measured_loss states the loss the run measured; finish builds the
RollbackResult and writes its JSON and text reports (0600).
"""
import sqlite3
import time
from concurrent import futures
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

from django.db import DatabaseError

from anthias_rollback import (
    conf,
    events,
    exit_codes,
    faults,
    fsutil,
    locking,
    profiles,
)
from anthias_rollback.exceptions import ConfigError, RollbackError
from anthias_rollback.phases import Deadline, PhaseRunner
from anthias_rollback.report import first_line, redact, write_json_report
from anthias_rollback.rollback.render import (
    latest_report,
    load_result,
    render_summary,
)
from anthias_rollback.rollback.sources import (
    check_room,
    choose_source,
    cutover_summary,
)
from anthias_rollback.rollback.state import (
    FENCE_PENDING,
    LOG_NAME,
    SOURCE_CHOICES,
    LossStatus,
    Outcome,
    RollbackOptions,
    RollbackResult,
    RunState,
    Source,
    raise_pending_fence,
    read_run_state,
    restore_facts,
    write_run_state,
)
from anthias_rollback.rollback.steps import (
    build_new_file,
    fence_postgres,
    flip_profile,
    interrupted_after_swap,
    lift_fence,
    post_verify,
    post_verify_failures,
    preflight,
    preserve_postgres,
    prove_loss,
    rebuild_derived_tables,
    remove_sqlite_file,
    swap_new_file,
    verify_new_file,
)


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
    if options.source not in SOURCE_CHOICES:
        raise ConfigError(f'unknown source {options.source!r}')
    if options.timeout_seconds <= 0:
        raise ConfigError('the deadline must be positive')
    # Every setting checked before the first change: one read only after
    # the swap (the restart timeout) once failed there, exit 1 after a
    # change was made.
    conf.validate_settings()
    data_dir = Path(options.data_dir or conf.data_dir())
    data_dir.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(options.timeout_seconds,
                        'deadline of {seconds:.0f}s reached during {what}; '
                        'stopped before touching the live database')
    run = RunState(options, data_dir, PhaseRunner(
        deadline, progress, log_path=data_dir / LOG_NAME,
        checkpoint='rollback'))
    live_path = options.live_path or profiles.sqlite_alias_path(
        options.sqlite_alias)
    # Two data dirs may name one live file: lock the file's identity too.
    with locking.operation_lock(data_dir, 'rollback_migration',
                                live_path=live_path), run.runner:
        faults.checkpoint('rollback:locked')
        try:
            return _execute(run)
        except (RollbackError, DatabaseError, OSError,
                sqlite3.Error) as err:
            lift_fence(run)
            if run.swapped:
                # The new database is live; what failed came after. Say
                # so with exit 4 instead of pretending nothing changed.
                run.warn(f'after the swap: {first_line(err)}')
                return finish(run, Outcome.FOLLOW_UP_FAILED,
                              exit_codes.FOLLOW_UP, error=first_line(err))
            result = finish(run, Outcome.FAILED, exit_codes.FAILED,
                            error=first_line(err))
            # One line for the command, whatever failed (a full disk
            # during the build was a traceback): nothing changed.
            failure = err if isinstance(err, RollbackError) else \
                RollbackError(f'{first_line(err)}; the live database and '
                              'the profile are unchanged')
            failure.report_path = result.report_path  # type: ignore[attr-defined]  # read by the command
            raise failure from None
        except BaseException:
            lift_fence(run)
            raise


def _execute(run: RunState) -> RollbackResult:
    opts = run.options
    preflight(run)
    recorded = None if opts.dry_run or opts.source_explicit else \
        interrupted_after_swap(run)
    if recorded is not None:
        return _resume(run, recorded)
    if not opts.dry_run:
        write_run_state(run.data_dir, 'running',
                        started_at=run.runner.started_at)
    choose_source(run)
    check_room(run)
    fence_postgres(run)
    preserve_postgres(run)
    new_path = build_new_file(run)
    cutover_summary(run)   # with the build's counts
    try:
        verify_new_file(run, new_path)
        run.deadline.check('the swap')
    except BaseException:
        remove_sqlite_file(new_path)
        raise
    if opts.dry_run:
        remove_sqlite_file(new_path)
        return finish(run, Outcome.DRY_RUN, exit_codes.OK)
    swap_new_file(run, new_path)
    return _after_swap(run)


def _resume(run: RunState, recorded: dict) -> RollbackResult:
    """A run killed after its swap (the live file is its new file, by
    inode): finish its remaining phases instead of building again."""
    restore_facts(run, recorded)
    with run.phase('resume', check_deadline=False) as record:
        record['detail'] = (
            f'the run started at {recorded.get("started_at")} was '
            f'interrupted after its swap ({recorded["status"]}); its new '
            'file is live: finishing the profile, restart, proof, '
            'post-verification and report')
    run.warn('resumed an interrupted rollback after its swap')
    return _after_swap(run)


def _after_swap(run: RunState) -> RollbackResult:
    restart = flip_profile(run)
    # The fence stays up: no stale process may write into PostgreSQL now
    # that nobody reads it (switch_database --to postgres lifts it).
    # The app's views are requested on the new file while the proof
    # scans PostgreSQL (psycopg2 waits outside the GIL): they read
    # different databases, and each phase still reports on its own.
    with futures.ThreadPoolExecutor(
            1, thread_name_prefix='post-verify') as pool:
        checking = pool.submit(post_verify_failures, run)
        prove_loss(run)
        verified = post_verify(run, checking)
    rebuilt = rebuild_derived_tables(run)
    loss, _ = measured_loss(run)
    if not verified or not rebuilt or (restart is not None
                                       and not restart.ok):
        result = finish(run, Outcome.FOLLOW_UP_FAILED,
                        exit_codes.FOLLOW_UP)
    elif loss not in (LossStatus.PROVEN_NONE, LossStatus.NONE):
        # A backup restore that left rows out (or could not compare) is
        # not a clean rollback either: exit 0 only with nothing left out.
        result = finish(run, Outcome.ROLLED_BACK_WITH_A_LOSS,
                        exit_codes.FOLLOW_UP)
    else:
        result = finish(run, Outcome.ROLLED_BACK, exit_codes.OK)
    faults.checkpoint('rollback:reported')
    # Only now: a run killed before this is resumed by the next one.
    # Not fenced (a standby or backup restore): the fence goes up now if
    # PostgreSQL answers, else at the first chance (raise_pending_fence).
    write_run_state(run.data_dir, 'done', fence='up' if run.fenced else
                    FENCE_PENDING, finished_at=datetime.now(
                        UTC).isoformat(),
                    report=result.report_path)
    if not run.fenced:
        raise_pending_fence(run.data_dir, run.options.postgres_alias)
    return result


def measured_loss(run: RunState) -> tuple[LossStatus, str]:
    """(the loss status, one line). A standby's loss is bounded by its
    last applied position; a backup's is what PostgreSQL holds that it
    lacks, or unknown when PostgreSQL could not be compared."""
    if run.source == Source.STANDBY:
        return LossStatus.BOUNDED, run.at_risk_note
    if run.source != Source.POSTGRES:
        if run.at_risk_rows is None:
            return LossStatus.UNKNOWN, run.at_risk_note
        if sum(run.at_risk_rows.values()):
            return LossStatus.LOST, run.at_risk_note
        return LossStatus.NONE, ('none: PostgreSQL holds no row the backup '
                                 'lacks or holds differently (compared)')
    if run.shortfall:
        shown = '; '.join(f'{s.model}: {s.found} rows, {s.expected} '
                          'expected' for s in run.shortfall[:5])
        return LossStatus.LOST, (f'PostgreSQL had lost rows before the '
                                 f'rollback that no journaled write removed '
                                 f'({shown})')
    if run.proof is None:
        return LossStatus.UNPROVEN, ('not proven: PostgreSQL has no change '
                                     'journal (cutover made without one), '
                                     'so writes made during the rollback '
                                     'cannot be counted')
    if run.proof.proven_none:
        return LossStatus.PROVEN_NONE, ('none (proven: no write committed '
                                        'after the copy\'s snapshot; '
                                        'journal, row versions and row '
                                        'counts checked)')
    parts = [f'{w.model} pk={w.pk} {w.operation}'
             for w in run.proof.lost[:10]]
    parts += [f'{label}: {copied} rows copied, {now} on PostgreSQL'
              for label, (copied, now) in
              run.proof.count_differences.items()]
    more = len(run.proof.lost) - 10
    return LossStatus.LOST, (f'{len(run.proof.lost)} write(s) not in '
                             'SQLite: ' + '; '.join(parts)
                             + (f' (and {more} more in the report)'
                                if more > 0 else ''))


def finish(run: RunState, outcome: Outcome, code: int,
           error: str | None = None) -> RollbackResult:
    """Build the result and write the JSON + text report (0600)."""
    now = time.monotonic()
    loss, loss_detail = measured_loss(run)
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
        finished_at=datetime.now(UTC).isoformat(),
        seconds=round(now - run.runner.started, 3),
        downtime_seconds=(round(run.flipped_at - run.runner.started, 3)
                          if run.flipped_at else None),
        loss=loss, loss_detail=loss_detail,
        lost_writes=tuple(asdict(w) for w in run.proof.lost)
        if run.proof else (),
        shortfall={s.model: {'expected': s.expected, 'found': s.found}
                   for s in run.shortfall} or None,
        cutover_forced=run.cutover_forced,
        resumed_from=(run.resumed or {}).get('started_at'),
        standby_bound=run.standby_bound, copy=run.copy)
    stamp = datetime.now(UTC).strftime('%Y%m%d_%H%M%S_%f')
    path = run.reports_dir / f'rollback_{stamp}.json'
    result = replace(result, report_path=str(path))
    try:
        write_json_report(path, result.as_dict())
        fsutil.atomic_write_bytes(path.with_suffix('.txt'),
                                  redact(render_summary(result)).encode(),
                                  mode=0o600)
    except OSError as err:
        # A full disk must not turn the verdict into a traceback (nor,
        # after the swap, into "nothing changed"): the result stands,
        # said on stdout and in --json; both writes are atomic, so no
        # half-written report is left under its name.
        path.unlink(missing_ok=True)
        note = (f'the report could not be written to {path}: '
                f'{err.strerror or err}')
        run.warn(note)
        result = replace(result, report_path=None,
                         warnings=(*result.warnings, note))
    return result


def already_rolled_back(options: RollbackOptions) -> RollbackResult | None:
    """The completed rollback a rerun would repeat, or None.

    A rerun by a deploy hook that timed out, or by a second operator, of
    a rollback that finished (profile sqlite from its flip, run state
    done, a report saying rolled back) must not fail: the caller reports
    that result instead. An interrupted run (state running) returns None:
    the rerun does the work again from the start (every phase before the
    swap is repeatable, the swap recovers itself). Reads only.
    """
    if options.source_explicit or options.dry_run:
        return None
    data_dir = Path(options.data_dir or conf.data_dir())
    try:
        active = profiles.resolve_active_profile(data_dir)
    except RollbackError:
        return None
    if active.name != profiles.SQLITE or \
            read_run_state(data_dir).get('status') != 'done':
        return None
    path = latest_report(data_dir / 'reports')
    if path is None:
        return None
    try:
        result = load_result(path)
    except (OSError, ValueError, TypeError):
        return None
    # A follow-up that failed (restart, post-verification) still swapped:
    # the rerun answers with that run's result and exit 4, not "nothing
    # to roll back".
    if not (result.outcome.startswith(Outcome.ROLLED_BACK)
            or result.outcome == Outcome.FOLLOW_UP_FAILED):
        return None
    return result


def never_left_sqlite(options: RollbackOptions) -> str | None:
    """The one line for a device already on sqlite that has nothing to
    roll back (no source asked for, no run interrupted), or None. A
    deploy hook that runs the emergency rollback on every device gets
    exit 0 there, not a banner and a failure. Reads only."""
    if options.source_explicit or options.dry_run:
        return None
    data_dir = Path(options.data_dir or conf.data_dir())
    try:
        active = profiles.resolve_active_profile(data_dir)
    except RollbackError:
        return None
    if active.name != profiles.SQLITE or read_run_state(data_dir).get(
            'status') in ('running', 'swapping', 'swapped'):
        return None
    return (f'already on sqlite (profile from {active.source}), nothing to '
            'roll back; nothing changed')
