"""Copy every row of the SQLite database into PostgreSQL, all or nothing.

    python manage.py migrate_to_postgres
    python manage.py migrate_to_postgres --sqlite-db backups/x.db --replace \
        --report reports/migrate.json

Creates the schema on PostgreSQL (`migrate --database postgres`), refuses
when the two sides have different migrations applied or PostgreSQL
already holds data (unless --replace or --repair), checks every source
value PostgreSQL would reject, then copies in one transaction and resets
the sequences. --dry-run prints the plan and changes nothing. --json
prints one JSON document on stdout, --report PATH writes it (0600).

Tables that differ between the engines (a search index) are left out
and named; the commands in ANTHIAS_ROLLBACK_REBUILD_COMMANDS then
rebuild them on PostgreSQL, each one's result reported.

Exit codes: 0 copied (or planned); 1 could not do it, PostgreSQL
unchanged (unreachable, different migrations, data present, rejected
values, lock held); 2 usage error; 4 copied, but a rebuild command
failed.
"""
from dataclasses import asdict
from pathlib import Path

from anthias_rollback import (
    conf,
    engine_tables,
    exit_codes,
    profiles,
    transfer,
)
from anthias_rollback.engines.sqlite import sqlite_file_problem
from anthias_rollback.exceptions import TransferError
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import batch_size, path_arg


class Command(RollbackCommand):
    help = ('Copy every model from SQLite into PostgreSQL in one '
            'transaction (schema first, sequences reset). Exit codes: '
            '0 done, 1 could not do it (PostgreSQL unchanged), 2 usage, '
            '4 copied but a rebuild command failed.')

    def add_arguments(self, parser):
        parser.add_argument('--sqlite-db', metavar='PATH', type=path_arg,
                            help='copy from this SQLite file (e.g. a '
                                 'backup) instead of the sqlite alias')
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument('--replace', action='store_true',
                          help='empty PostgreSQL and reload it (same '
                               'transaction)')
        mode.add_argument('--repair', action='store_true',
                          help='make PostgreSQL equal to the source with '
                               'the fewest writes; report per model')
        parser.add_argument('--batch-size', type=batch_size,
                            default=transfer.DEFAULT_BATCH_SIZE,
                            help='rows per batch (default %(default)s)')
        parser.add_argument('--dry-run', action='store_true',
                            help='print the plan and preflight problems; '
                                 'change nothing')

    def run(self, *args, **options):
        self.verbosity = options['verbosity']
        self.as_json = options['json']
        if options['batch_size'] < 1:
            self.fail('--batch-size must be at least 1', exit_codes.USAGE)
        path = options['sqlite_db']
        if path:
            problem = sqlite_file_problem(Path(path))
            if problem:
                raise TransferError(problem)
            with profiles.sqlite_file_alias(Path(path)) as alias:
                self.migrate(alias, options)
        else:
            self.migrate(profiles.SQLITE, options)

    def migrate(self, source_alias, options):
        render = (self.render_events(self.verbosity)
                  if not self.as_json else None)
        try:
            report = transfer.migrate_to_postgres(
                source_alias, profiles.POSTGRES, data_dir=conf.data_dir(),
                replace=options['replace'], repair=options['repair'],
                dry_run=options['dry_run'],
                batch_size=options['batch_size'], progress=render)
        finally:
            if render is not None:
                render.close()
        data = {'command': 'migrate_to_postgres', **asdict(report)}
        if report.transfer is not None:
            data['transfer']['rows_per_second'] = {
                m.label: round(m.rows_per_second)
                for m in report.transfer.models}
        rebuilt = []
        if report.plan is None:
            # The tables left out as engine-specific, on PostgreSQL now.
            rebuilt = engine_tables.run_rebuild_commands(profiles.POSTGRES)
        data['rebuilt'] = [asdict(r) for r in rebuilt]
        self.set_json(data)
        if not self.as_json:
            for result in rebuilt:
                self.stdout.write(f'rebuild: {result.line()}')
            self.show(report)
        if report.plan is not None and report.plan.problem_count:
            self.fail(f'{report.plan.problem_count} source value(s) would '
                      f'be rejected by PostgreSQL; see the list above')
        failed = [r.line() for r in rebuilt if not r.ok]
        if failed:
            self.fail(f'copied, but a rebuild command failed: '
                      f'{"; ".join(failed)}', exit_codes.FOLLOW_UP)

    # ------------------------------------------------------------- output

    def show(self, report):
        for line in report.not_copied:
            self.stdout.write(line)
        if report.plan is not None:
            self.show_plan(report.plan)
        elif report.repair is not None:
            self.show_repair(report.repair)
        else:
            self.show_transfer(report)

    def show_plan(self, plan):
        if self.verbosity >= 1:
            self.show_plan_models(plan)
        for problem in plan.problems:
            self.stderr.write(self.style.ERROR(f'  rejected: {problem}'))
        rows = sum(m.source_rows for m in plan.models)
        self.stdout.write(self.style.SUCCESS(
            f'plan: {len(plan.models)} models, {rows} rows, about '
            f'{plan.estimated_seconds:.0f}s; {plan.problem_count} '
            f'problem(s)'))

    def show_plan_models(self, plan):
        self.stdout.write(f'dry run ({plan.mode}): {plan.source} -> '
                          f'{plan.target}; nothing will be changed')
        if plan.pending_migrations:
            self.stdout.write(f'migrate would apply '
                              f'{len(plan.pending_migrations)} migrations')
        for model in plan.models:
            note = (f', would truncate {model.target_rows} rows'
                    if model.truncate else
                    f', target holds {model.target_rows} rows'
                    if model.target_rows else '')
            self.stdout.write(f'  {model.label} ({model.table}): '
                              f'{model.source_rows} rows{note}')

    def show_transfer(self, report):
        result = report.transfer
        if report.migrated and self.verbosity >= 1:
            self.stdout.write(f'migrate applied {len(report.migrated)} '
                              f'migrations on PostgreSQL')
        if self.verbosity >= 1:
            for model in result.models:
                self.stdout.write(
                    f'  {model.label}: {model.rows} rows, '
                    f'{model.rows_per_second:,.0f} rows/s')
        checking = result.migrate_check_seconds
        copying = result.seconds - checking
        rate = result.rows / copying if copying > 0 else 0
        # The first move's target holds what `migrate` made: finding
        # which rows those are may run every migration once (wagtail:
        # about 15 s). Said, so the rate is the copy's own.
        of_it = (f'; {checking:.1f}s of it finding the rows `migrate` '
                 'made: a scratch migrate, kept as the schema template'
                 if checking >= 1 else '')
        self.stdout.write(self.style.SUCCESS(
            f'copied {result.rows} rows of {len(result.models)} models '
            f'from {result.source} to {result.target} in '
            f'{result.seconds:.1f}s ({rate:,.0f} rows/s{of_it})'))

    def show_repair(self, result):
        for model in result.models:
            if self.verbosity >= 1 and (
                    model.inserted or model.updated or model.deleted
                    or self.verbosity >= 2):
                self.stdout.write(
                    f'  {model.label}: {model.inserted} inserted, '
                    f'{model.updated} updated, {model.deleted} deleted')
        self.stdout.write(self.style.SUCCESS(
            f'repaired {result.target} from {result.source}: '
            f'{result.changed} row(s) changed in {result.seconds:.1f}s'))

