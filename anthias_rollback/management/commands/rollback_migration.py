"""Roll the device back onto SQLite: zero loss from PostgreSQL, or from a
verified backup with the at-risk rows exported. Crash-safe and reported.

    python manage.py rollback_migration --emergency
    python manage.py rollback_migration --source backup \
        --preserve-postgres --yes

--json prints one JSON document (the result plus `data_loss`: status,
detail, lost_writes) for every outcome; --report PATH writes it (0600).

Exit codes: 0 rolled back, verified and nothing left out (loss proven
none, or a backup that holds every row PostgreSQL holds; or a dry run;
or already on sqlite with nothing to roll back); 1 refused or failed,
live database and profile unchanged; 2 usage error; 4 rolled back, but
a write is missing (named), the loss is bounded (standby) or unknown
(backup, PostgreSQL not compared), rows were left out (exported), or
post-verification, the restart or a rebuild command
(ANTHIAS_ROLLBACK_REBUILD_COMMANDS) failed (look at it).
"""
import contextlib
import getpass
import sys
from datetime import UTC, datetime
from pathlib import Path

from django.core.management.base import CommandError

from anthias_rollback import conf, exit_codes, profiles, restart, rollback
from anthias_rollback.exceptions import ConfigError, RollbackError
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import (
    batch_size,
    path_arg,
    positive_minutes,
    text_arg,
)
from anthias_rollback.report import redact
from anthias_rollback.rollback import preview
from anthias_rollback.rollback import render as rollback_render


