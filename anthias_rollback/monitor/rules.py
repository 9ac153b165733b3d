"""The monitor's decisions: what it watches for (Thresholds, the
baseline, MonitorConfig), what a round found (Probe, Breach, Alert,
RoundResult, MonitorResult), and the rules that judge it: the sliding
window and the trigger rules (`Evaluator`), the standby rule
(`StandbyWatch`: warning-level alerts, never a trigger).

A round is *bad* when it breaches a threshold; the trigger fires only
after `consecutive` bad rounds in a row. An *alert* (the standby lagging
or missing, or replicate_changes failing, while a rollback window is
open) is reported but never counts
towards a trigger: a lagging standby is a reason to look, not to roll
back. Reads settings, the state file, the standby and two catalog or
journal queries on PostgreSQL (StandbyWatch); never prints.
"""
import math
import sqlite3
import statistics
import urllib.parse
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections

from anthias_rollback import conf, profiles
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.exceptions import (
    ConfigError,
    MonitorInputError,
    RollbackError,
)
from anthias_rollback.report import first_line
from anthias_rollback.window import standby as window_standby

IN_PROCESS = 'in-process'

RESPONSE_TIME = 'response_time'
ERROR_RATE = 'error_rate'
DEGRADATION = 'degradation'
DATABASE_UNREACHABLE = 'database_unreachable'
# Alert kinds: reported, never a trigger.
STANDBY_LAG = 'standby_lag'
STANDBY_MISSING = 'standby_missing'
REPLICATOR_FAILING = 'replicator_failing'
# StandbyResult.state
STANDBY_OK = 'ok'
STANDBY_LAGGING = 'lagging'
STANDBY_ABSENT = 'missing'
STANDBY_FAILING = 'failing'
STANDBY_NOT_EXPECTED = 'not expected'
STANDBY_UNKNOWN = 'unknown'

STOP_TRIGGER = 'trigger'
STOP_MAX_DURATION = 'max-duration'
STOP_MAX_PROBES = 'max-probes'
STOP_INTERRUPTED = 'interrupted'

THRESHOLD_SETTINGS = {
    'max_response_ms': 'ANTHIAS_ROLLBACK_MONITOR_MAX_RESPONSE_MS',
    'max_error_rate': 'ANTHIAS_ROLLBACK_MONITOR_MAX_ERROR_RATE',
    'max_degradation_pct': 'ANTHIAS_ROLLBACK_MONITOR_MAX_DEGRADATION_PCT',
    'min_slowdown_ms': 'ANTHIAS_ROLLBACK_MONITOR_MIN_SLOWDOWN_MS',
}
STANDBY_LAG_SETTING = 'ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG'


@dataclass(frozen=True)
class Thresholds:
    max_response_ms: float       # any probe slower than this is bad
    max_error_rate: float        # percent of failed probes in the window
    max_degradation_pct: float   # percent slower than the baseline
    min_slowdown_ms: float       # ...and at least this many ms slower

    def __post_init__(self) -> None:
        for name in THRESHOLD_SETTINGS:
            check_positive(f'threshold {name}', getattr(self, name))


@dataclass(frozen=True)
class Baseline:
    """Median latency per URL of a healthy app (SQLite, before cutover)."""
    target: str                  # IN_PROCESS or the base URL
    profile: str
    rounds: int
    ms: Mapping[str, float]
    recorded_at: str = ''

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['ms'] = dict(self.ms)
        return data


@dataclass(frozen=True)
class MonitorConfig:
    """What to probe, how often, and when to call it a trigger.

    Raises MonitorInputError for a non-positive interval, window,
    count, timeout or bound, a negative standby lag, a standby rule
    without its data dir and alias, or a base URL that is not http(s).
    """
    urls: tuple[str, ...]
    thresholds: Thresholds
    interval: float = 5.0
    window: int = 20
    baseline_probes: int = 5
    consecutive: int = 3
    base_url: str | None = None
    timeout: float = 10.0
    max_duration: float | None = None
    max_probes: int | None = None
    baseline: Baseline | None = None
    max_standby_lag: float = 0.0     # seconds; 0: no standby rule
    data_dir: Path | None = None     # the standby's (the rule's only)
    postgres_alias: str | None = None

    def __post_init__(self) -> None:
        check_positive('--interval', self.interval)
        check_non_negative('--max-standby-lag', self.max_standby_lag)
        if self.max_standby_lag and (self.data_dir is None
                                     or self.postgres_alias is None):
            raise MonitorInputError('the standby rule needs the data dir '
                                    'and the PostgreSQL alias')
        check_positive('--timeout', self.timeout)
        for name in ('window', 'baseline_probes', 'consecutive'):
            check_positive_int(f'--{name.replace("_", "-")}',
                               getattr(self, name))
        if self.max_duration is not None:
            check_positive('--max-duration', self.max_duration)
        if self.max_probes is not None:
            check_positive_int('--max-probes', self.max_probes)
        if not self.urls:
            raise MonitorInputError('nothing to probe: no URLs given')
        if self.base_url is not None:
            scheme = urllib.parse.urlsplit(self.base_url).scheme
            if scheme not in ('http', 'https'):
                raise MonitorInputError(
                    f'--base-url {self.base_url!r} must start with '
                    f'http:// or https://')

    @property
    def target(self) -> str:
        if self.base_url is None:
            return IN_PROCESS
        return self.base_url.rstrip('/')


