"""Watch the app after a cutover; alert or roll back when it misbehaves.

    python manage.py monitor_migration --interval 5 --max-duration 3600
    python manage.py monitor_migration --base-url http://127.0.0.1:8080 \\
        --auto-rollback --json-lines

Every --interval seconds, probes /health and ANTHIAS_ROLLBACK_VERIFY_URLS,
in-process (Django's test client) or over HTTP with --base-url. A trigger
(response time, window error rate, slowdown against the baseline, database
unreachable) counts only after --consecutive bad rounds in a row. Record a
baseline on SQLite first with --record-baseline. While the profile is
postgres and a rollback window is open, the standby replicate_changes
keeps is checked too: more than --max-standby-lag seconds behind,
missing, or replicate_changes' last rounds failed (the alert names its
last error), is an ALERT (stderr, once when it begins and once when it ends),
never a trigger, even with --auto-rollback. --json-lines streams one JSON
object per round; --json prints one final JSON document.

Exit codes: 0 ran to --max-duration/--max-probes or Ctrl-C with no trigger
and no alert, baseline recorded, or triggered and rolled back; 1 could not
run (bad input, base URL not answering, nothing changed) or the rollback
failed; 2 usage error; 3 a trigger fired (no --auto-rollback): roll back,
or a standby alert was raised and no trigger followed: look; 4 rolled
back, but its follow-up (restart, post-checks) failed.
"""
import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

from django.core.management import call_command, get_commands
from django.core.management.base import CommandError

from anthias_rollback import conf, exit_codes, profiles, restart
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import (
    http_url,
    non_negative_float,
    number,
    percent_above_zero,
    positive_float,
    positive_int,
    positive_ms,
)
from anthias_rollback.monitor import loop as monitor_loop
from anthias_rollback.monitor import probes as monitor_probes
from anthias_rollback.monitor import rules as monitor_rules
from anthias_rollback.report import redact

ROLLBACK_COMMAND = 'rollback_migration'
# A monitor may watch for weeks; a pct may exceed 100 (300 = 4x slower).
max_duration = number(0.0, 366 * 24 * 3600.0)
degradation_pct = number(0.0, 1e6)


def run_rollback(stdout: Any, stderr: Any, verbosity: int = 1,
                 trigger: str = 'monitor_migration') -> None:
    """Start the emergency rollback, with the same lock and report as when
    a person runs it, naming the rule that fired. Returns on success;
    raises CommandError carrying the rollback's exit code (1 nothing
    changed, 4 follow-up failed)."""
    call_command(ROLLBACK_COMMAND, '--emergency', '--yes', '--trigger',
                 trigger, stdout=stdout, stderr=stderr, verbosity=verbosity)


