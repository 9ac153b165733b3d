"""Say whether a rollback to SQLite could run right now, and how.

    python manage.py rollback_readiness
    python manage.py rollback_readiness --max-age-hours 6 --json

Checks: a verified backup younger than --max-age-hours; the newest
backup's integrity; free disk in the data dir >= 3 x the database; the
live SQLite path is writable; pg_dump runs (ANTHIAS_PG_DUMP); no other
operation holds the lock; PostgreSQL reachable (informational: decides
whether a zero-loss rollback from PostgreSQL is possible); the path with
PostgreSQL down: not ready when replicate_changes' last rounds failed,
or the standby or newest backup records migrations this code does not
know (a file merely behind is migrated forward: a note). For cron and
monitoring.

Exit codes: 0 ready; 1 the check itself could not run; 2 usage error;
3 not ready.
"""
from dataclasses import asdict

from anthias_rollback import conf, exit_codes, profiles, readiness
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import path_arg, positive_hours


class Command(RollbackCommand):
    help = ('Check whether a rollback could run now (backup age and '
            'integrity, disk, writable SQLite path, pg_dump, lock, a '
            'failing replicate_changes, a standby or backup ahead of this '
            'code; PostgreSQL informational). Exit codes: 0 ready, 1 the '
            'check could not run, 2 usage, 3 not ready.')

    def add_arguments(self, parser):
        parser.add_argument('--max-age-hours', type=positive_hours,
                            default=24.0,
                            help='newest verified backup must be younger '
                                 '(default 24)')
        parser.add_argument('--backup-dir', metavar='DIR', type=path_arg,
                            help='default ANTHIAS_BACKUP_DIR, else '
                                 '$ANTHIAS_DATA_DIR/backups')

    def run(self, *args, **options):
        report = readiness.check_readiness(
            data_dir=conf.data_dir(),
            sqlite_path=profiles.sqlite_alias_path(),
            backup_dir=options['backup_dir'] or conf.backup_dir(),
            postgres_alias=profiles.POSTGRES,
            pg_dump=conf.get_setting('ANTHIAS_PG_DUMP'),
            max_age_hours=options['max_age_hours'])
        self.set_json(asdict(report))
        if not options['json']:
            if options['verbosity'] >= 1:
                self.show_checks(report)
            self.write_verdict('READY' if report.ready else 'NOT READY',
                               ok=report.ready)
        if not report.ready:
            names = ', '.join(c.name for c in report.failed)
            self.fail(f'not ready: {names}', exit_codes.NO)

    def show_checks(self, report: readiness.ReadinessReport) -> None:
        width = max(len(c.name) for c in report.checks)
        for check in report.checks:
            if check.ok:
                verdict = self.style.SUCCESS('ok  ')
            elif check.informational:
                verdict = self.style.WARNING('info')
            else:
                verdict = self.style.ERROR('FAIL')
            self.stdout.write(f'{verdict}  {check.name:<{width}}  '
                              f'{check.reason}')
