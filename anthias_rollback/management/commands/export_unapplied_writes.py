"""After a rollback that restored the standby (PostgreSQL was down), list
exactly the writes the standby did not hold, once PostgreSQL answers
again, and export their rows for loaddata.

    python manage.py export_unapplied_writes
    python manage.py export_unapplied_writes \
        --report-file reports/rollback_X.json --json

The standby's position (one PostgreSQL snapshot) is in the rollback's
report; the writes it lacks are the journal entries and row versions of
transactions that snapshot does not see, plus count differences. Rows
PostgreSQL holds for the inserted and updated keys go to
`<data dir>/reports/at_risk_rows_<stamp>.json` (0600):

    python manage.py loaddata <that file> --database sqlite

Deleted keys are listed (a fixture cannot delete). Reads PostgreSQL.

Exit codes: 0 the standby held every write; 3 writes listed (and
exported); 1 refused or failed (no standby rollback report, PostgreSQL
not answering, the window's journal gone); 2 usage error.
"""
from dataclasses import asdict

from anthias_rollback import conf, exit_codes, profiles
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import path_arg
from anthias_rollback.rollback import unapplied


class Command(RollbackCommand):
    help = ('List the writes a standby restore lacked, from PostgreSQL once '
            'it answers, and export their rows for loaddata. Exit codes: 0 '
            'none, 3 writes listed, 1 refused, 2 usage.')

    def add_arguments(self, parser):
        parser.add_argument('--report-file', type=path_arg, metavar='PATH',
                            help='the rollback report (default: the newest '
                                 'one that restored the standby)')
        parser.add_argument('--no-export', action='store_true',
                            help='list only, write no fixture')

    def run(self, *args, **options):
        found = unapplied.unapplied_writes(
            profiles.POSTGRES, conf.reports_dir(),
            report_path=options['report_file'],
            export=not options['no_export'])
        self.set_json(asdict(found))
        if not options['json'] and options['verbosity'] >= 1:
            self.stdout.write(f'standby position: {found.position_at} '
                              f'(report {found.report})')
            for write in found.writes:
                self.stdout.write(f'  {write.model} pk={write.pk} '
                                  f'{write.operation}')
            for label, (had, now) in found.count_differences.items():
                self.stdout.write(f'  {label}: {had} rows restored, '
                                  f'{now} on PostgreSQL')
        if found.none:
            if not options['json']:
                self.write_verdict('NONE UNAPPLIED: the standby held every '
                                   f'write (position {found.position_at})')
            return
        kept = (f'; rows of {sum(found.exported_rows.values())} key(s) '
                f'exported to {found.exported} (loaddata it with --database '
                'sqlite)' if found.exported else '')
        dropped = (f'; {len(found.deleted)} delete(s) listed, not '
                   'exportable' if found.deleted else '')
        self.fail(f'UNAPPLIED: {len(found.writes)} write(s) after '
                  f'{found.position_at}{kept}{dropped}', exit_codes.NO)
