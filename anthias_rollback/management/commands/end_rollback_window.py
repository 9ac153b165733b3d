"""End the rollback window: commit to PostgreSQL for good.

    python manage.py end_rollback_window
    python manage.py end_rollback_window --json

Removes the change journal, its triggers and the write fence from
PostgreSQL (writes there get a little cheaper) and records the end in
the cutover journal. After this, a rollback can no longer prove what it
keeps: run it once the device has run well on PostgreSQL (the old
runbook kept the window under 24 hours). Refused while the active profile
is not postgres, or while the fence is up (the device was rolled back:
ending the window would let stale processes write into the abandoned
database), unless --force. What is left of a journal broken by hand (its
table dropped, triggers still failing every write) is removed on any
profile ("REPAIRED").

Exit codes: 0 ended, repaired, or there was no window; 1 refused or failed,
nothing changed; 2 usage error.
"""
from dataclasses import asdict

from anthias_rollback import conf, profiles
from anthias_rollback.exceptions import ConfigError
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.window import cutover as window_cutover
from anthias_rollback.window import journal as window_journal


class Command(RollbackCommand):
    help = ('Remove the change journal and write fence from PostgreSQL '
            'once the device stays there. Exit codes: 0 ended, 1 refused '
            '(nothing changed), 2 usage.')

    def add_arguments(self, parser):
        parser.add_argument('--force', action='store_true',
                            help='end it even off the postgres profile or '
                                 'with the fence up')

    def run(self, *args, **options):
        alias = profiles.POSTGRES
        active = conf.current_profile()
        state = window_journal.window_state(alias)
        # What is left of a journal broken by hand protects nothing (its
        # triggers only make every write fail): removed on any profile.
        broken = not state.installed and bool(state.problems)
        if not options['force'] and not broken:
            if active.name != profiles.POSTGRES:
                raise ConfigError(
                    f'the active profile is {active.name}: the window '
                    'protects a rollback to SQLite; end it only while '
                    'running on postgres (or pass --force)')
            if state.fence == 'up':
                raise ConfigError(
                    'the write fence is up (this device was rolled back): '
                    'ending the window would let stale processes write '
                    'into PostgreSQL; run switch_database --to postgres '
                    'first (or pass --force)')
        if state.installed:
            before = window_journal.end_window(alias)
            window_cutover.record_window_end(conf.data_dir(), before)
        elif broken:
            window_journal.end_window(alias)
        self.set_json({'ended': state.installed, 'repaired': broken,
                       **asdict(state)})
        if options['json']:
            return
        if broken:
            self.stdout.write(self.style.SUCCESS(
                f'REPAIRED: removed what was left of a broken change '
                f'journal (triggers on {len(state.tables)} tables); '
                'writes go through again'))
        elif state.installed:
            self.stdout.write(self.style.SUCCESS(
                f'ENDED: rollback window closed ({state.entries} journal '
                f'entries since {state.cutover_at} removed; triggers on '
                f'{len(state.tables)} tables dropped)'))
        else:
            self.stdout.write('no rollback window is open on PostgreSQL')