@dataclass(frozen=True)
class Probe:
    url: str
    status: int | None           # None: no HTTP answer at all
    ms: float
    error: str | None            # None when the probe succeeded
    database_ok: bool | None = None   # from a /health body only
    profile: str | None = None        # from a /health body only

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Breach:
    kind: str                    # RESPONSE_TIME, ERROR_RATE, ...
    message: str


@dataclass(frozen=True)
class Alert:
    """A warning-level finding: reported once when it begins (and once
    when it ends, *cleared*), never a rollback trigger."""
    kind: str              # STANDBY_LAG, STANDBY_MISSING, REPLICATOR_FAILING
    message: str
    cleared: bool = False


@dataclass(frozen=True)
class StandbyResult:
    """The standby rule's reading in one round."""
    state: str                   # STANDBY_OK, STANDBY_LAGGING, ...
    lag_seconds: float | None    # now - the standby's position time
    pending: int | None          # journal entries not applied yet
    detail: str                  # what was seen, or why not checked
    # STANDBY_FAILING: replicate_changes' last error (redacted).
    last_error: str | None = None


@dataclass(frozen=True)
class RoundResult:
    number: int
    elapsed: float               # seconds since the monitor started
    probes: tuple[Probe, ...]
    error_rate: float            # percent, over the full window
    breaches: tuple[Breach, ...]
    streak: int                  # bad rounds in a row, this one included
    consecutive: int
    triggered: bool
    standby: StandbyResult | None = None   # None: the rule is off
    alerts: tuple[Alert, ...] = ()         # raised or cleared this round

    @property
    def bad(self) -> bool:
        return bool(self.breaches)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['elapsed'] = round(self.elapsed, 3)
        data['error_rate'] = round(self.error_rate, 2)
        data['probes'] = [dict(asdict(p), ms=round(p.ms, 1))
                          for p in self.probes]
        data['breaches'] = [asdict(b) for b in self.breaches]
        return data


@dataclass(frozen=True)
class TargetInfo:
    target: str
    profile: str | None          # what the target's /health says


@dataclass(frozen=True)
class MonitorResult:
    stopped: str                 # STOP_*
    rounds: int
    seconds: float
    triggered: bool
    reasons: tuple[Breach, ...]  # the breaches of the triggering round
    last: RoundResult | None
    baseline: Baseline | None    # per-URL baselines used (file or probes)
    baseline_source: str         # 'file', 'probes' or 'none yet'
    alerts: tuple[Alert, ...] = ()   # raised during the run (not cleared)

    def as_dict(self) -> dict[str, Any]:
        standby = self.last.standby if self.last else None
        return {
            'stopped': self.stopped, 'rounds': self.rounds,
            'seconds': round(self.seconds, 3), 'triggered': self.triggered,
            'reasons': [asdict(b) for b in self.reasons],
            'baseline': self.baseline.as_dict() if self.baseline else None,
            'baseline_source': self.baseline_source,
            'alerts': [asdict(a) for a in self.alerts],
            'standby': asdict(standby) if standby else None,
        }


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise MonitorInputError(f'{name} must be a positive number, '
                                f'not {value!r}')


def check_non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise MonitorInputError(f'{name} must be 0 or a positive number, '
                                f'not {value!r}')


def check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise MonitorInputError(f'{name} must be a positive whole number, '
                                f'not {value!r}')


def default_thresholds(**overrides: float | None) -> Thresholds:
    """Thresholds from the ANTHIAS_ROLLBACK_MONITOR_* settings, with
    *overrides* (None = use the setting). ConfigError if a setting is
    not a number; MonitorInputError if any value is not positive."""
    values: dict[str, float] = {}
    for name, setting in THRESHOLD_SETTINGS.items():
        value = overrides.get(name)
        values[name] = _number_setting(setting) if value is None else value
    return Thresholds(**values)


