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

from anthias_rollback import drill, exit_codes, transfer
from anthias_rollback.management.base import (
    RollbackCommand,
    positive_float,
    positive_int,
)


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
        parser.add_argument('--workdir', metavar='DIR',
                            help='make the sandbox inside DIR (default: '
                                 'the system temp dir)')
        parser.add_argument('--keep', action='store_true',
                            help='keep the sandbox for inspection')
        parser.add_argument('--original-db-path', metavar='PATH',
                            help='the live SQLite file to copy (default: '
                                 'the sqlite alias\'s file)')
        parser.add_argument('--batch-size', type=positive_int,
                            default=transfer.DEFAULT_BATCH_SIZE,
                            help='rows per batch (default %(default)s)')
        parser.add_argument('--timeout-minutes', type=positive_float,
                            default=drill.DEFAULT_TIMEOUT_SECONDS / 60,
                            help='limit for the whole drill (default '
                                 '%(default)g)')
        parser.add_argument('--json', action='store_true',
                            help='print the JSON report only')

    def run(self, *args, **options):
        as_json = options['json']
        opts = drill.DrillOptions(
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
        result = drill.run_drill(opts, progress=self.render_progress(
            verbosity))
        if as_json:
            self.write_json(result.as_dict())
        else:
            if verbosity >= 1:
                self.stdout.write(drill.render_summary(result))
            style = self.style.SUCCESS if result.passed else \
                self.style.ERROR
            self.stdout.write(style(drill.verdict_line(result)))
        if result.exit_code != exit_codes.OK:
            self.fail(f'{drill.verdict_line(result)} (report: '
                      f'{result.report_path})', result.exit_code)

    def render_progress(self, verbosity: int):
        if verbosity < 1:
            return None

        def show(event):
            kind = event.get('event')
            if kind == 'step-start' and verbosity >= 2:
                self.stdout.write(f'-> {event["step"]}')
            elif kind == 'step-done':
                style = {'ok': self.style.SUCCESS,
                         'failed': self.style.ERROR}.get(
                    event['status'], self.style.WARNING)
                step = drill.DrillStep(event['step'], event['kind'],
                                       event['status'], event['seconds'],
                                       event['detail'])
                self.stdout.write(style(drill.render_step(step)))
            elif kind == 'rollback-phase' and verbosity >= 2:
                self.stdout.write(f'{"":13}rollback {event["phase"]:<12} '
                                  f'{event["status"]:<8} '
                                  f'{event["seconds"]:7.3f}s')
            elif kind == 'warning':
                self.stderr.write(self.style.WARNING(
                    f'warning: {event["message"]}'))
        return show
