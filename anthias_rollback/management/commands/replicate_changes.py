"""Keep the standby SQLite file current from PostgreSQL's change journal.

    python manage.py replicate_changes              # runs until stopped
    python manage.py replicate_changes --once       # one batch (cron, tests)

While the profile is postgres and a rollback window is open, applies the
journal to `<data dir>/standby/standby.db` (WAL mode) in batches, each in
one SQLite transaction that also records its position, every
--interval seconds (default 0.5: about 1 s behind). Started from the
cutover file the switch took. PostgreSQL down or unreachable: one line
per change of state, retries with backoff up to --max-backoff seconds,
never exits for it. `rollback_migration --emergency` restores the
standby when PostgreSQL is down. SIGTERM/SIGINT stop it cleanly.

Exit codes: 0 done (--once) or stopped cleanly (signal, profile left
postgres, window ended); 1 refused (profile not postgres, no window,
another replicator running) or --once failed, standby unchanged;
2 usage error.
"""
import signal
import threading
from dataclasses import asdict

from anthias_rollback import events, profiles
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import positive_float
from anthias_rollback.window import replicator as window_replicator


class Command(RollbackCommand):
    help = ('Keep the standby SQLite file (<data dir>/standby/standby.db) '
            'current from the PostgreSQL change journal. Exit codes: 0 '
            'done or stopped cleanly, 1 refused (profile not postgres, no '
            'rollback window) or --once failed, 2 usage.')

    def add_arguments(self, parser):
        parser.add_argument('--once', action='store_true',
                            help='apply what the journal holds now, then '
                                 'exit')
        parser.add_argument('--interval', type=positive_float,
                            default=window_replicator.DEFAULT_INTERVAL,
                            help='seconds between batches (default '
                                 '%(default)s)')
        parser.add_argument('--max-backoff', type=positive_float,
                            default=window_replicator.MAX_BACKOFF,
                            help='longest wait between retries while '
                                 'PostgreSQL is down (default %(default)s)')

    def run(self, *args, **options):
        stop = threading.Event()
        if not options['once']:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stop.set())
        result = window_replicator.run_replicator(
            profiles.POSTGRES, once=options['once'],
            interval=options['interval'],
            max_backoff=options['max_backoff'], stop=stop,
            # --json: stdout holds the document only (warnings: stderr).
            progress=self.on_event(
                -1 if options['json'] else options['verbosity']))
        self.set_json(asdict(result))
        if options['json']:
            return
        position = result.position
        if position is None:
            where = 'no position'
        elif position.journal_id:
            where = (f'position {position.position_at}, last journal id '
                     f'applied {position.journal_id}')
        else:
            # Id 0: nothing applied since the standby was built (a
            # rebuild from a full copy after an upgrade, say).
            where = (f'position {position.position_at}, no journal entry '
                     f'applied since it started from the '
                     f'{position.started_from}')
        self.stdout.write(f'STANDBY {result.stopped}: {result.entries} '
                          f'journal entries applied in {result.rounds} '
                          f'batch(es); {where}')

    def on_event(self, verbosity: int):
        def render(event: events.ProgressEvent) -> None:
            if event.kind == events.WARNING:
                self.stderr.write(self.style.WARNING(event.detail))
            elif event.kind == events.PHASE_DONE and verbosity >= 1:
                self.stdout.write(event.detail)
            elif event.kind == events.BATCH and verbosity >= 2:
                self.stdout.write(f'  batch: {event.rows} entries, '
                                  f'{event.total} keys in '
                                  f'{event.seconds * 1000:.0f} ms')
            self.stdout.flush()
        return render
