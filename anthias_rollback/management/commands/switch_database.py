"""Flip the active database profile (sqlite/postgres), checked and atomic.

    python manage.py switch_database --to postgres
    python manage.py switch_database --show --json

Before flipping, the target must answer and have no unapplied migrations;
a switch to postgres also needs PostgreSQL to hold exactly SQLite's rows
(counts and checksums) and installs the change journal and write fence
with the cutover, lifting a fence left by a rollback (all unless
--force, which is recorded). --show also reports the rollback window,
the standby and the replicator's last rounds (failing, and its last
error). The state file in the data dir is replaced atomically;
the restart adapter (ANTHIAS_ROLLBACK_RESTART_ADAPTER) runs afterwards.

Exit codes: 0 switched (or shown); 1 refused, nothing changed;
2 usage error; 4 switched, but the restart command failed.
"""
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError

from anthias_rollback import conf, exit_codes, profiles, restart, switch
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.report import first_line
from anthias_rollback.window import journal as window_journal
from anthias_rollback.window import standby as window_standby


class Command(RollbackCommand):
    help = ('Flip the active database profile (sqlite/postgres) after '
            'checking the target; --show prints the active one. Exit '
            'codes: 0 done, 1 refused (nothing changed), 2 usage, '
            '4 switched but the restart command failed.')

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument('--to', choices=profiles.PROFILES,
                           help='profile to make active')
        group.add_argument('--show', action='store_true',
                           help='print the active profile and its source')
        parser.add_argument('--force', action='store_true',
                            help='flip even if the target fails its checks')
        parser.add_argument('--no-restart', action='store_true',
                            help='do not run the restart command')

    def handle(self, *args, **options):
        # balena: restarting this container ends the process, so it comes
        # after the verdict and the JSON document (restart.py).
        with restart.last_restart(self.stderr.write) as last:
            super().handle(*args, **options)
        if last.error:
            raise CommandError(last.error, returncode=exit_codes.FOLLOW_UP)

    def run(self, *args, **options):
        if options['show']:
            return self.show(options['json'], options['verbosity'])
        with restart.update_lock():
            result = switch.switch_profile(
                options['to'], force=options['force'],
                restart=not options['no_restart'])
        self.set_json(asdict(result))
        if not options['json']:
            for warning in result.warnings:
                self.stderr.write(self.style.WARNING(warning))
            if result.forced:
                self.stderr.write(self.style.WARNING(
                    'forced: the target was not checked'))
            if result.restart is not None and options['verbosity'] >= 1:
                self.stdout.write(f'{result.restart.describe()} in '
                                  f'{result.restart.seconds:.1f}s')
            self.stdout.write(self.style.SUCCESS(
                f'active profile: {result.profile} (was {result.previous}; '
                f'state file {result.state_file})'))
        if result.restart is not None and not result.restart.ok:
            self.fail(f'profile switched to {result.profile}, but the '
                      f'{result.restart.failure_line()}',
                      exit_codes.FOLLOW_UP)

    def show(self, as_json: bool, verbosity: int) -> None:
        active = profiles.resolve_active_profile(conf.data_dir())
        try:
            state = asdict(window_journal.window_state(profiles.POSTGRES))
        except Exception as err:  # noqa: BLE001 --show must answer anyway
            state = {'error': first_line(err)}
        try:
            kept = window_standby.standby_state(conf.data_dir(),
                                                profiles.POSTGRES)
            lag = {'position_at': kept.position_at,
                   'lag_seconds': kept.lag_seconds,
                   'pending': kept.pending, 'problem': kept.problem}
        except Exception as err:  # noqa: BLE001 --show must answer anyway
            lag = {'position_at': None, 'lag_seconds': None,
                   'pending': None, 'problem': first_line(err)}
        replicator = replicator_block(conf.data_dir())
        self.set_json({**asdict(active), 'window': state, 'standby': lag,
                       'replicator': replicator})
        if as_json:
            return
        if 'error' in state:
            detail = f'PostgreSQL not readable ({state["error"]})'
        elif not state['installed']:
            detail = 'no change journal on PostgreSQL'
        else:
            detail = (f'change journal since {state["cutover_at"]} '
                      f'({state["entries"]} entries), fence {state["fence"]}'
                      + (', cutover FORCED' if state['forced'] else ''))
        if verbosity >= 1:
            self.stdout.write(f'rollback window: {detail}')
            self.stdout.write(render_standby(lag))
            if replicator['recorded']:
                line = f'replicator: {replicator["summary"]}'
                self.stdout.write(self.style.WARNING(line)
                                  if replicator['failing'] else line)
        self.stdout.write(f'active profile: {active.name} '
                          f'(from {active.source}: {active.detail})')


def replicator_block(data_dir: Path) -> dict[str, Any]:
    """What replicate_changes recorded of its rounds, for --show: a
    replicator failing every round is named here, not only in its log."""
    health = window_standby.replicator_health(data_dir)
    block = asdict(health)
    block.update(path=str(health.path), failing=health.failing,
                 summary=health.describe())
    return block


def render_standby(lag: dict) -> str:
    """One line on the standby: position, lag and pending entries, or
    why they are not known."""
    if not lag['position_at']:
        return f'standby: {lag["problem"] or "none"}'
    line = f'standby: at {lag["position_at"]}'
    if lag['lag_seconds'] is not None:
        line += f', {lag["lag_seconds"]:.1f}s behind'
    if lag['pending'] is not None:
        line += f', {lag["pending"]} journal entries pending'
    if lag['problem']:
        line += f' ({lag["problem"]})'
    return line