class Command(RollbackCommand):
    help = ('Roll back onto SQLite from PostgreSQL (zero loss) or a '
            'verified backup; crash-safe, verified, reported. Exit codes: '
            '0 done with nothing left out, 1 refused/failed (nothing '
            'changed), 2 usage, 4 rolled back but a write is missing, the '
            'loss is bounded or unknown, or a follow-up failed.')

    def add_arguments(self, parser):
        parser.add_argument('--emergency', '--emergency-mode',
                            action='store_true', dest='emergency',
                            help='fastest safe path: no prompt, quick_check '
                                 '+ counts; never skips the safety copy, '
                                 'the lock or the atomic swap')
        parser.add_argument('--source', choices=rollback.SOURCE_CHOICES,
                            help='where the data comes from (default auto: '
                                 'postgres if usable, else backup)')
        parser.add_argument('--backup-path', metavar='PATH', type=path_arg,
                            help='backup to restore (default: newest '
                                 'verified in the backup dir)')
        parser.add_argument('--original-db-path', metavar='PATH',
                            type=path_arg,
                            help='the live SQLite file (default: the '
                                 'sqlite alias\'s file)')
        parser.add_argument('--preserve-postgres', action='store_true',
                            help='pg_dump PostgreSQL into the backup dir '
                                 'first')
        parser.add_argument('--no-verify', action='store_true',
                            help='verify with quick_check only')
        parser.add_argument('--no-fence', action='store_true',
                            help='do not make PostgreSQL read-only during '
                                 'the copy (writes made meanwhile are lost)')
        parser.add_argument('--full', action='store_true',
                            help='from PostgreSQL, copy every row instead '
                                 'of applying the journal\'s tail to the '
                                 'standby (or the cutover file)')
        parser.add_argument('--no-restart', action='store_true',
                            help='do not run the restart command')
        parser.add_argument('--dry-run', action='store_true',
                            help='build and verify into a scratch file, '
                                 'change nothing live')
        parser.add_argument('--timeout-minutes', type=positive_minutes,
                            default=5.0,
                            help='deadline for the whole run (default 5)')
        parser.add_argument('--batch-size', type=batch_size,
                            default=5_000,
                            help='rows per batch of the full copy '
                                 '(default 5000)')
        parser.add_argument('--yes', '--noinput', action='store_true',
                            dest='yes', help='do not ask for confirmation')
        parser.add_argument('--generate-report', action='store_true',
                            help='print the latest rollback report again')
        parser.add_argument('--trigger', type=text_arg, metavar='TEXT',
                            help='who or what started this rollback, for '
                                 'the URGENT notice and the log (default: '
                                 'the operator; the monitor passes its '
                                 'rule and figures)')
        for name in ('host', 'port', 'db', 'user', 'password'):
            # A bad port is the core's to name: a typo, not an outage
            # (exit 1, tests/test_rollback_typos.py).
            parser.add_argument(f'--postgres-{name}', type=text_arg,
                                help=f'override the postgres alias\'s '
                                     f'{name} (runbook compatibility)')

    def handle(self, *args, **options):
        # balena: restarting this container ends the process, so it comes
        # after the verdict and the JSON document (restart.py).
        with restart.last_restart(self.stderr.write) as last:
            super().handle(*args, **options)
        if last.error:
            raise CommandError(last.error, returncode=exit_codes.FOLLOW_UP)

    def run(self, *args, **options):
        self.set_json({'data_loss': rollback_render.NOT_RUN})
        if options['generate_report']:
            return self.show_latest(options['json'])
        overrides = {k: options[f'postgres_{k}'] for k in
                     ('host', 'port', 'db', 'user', 'password')
                     if options[f'postgres_{k}']}
        if 'password' in overrides:
            self.stderr.write(self.style.WARNING(
                'warning: --postgres-password is visible to other users '
                'in the process list; prefer POSTGRES_PASSWORD or '
                'ANTHIAS_POSTGRES_URL in the environment'))
        check_live_path(options['original_db_path'])
        with profiles.postgres_override_alias(overrides) as pg_alias:
            opts = rollback.RollbackOptions(
                source=options['source'] or rollback.AUTO,
                source_explicit=options['source'] is not None,
                live_path=options['original_db_path'],
                backup_path=options['backup_path'],
                postgres_alias=pg_alias,
                emergency=options['emergency'],
                dry_run=options['dry_run'],
                verify=not options['no_verify'],
                preserve_postgres=options['preserve_postgres'],
                fence=not options['no_fence'],
                timeout_seconds=options['timeout_minutes'] * 60,
                restart=not options['no_restart'],
                batch_size=options['batch_size'],
                full=options['full'])
            done = rollback.already_rolled_back(opts)
            if done is not None:
                return self.already_done(done, options['json'])
            nothing = rollback.never_left_sqlite(opts)
            if nothing is not None:
                return self.nothing_to_do(nothing, options['json'])
            self.confirm(opts, options)
            verbose = options['verbosity'] >= 1 and not options['json']
            if verbose and not opts.dry_run:
                trigger = options['trigger'] or (
                    f'operator {getpass.getuser()} (rollback_migration'
                    + (' --emergency' if opts.emergency else '') + ')')
                self.stdout.write(self.style.WARNING(rollback.urgent_notice(
                    'PostgreSQL is to be left for SQLite', datetime.now(
                        UTC).isoformat(timespec='seconds'),
                    trigger)))
            try:
                with restart.update_lock():
                    result = rollback.run_rollback(
                        opts, progress=self.render_progress(options))
            except RollbackError as err:
                where = getattr(err, 'report_path', None)
                self.set_failed_result(where)
                raise CommandError(
                    redact(str(err)) + (f' (report: {where})' if where
                                        else ''),
                    returncode=exit_codes.FAILED) from err
        self.render(result, options)

    def set_failed_result(self, report_path) -> None:
        """The failed run's report as the JSON document's data."""
        if not report_path:
            return
        # OSError, ValueError, TypeError: an unreadable report leaves the
        # document without the result; the error line still names it.
        with contextlib.suppress(OSError, ValueError, TypeError):
            result = rollback.load_result(report_path)
            self.set_json({**result.as_dict(), 'data_loss':
                           rollback_render.data_loss(result)})

    def confirm(self, opts, options) -> None:
        if options['yes'] or opts.emergency or opts.dry_run:
            return
        if not sys.stdin.isatty():
            self.fail('refusing to roll back unattended without --yes (or '
                      '--emergency)')
        # The facts first, measured now (reads only): source, how many
        # rows or journal entries, what happens to PostgreSQL, the loss.
        facts = preview.preview(opts)
        self.stdout.write('About to roll back onto SQLite:')
        for line in facts.lines():
            self.stdout.write(line)
        self.stdout.flush()
        answer = input('Roll back now? [y/N] ')
        if answer.strip().lower() not in ('y', 'yes'):
            self.fail('cancelled; nothing changed')

    def render_progress(self, options):
        if options['json']:
            return None
        return self.render_events(options['verbosity'])

    def render(self, result, options) -> None:
        self.set_json({**result.as_dict(),
                       'data_loss': rollback_render.data_loss(result)})
        if not options['json']:
            if options['verbosity'] >= 1:
                self.stdout.write(rollback.render_summary(result))
                if result.outcome != rollback.Outcome.DRY_RUN:
                    self.stdout.write(rollback.resolved_notice(result))
            self.write_verdict(rollback_render.verdict_line(result),
                               ok=rollback_render.verdict_ok(result))
        if result.exit_code != exit_codes.OK:
            raise CommandError(rollback_render.problems_line(result),
                               returncode=result.exit_code)

    def already_done(self, result, as_json: bool) -> None:
        """A rerun after a finished rollback: the same answer, one line,
        no banner (deploy hooks retry; a second operator looks)."""
        self.set_json({**result.as_dict(),
                       'data_loss': rollback_render.data_loss(result),
                       'already': True})
        line = rollback_render.already_line(result)
        if not as_json:   # stdout holds the JSON document alone
            self.write_verdict(line, ok=result.exit_code == exit_codes.OK)
        if result.exit_code != exit_codes.OK:
            self.fail(line, result.exit_code)

    def nothing_to_do(self, line: str, as_json: bool) -> None:
        """Already on sqlite, never rolled back: exit 0, one line, and a
        JSON document whose loss says nothing happened."""
        self.set_json({'outcome': 'nothing to roll back', 'source': None,
                       'loss': 'none', 'already': 'sqlite',
                       'data_loss': {'status': 'none',
                                     'detail': 'nothing happened: ' + line,
                                     'lost_writes': []}})
        if not as_json:
            self.write_verdict(line)

    def show_latest(self, as_json: bool) -> None:
        path = rollback.latest_report(conf.reports_dir())
        if path is None:
            self.fail(f'no rollback report in {conf.reports_dir()}')
        try:
            result = rollback.load_result(path)
        except (OSError, ValueError) as err:
            self.fail(f'cannot read rollback report {path}: {err}')
        self.set_json({**result.as_dict(),
                       'data_loss': rollback_render.data_loss(result)})
        if not as_json:
            self.stdout.write(rollback.render_summary(result))
            done = result.outcome.startswith(rollback.Outcome.ROLLED_BACK)
            self.stdout.write(rollback.resolved_notice(result) if done else
                              rollback.failed_notice(result))


def check_live_path(given: str | None) -> None:
    """--original-db-path must name the file the app reads (the sqlite
    alias's): a mistyped path once got a new file there, the profile
    flipped and 'data loss: none', while the app went on reading its
    real file, which lacked every PostgreSQL write."""
    if given is None:
        return
    live = profiles.sqlite_alias_path(profiles.SQLITE)
    if Path(given).expanduser().resolve() != Path(live).resolve():
        raise ConfigError(
            f'--original-db-path {given} is not the file the app reads '
            f'(the sqlite alias\'s {live}); a rollback there would leave '
            'the app on its old data. Give that path or leave the option '
            'out; nothing changed')