def _number_setting(setting: str) -> float:
    """The setting as a float; ConfigError naming it if it is not one."""
    raw = conf.get_setting(setting)
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f'{setting}={raw!r} is not a number') from None


def default_max_standby_lag(override: float | None = None) -> float:
    """*override*, else ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG: seconds
    the standby may lag before an alert, 0 = no standby rule. ConfigError
    naming the setting if it is not a number of seconds, 0 or more."""
    if override is not None:
        return override
    value = _number_setting(STANDBY_LAG_SETTING)
    raw = conf.get_setting(STANDBY_LAG_SETTING)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f'{STANDBY_LAG_SETTING}={raw!r} must be 0 (off) '
                          f'or a positive number of seconds')
    return value


class Evaluator:
    """The sliding window and the trigger rules (state between rounds)."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.window: deque[tuple[Probe, ...]] = deque(maxlen=config.window)
        self.stored = dict(config.baseline.ms) if config.baseline else {}
        self.samples: dict[str, list[float]] = {}
        self.streak = 0

    def baseline_for(self, url: str) -> float | None:
        if url in self.stored:
            return self.stored[url]
        samples = self.samples.get(url, [])
        if len(samples) < self.config.baseline_probes:
            return None
        return statistics.median(samples)

    def current_baseline(self) -> tuple[Baseline | None, str]:
        found = {url: self.baseline_for(url) for url in self.config.urls}
        ms = {url: value for url, value in found.items()
              if value is not None}
        if not ms:
            return None, 'none yet'
        # (stored is empty without a baseline from the file)
        if set(ms) <= set(self.stored) and self.config.baseline is not None:
            return replace(self.config.baseline, ms=ms), 'file'
        return Baseline(self.config.target, '', self.config.baseline_probes,
                        ms), 'probes'

    def error_rate(self) -> float:
        # Over the *full* window: before it fills, missing probes count
        # as successes, so one early failure is not a 50 % error rate.
        failed = sum(not p.ok for probes in self.window for p in probes)
        size = self.config.window * len(self.config.urls)
        return 100.0 * failed / size

    def breaches(self, probes: tuple[Probe, ...], rate: float
                 ) -> list[Breach]:
        limits = self.config.thresholds
        found: list[Breach] = []
        for probe in probes:
            if probe.database_ok is False:
                found.append(Breach(DATABASE_UNREACHABLE,
                                    f'database unreachable ({probe.url} '
                                    f'{probe.error})'))
        slow = [p for p in probes if p.ms > limits.max_response_ms]
        for probe in slow:
            found.append(Breach(RESPONSE_TIME,
                                f'response time {probe.ms:.0f} ms > '
                                f'{limits.max_response_ms:g} ms '
                                f'({probe.url})'))
        if rate > limits.max_error_rate:
            found.append(Breach(ERROR_RATE,
                                f'error rate {rate:.1f} % > '
                                f'{limits.max_error_rate:g} % over '
                                f'the last {self.config.window} rounds'))
        for probe in probes:
            base = self.baseline_for(probe.url)
            if base is None or not probe.ok:
                continue
            slower = probe.ms - base
            pct = 100.0 * slower / max(base, 0.001)
            if pct > limits.max_degradation_pct \
                    and slower >= limits.min_slowdown_ms:
                found.append(Breach(DEGRADATION,
                                    f'{probe.url} {pct:.0f} % slower than '
                                    f'baseline {base:.1f} ms > '
                                    f'{limits.max_degradation_pct:g} %'))
        return found

    def evaluate(self, number: int, elapsed: float,
                 probes: tuple[Probe, ...],
                 standby: StandbyResult | None = None,
                 alerts: tuple[Alert, ...] = ()) -> RoundResult:
        """Add one round to the window and judge it. The standby's
        reading and alerts are carried along: they never make a round
        bad."""
        self.window.append(probes)
        rate = self.error_rate()
        found = self.breaches(probes, rate)
        # Baselines learn only from rounds that looked healthy.
        if not found:
            for probe in probes:
                samples = self.samples.setdefault(probe.url, [])
                if probe.ok and len(samples) < self.config.baseline_probes:
                    samples.append(probe.ms)
        self.streak = self.streak + 1 if found else 0
        return RoundResult(number, elapsed, probes, rate, tuple(found),
                           self.streak, self.config.consecutive,
                           self.streak >= self.config.consecutive,
                           standby, alerts)


class StandbyWatch:
    """The standby rule, with its state between rounds. While the
    profile is postgres and a rollback window is open, replicate_changes
    is expected to keep the standby at most `max_standby_lag` seconds
    behind. An alert is raised when the standby starts lagging or is
    missing, and once more when it has caught up: never one per round.
    Reads the state file, the standby file and *postgres_alias* (two
    catalog/journal queries, no transaction)."""

    def __init__(self, config: MonitorConfig) -> None:
        # MonitorConfig refuses a standby rule without both.
        assert config.data_dir is not None
        assert config.postgres_alias is not None
        self.data_dir = Path(config.data_dir)
        self.alias = config.postgres_alias
        self.max_lag = config.max_standby_lag
        self.active: str | None = None   # the alert raised, not cleared

    def read(self) -> StandbyResult:
        try:
            active = profiles.resolve_active_profile(self.data_dir)
        except RollbackError as err:
            return StandbyResult(STANDBY_UNKNOWN, None, None,
                                 f'profile unknown: {first_line(err)}')
        if active.name != profiles.POSTGRES:
            return StandbyResult(STANDBY_NOT_EXPECTED, None, None,
                                 f'profile {active.name}')
        try:
            window_open = pj.postgres_journal_installed(self.alias)
        except DatabaseError as err:
            # PostgreSQL down: the standby is as current as it can be,
            # and the database_unreachable rule speaks for the outage.
            connections[self.alias].close()
            return StandbyResult(STANDBY_UNKNOWN, None, None,
                                 f'PostgreSQL not answering: '
                                 f'{first_line(err)}')
        if not window_open:
            return StandbyResult(STANDBY_NOT_EXPECTED, None, None,
                                 'no rollback window')
        # PostgreSQL answers here: a replicator whose last rounds failed
        # (whatever it failed at) leaves the standby behind, and says why.
        health = window_standby.replicator_health(self.data_dir)
        if health.failing:
            return StandbyResult(STANDBY_FAILING, None, None,
                                 health.describe(), health.last_error)
        try:
            state = window_standby.standby_state(self.data_dir, self.alias)
        except (OSError, sqlite3.Error) as err:
            state = window_standby.StandbyState(
                window_standby.standby_path(self.data_dir), True, None,
                None, None, None, f'unreadable: {first_line(err)}')
        if state.position is None:
            return StandbyResult(STANDBY_ABSENT, None, None,
                                 f'{state.path}: {state.problem}')
        lag = state.lag_seconds
        assert lag is not None   # a position has a lag
        kind = STANDBY_LAGGING if lag > self.max_lag else STANDBY_OK
        return StandbyResult(kind, lag, state.pending,
                             f'at {state.position_at}')

    def check(self) -> tuple[StandbyResult, tuple[Alert, ...]]:
        """This round's reading and the alerts it raises or clears."""
        reading = self.read()
        kind = {STANDBY_LAGGING: STANDBY_LAG,
                STANDBY_ABSENT: STANDBY_MISSING,
                STANDBY_FAILING: REPLICATOR_FAILING}.get(reading.state)
        alerts: list[Alert] = []
        if kind is not None and kind != self.active:
            alerts.append(Alert(kind, self.message(reading)))
            self.active = kind
        elif reading.state == STANDBY_OK and self.active is not None:
            alerts.append(Alert(self.active, (
                f'standby caught up: {reading.lag_seconds:.1f} s behind '
                f'(<= {self.max_lag:g} s)'
                + ('; replicate_changes succeeds again'
                   if self.active == REPLICATOR_FAILING else '')),
                cleared=True))
            self.active = None
        elif reading.state == STANDBY_NOT_EXPECTED:
            self.active = None
        return reading, tuple(alerts)

    def message(self, reading: StandbyResult) -> str:
        if reading.state == STANDBY_FAILING:
            return ('the standby stopped following (with PostgreSQL '
                    f'down a rollback would restore it): {reading.detail}')
        if reading.state == STANDBY_ABSENT:
            return (f'no usable standby while a rollback window is open '
                    f'({reading.detail}): with PostgreSQL down a rollback '
                    f'would restore a backup; is replicate_changes '
                    f'running?')
        pending = ('' if reading.pending is None else
                   f', {reading.pending} journal entries not applied')
        return (f'standby {reading.lag_seconds:.1f} s behind > '
                f'{self.max_lag:g} s ({reading.detail}{pending}); is '
                f'replicate_changes running?')