class Command(RollbackCommand):
    help = ('Probe /health and ANTHIAS_ROLLBACK_VERIFY_URLS every '
            '--interval seconds after a cutover; on a persisting trigger, '
            'alert (exit 3) or, with --auto-rollback, run rollback_migration '
            '--emergency; a lagging or missing standby or a failing '
            'replicate_changes is an alert, never a rollback. Exit codes: '
            '0 no trigger and no alert (or rolled back), 1 could not run '
            '/ rollback failed, 2 usage, 3 trigger fired or standby alert, '
            '4 rolled back but its follow-up failed.')

    def add_arguments(self, parser):
        parser.add_argument('--interval', type=positive_float, default=5.0,
                            help='seconds between probe rounds (default 5)')
        parser.add_argument('--window', type=positive_int, default=20,
                            help='rounds in the error-rate window '
                                 '(default 20)')
        parser.add_argument('--baseline-probes', type=positive_int,
                            default=5,
                            help='rounds that make the baseline when none '
                                 'is stored, and rounds --record-baseline '
                                 'measures (default 5)')
        parser.add_argument('--consecutive', type=positive_int, default=3,
                            help='bad rounds in a row before a trigger '
                                 'counts (default 3)')
        parser.add_argument('--max-response-ms', type=positive_ms,
                            help='slowest acceptable probe, ms (default '
                                 'ANTHIAS_ROLLBACK_MONITOR_MAX_RESPONSE_MS'
                                 ', 1000)')
        parser.add_argument('--max-error-rate', type=percent_above_zero,
                            help='failed probes in the window, percent '
                                 '(default ANTHIAS_ROLLBACK_MONITOR_MAX_'
                                 'ERROR_RATE, 5)')
        parser.add_argument('--max-degradation-pct', type=degradation_pct,
                            help='percent slower than the baseline '
                                 '(default ANTHIAS_ROLLBACK_MONITOR_MAX_'
                                 'DEGRADATION_PCT, 300)')
        parser.add_argument('--max-standby-lag', type=non_negative_float,
                            help='seconds the standby may be behind '
                                 'PostgreSQL while a rollback window is '
                                 'open before an alert (never a rollback);'
                                 ' 0 turns the standby check off (default '
                                 'ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG'
                                 ', 30)')
        parser.add_argument('--base-url', type=http_url,
                            help='probe a running server over HTTP, e.g. '
                                 'http://127.0.0.1:8080 (default: '
                                 'in-process)')
        parser.add_argument('--timeout', type=positive_float, default=10.0,
                            help='HTTP timeout per probe, seconds '
                                 '(default 10)')
        parser.add_argument('--max-duration', type=max_duration,
                            help='stop after this many seconds (default: '
                                 'run until a trigger or Ctrl-C)')
        parser.add_argument('--max-probes', type=positive_int,
                            help='stop after this many rounds')
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument('--record-baseline', action='store_true',
                          help='measure --baseline-probes rounds on SQLite '
                               'and store them as the baseline')
        mode.add_argument('--auto-rollback', action='store_true',
                          help='on a trigger, run rollback_migration '
                               '--emergency --yes')
        parser.add_argument('--json-lines', action='store_true',
                            help='one JSON object per round and a final '
                                 'one, one per line, on stdout')

    def handle(self, *args, **options):
        # balena: the rollback's restart of this container ends the
        # monitor too; it comes after the monitor's own last line.
        with restart.last_restart(self.stderr.write) as last:
            super().handle(*args, **options)
        if last.error:
            raise CommandError(last.error, returncode=exit_codes.FOLLOW_UP)

    def run(self, *args, **options):
        # Both keep stdout for JSON: the stream, or the final document.
        self.json_lines = options['json_lines']
        self.json_document = options['json']
        self.as_json = self.json_document or self.json_lines
        self.verbosity = options['verbosity']
        if self.json_document and self.json_lines:
            self.json_lines = False
            self.fail('--json prints one document, --json-lines a stream: '
                      'choose one', exit_codes.USAGE)
        thresholds = monitor_rules.default_thresholds(
            max_response_ms=options['max_response_ms'],
            max_error_rate=options['max_error_rate'],
            max_degradation_pct=options['max_degradation_pct'])
        max_lag = monitor_rules.default_max_standby_lag(
            options['max_standby_lag'])
        config = monitor_rules.MonitorConfig(
            urls=monitor_probes.monitored_urls(), thresholds=thresholds,
            interval=options['interval'], window=options['window'],
            baseline_probes=options['baseline_probes'],
            consecutive=options['consecutive'],
            base_url=options['base_url'], timeout=options['timeout'],
            max_duration=options['max_duration'],
            max_probes=options['max_probes'], max_standby_lag=max_lag,
            data_dir=conf.data_dir(), postgres_alias=profiles.POSTGRES)
        if options['record_baseline']:
            return self.record(config)
        info = monitor_probes.check_target(config)
        if options['auto_rollback']:
            self.check_can_roll_back()
        baseline, warning = monitor_loop.select_baseline(config)
        if warning:
            self.stderr.write(self.style.WARNING(warning))
        config = dataclasses.replace(config, baseline=baseline)
        if not self.as_json and self.verbosity >= 1:
            self.stdout.write(
                f'watching {info.target} (profile '
                f'{info.profile or "unknown"}): {", ".join(config.urls)} '
                f'every {config.interval:g}s; trigger after '
                f'{config.consecutive} bad rounds'
                + ('; baseline from file' if baseline else '')
                + (f'; standby alert past {max_lag:g}s behind' if max_lag
                   else '; standby not checked'))
        result = monitor_loop.run_monitor(config, on_probe=self.show_round)
        self.finish(result, options['auto_rollback'])

    def check_can_roll_back(self) -> None:
        """--auto-rollback is refused up front when it could not work."""
        if ROLLBACK_COMMAND not in get_commands():
            self.fail(f'--auto-rollback needs the {ROLLBACK_COMMAND} '
                      f'command, which is not installed')
        active = conf.current_profile()
        if active.name != profiles.POSTGRES:
            self.fail(f'--auto-rollback rolls back from PostgreSQL, but '
                      f'the active profile is {active.name} (from '
                      f'{active.source}); nothing to roll back')

    def record(self, config: monitor_rules.MonitorConfig) -> None:
        baseline, path = monitor_loop.record_baseline(config,
                                                      on_probe=self.show_round)
        self.set_json({'event': 'baseline', 'path': str(path),
                       **baseline.as_dict()})
        if self.json_lines:
            self.write_line(self.json_data)
        if self.as_json:
            return
        values = ', '.join(f'{url} {ms:.1f} ms'
                           for url, ms in baseline.ms.items())
        self.write_verdict(
            f'baseline recorded ({baseline.rounds} rounds on '
            f'{baseline.profile}): {values}; saved to {path}')

    def finish(self, result: monitor_rules.MonitorResult,
               auto_rollback: bool) -> None:
        self.set_json({'event': 'result', **result.as_dict(),
                       'rollback': None})
        if self.json_lines:
            self.write_line({'event': 'result', **result.as_dict()})
        if not result.triggered:
            summary = (f'{result.rounds} rounds in {result.seconds:.1f}s '
                       f'(stopped: {result.stopped}; baseline from '
                       f'{result.baseline_source})')
            if result.alerts:
                # A problem seen, as a trigger is: exit 3, but nothing
                # was rolled back (a lagging standby is a reason to look).
                alert = ('ALERT, no rollback trigger: '
                         + '; '.join(a.message for a in result.alerts)
                         + f'; {summary}')
                if not self.as_json:
                    self.write_verdict(alert, ok=False)
                self.fail(alert, exit_codes.NO)
            if not self.as_json:
                self.write_verdict(f'no trigger: {summary}')
            return
        reasons = '; '.join(b.message for b in result.reasons)
        assert result.last is not None   # a trigger ends a round
        alert = (f'ROLLBACK TRIGGER after {result.last.consecutive} bad '
                 f'rounds in a row: {reasons}')
        if not auto_rollback:
            if not self.as_json:
                self.write_verdict(alert, ok=False)
            self.fail(f'{alert}; roll back with `manage.py '
                      f'{ROLLBACK_COMMAND} --emergency`', exit_codes.NO)
        self.stderr.write(self.style.ERROR(f'{alert}; rolling back now'))
        # With --json/--json-lines, stdout holds only JSON: the
        # rollback's own output goes to stderr.
        out = self.stderr if self.as_json else self.stdout
        try:
            # -v3's SQL log is already on: the nested command must not
            # attach a second one (every line twice).
            run_rollback(out, self.stderr, min(self.verbosity, 2),
                         trigger=f'monitor_migration: {alert}')
        except CommandError as err:
            code = getattr(err, 'returncode', exit_codes.FAILED)
            self.json_data['rollback'] = {'returncode': code,
                                          'error': redact(str(err))}
            if self.json_lines:
                self.write_line({'event': 'rollback', 'returncode': code,
                                 'error': str(err)})
            # Exit 4 is a rollback that happened with a follow-up to do
            # (a bounded loss, a restart that failed): not a failure.
            done = ('rolled back after the trigger' if
                    code == exit_codes.FOLLOW_UP else 'the rollback failed')
            self.fail(f'{alert}; {done}: {err}', code)
        self.json_data['rollback'] = {'returncode': 0, 'error': None}
        if self.json_lines:
            self.write_line({'event': 'rollback', 'returncode': 0})
        elif not self.as_json:
            self.write_verdict(f'rolled back after the trigger ({reasons})')

    def conclude(self, code: int, error: str | None) -> None:
        # --json-lines: the stream ends in the verdict, an object too.
        if getattr(self, 'json_lines', False):
            self.as_json = self.json_document
            if code != exit_codes.OK:
                self.write_line({'event': 'error', 'exit_code': code,
                                 'error': error})
            self.verdict_written = True
        super().conclude(code, error)

    def show_round(self, rnd: monitor_rules.RoundResult) -> None:
        if self.json_lines:
            self.write_line({'event': 'probe', **rnd.as_dict()})
            for alert in rnd.alerts:
                self.write_line({'event': 'alert', 'round': rnd.number,
                                 **dataclasses.asdict(alert)})
        for alert in rnd.alerts:
            # Every verbosity: an alert is what the monitor is for.
            if alert.cleared:
                self.stderr.write(f'alert cleared: {alert.message}')
            else:
                self.stderr.write(self.style.WARNING(
                    f'ALERT ({alert.kind}): {alert.message}'))
        if self.as_json:
            return
        if self.verbosity < 1:
            return
        probes = ', '.join(
            f'{p.url} {p.status if p.status is not None else "---"} '
            f'{p.ms:.0f} ms' for p in rnd.probes)
        line = (f'#{rnd.number} +{rnd.elapsed:.1f}s '
                f'{"BAD" if rnd.bad else "ok "} {probes} | window errors '
                f'{rnd.error_rate:.1f} %')
        if rnd.standby is not None and rnd.standby.lag_seconds is not None:
            line += f' | standby {rnd.standby.lag_seconds:.1f}s behind'
        elif rnd.standby is not None \
                and rnd.standby.state != monitor_rules.STANDBY_NOT_EXPECTED:
            line += f' | standby {rnd.standby.state}'
        if rnd.bad:
            line += (f' | bad {rnd.streak}/{rnd.consecutive}: '
                     + '; '.join(b.message for b in rnd.breaches))
            self.stdout.write(self.style.WARNING(line))
        else:
            self.stdout.write(line)
        if self.verbosity >= 2:
            for probe in rnd.probes:
                if probe.error:
                    self.stderr.write(f'  {probe.url}: {probe.error}')

    def write_line(self, data: dict[str, Any]) -> None:
        """One JSON object per line (log shippers), secrets redacted."""
        data = {'time': datetime.now(UTC).isoformat(), **data}
        self.stdout.write(json.dumps(redact(data), sort_keys=True,
                                     default=str))
