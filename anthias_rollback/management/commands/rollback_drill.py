"""Rehearse the whole SQLite -> PostgreSQL -> SQLite loop in a sandbox.

    python manage.py rollback_drill
    python manage.py rollback_drill --embedded-postgres --seed 1000

Copies the live SQLite database (reading only) or generates one
(--seed N), backs it up, migrates it into a scratch PostgreSQL database
(on the configured server, or a throwaway embedded one), validates,
simulates production writes, rolls back with `rollback_migration
--emergency` in the sandbox and validates again; then cleans up. Each
step is timed; the report and the history go to <data dir>/drills/.
Nothing live changes.

Exit codes: 0 PASS; 1 the drill could not run (no PostgreSQL, scratch
name clash, bad sandbox; nothing live touched); 2 usage error; 3 FAIL
(a step of the loop failed: the report names it).
"""
import argparse
from pathlib import Path
from typing import cast

from anthias_rollback import events, exit_codes, phases, transfer
from anthias_rollback.drill import history as drill_history
from anthias_rollback.drill import run as drill_run
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import (
    batch_size,
    path_arg,
    positive_int,
    positive_minutes,
)


def render_step(step: phases.PhaseResult) -> str:
    return (f'  {step.status:<8} {step.name:<10} {step.seconds:7.3f}s  '
            f'{step.detail}').rstrip()


def verdict_line(result: drill_history.DrillResult) -> str:
    if result.passed:
        return (f'PASS: rollback drill passed in {result.seconds:.1f}s; '
                f'rollback took {result.rollback_seconds:.2f}s (downtime '
                f'{result.downtime_seconds:.2f}s), '
                f'{sum(result.rows.values())} rows, nothing lost')
    if result.outcome == drill_history.FAIL:
        return (f'FAIL: rollback drill failed at step {result.failed_step}: '
                f'{result.error}')
    return (f'ERROR: the drill could not run (step {result.failed_step}): '
            f'{result.error}')


def render_summary(result: drill_history.DrillResult) -> str:
    lines = [f'Rollback drill {result.outcome} in {result.seconds:.2f}s',
             f'  sandbox:     {result.sandbox}'
             + (' (kept)' if result.kept else ' (deleted)'),
             f'  source:      {result.source or "-"}',
             f'  PostgreSQL:  {result.server or "-"} '
             f'{result.postgres or ""}'.rstrip()]
    if result.rollback_seconds is not None:
        lines.append(f'  rollback:    {result.rollback_seconds:.2f}s, '
                     f'downtime {result.downtime_seconds:.2f}s')
    for warning in result.warnings:
        lines.append(f'  WARNING: {warning}')
    lines.append(f'  report:      {result.report_path}')
    return '\n'.join(lines) + '\n'


class Command(RollbackCommand):
    help = ('Rehearse migrate -> production writes -> emergency rollback '
            'in a sandbox with a scratch PostgreSQL database; PASS/FAIL '
            'with timings, report in <data dir>/drills/. Exit codes: '
            '0 PASS, 1 could not run, 2 usage, 3 FAIL.')

    def add_arguments(self, parser):
        parser.add_argument('--seed', type=positive_int, metavar='N',
                            help='generate N rows per model (N assets) '
                                 'instead of copying the live database')
        parser.add_argument('--embedded-postgres',
                            action=argparse.BooleanOptionalAction,
                            default=None,
                            help='use a throwaway embedded PostgreSQL '
                                 'server (package embedded-postgres); '
                                 'default: the configured server, embedded '
                                 'only if it does not answer; --no-... '
                                 'never falls back')
        parser.add_argument('--workdir', metavar='DIR', type=path_arg,
                            help='make the sandbox inside DIR (default: '
                                 'the system temp dir)')
        parser.add_argument('--keep', action='store_true',
                            help='keep the sandbox for inspection')
        parser.add_argument('--original-db-path', metavar='PATH',
                            type=path_arg,
                            help='the live SQLite file to copy (default: '
                                 'the sqlite alias\'s file)')
        parser.add_argument('--batch-size', type=batch_size,
                            default=transfer.DEFAULT_BATCH_SIZE,
                            help='rows per batch (default %(default)s)')
        parser.add_argument('--timeout-minutes', type=positive_minutes,
                            default=drill_run.DEFAULT_TIMEOUT_SECONDS / 60,
                            help='limit for the whole drill (default '
                                 '%(default)g)')

    def run(self, *args, **options):
        as_json = options['json']
        opts = drill_run.DrillOptions(
            seed_rows=options['seed'],
            embedded=options['embedded_postgres'],
            workdir=Path(options['workdir']) if options['workdir']
            else None,
            keep=options['keep'],
            batch_size=options['batch_size'],
            timeout_seconds=options['timeout_minutes'] * 60,
            live_path=Path(options['original_db_path'])
            if options['original_db_path'] else None)
        verbosity = 0 if as_json else options['verbosity']
        result = drill_run.run_drill(opts, progress=self.render_progress(
            verbosity))
        self.set_json(result.as_dict())
        if not as_json:
            if verbosity >= 1:
                self.stdout.write(render_summary(result))
            self.write_verdict(verdict_line(result), ok=result.passed)
        if result.exit_code != exit_codes.OK:
            self.fail(f'{verdict_line(result)} (report: '
                      f'{result.report_path})', result.exit_code)

    def render_progress(self, verbosity: int):
        if verbosity < 1:
            return None

        def show(event: events.ProgressEvent) -> None:
            rollback_phase = event.group == 'rollback'
            if event.kind == events.PHASE_START and verbosity >= 2 \
                    and not rollback_phase:
                self.stdout.write(f'-> {event.name}')
            elif event.kind == events.PHASE_DONE and rollback_phase:
                if verbosity >= 2:
                    self.stdout.write(f'{"":13}rollback {event.name:<12} '
                                      f'{event.status:<8} '
                                      f'{event.seconds:7.3f}s')
            elif event.kind == events.PHASE_DONE:
                style = {str(phases.PhaseStatus.OK): self.style.SUCCESS,
                         str(phases.PhaseStatus.FAILED): self.style.ERROR}.get(
                    event.status, self.style.WARNING)
                step = phases.PhaseResult(event.name,
                                          cast(phases.PhaseStatus,
                                               event.status),
                                          event.seconds, event.detail,
                                          event.group)
                self.stdout.write(style(render_step(step)))
            elif event.kind == events.WARNING:
                self.stderr.write(self.style.WARNING(
                    f'warning: {event.detail}'))
        return show
