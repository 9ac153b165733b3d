"""The monitor's loops: `run_monitor()` probes round after round until
a trigger, bounded by time and probe count; `record_baseline()` measures
a baseline on SQLite and `load_baseline()` / `select_baseline()` read it
back. Nothing here prints or rolls back: the command owns both.
"""
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from anthias_rollback import conf, fsutil, profiles
from anthias_rollback.exceptions import BaselineError
from anthias_rollback.monitor.probes import (
    Prober,
    check_target,
    make_prober,
    probe_round,
)
from anthias_rollback.monitor.rules import (
    STOP_INTERRUPTED,
    STOP_MAX_DURATION,
    STOP_MAX_PROBES,
    STOP_TRIGGER,
    Alert,
    Baseline,
    Evaluator,
    MonitorConfig,
    MonitorResult,
    RoundResult,
    StandbyWatch,
)
from anthias_rollback.report import write_json_report

BASELINE_FILE_NAME = 'monitor_baseline.json'


def run_monitor(config: MonitorConfig,
                on_probe: Callable[[RoundResult], None] | None = None,
                sleep: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] = time.monotonic,
                prober: Prober | None = None) -> MonitorResult:
    """Probe every `interval` seconds until a trigger, `max_duration`,
    `max_probes` or Ctrl-C. Reads only (through the probed views, and
    with `max_standby_lag` the standby rule's reads); calls *on_probe*
    after each round. Never raises for a failing probe: that is data.
    An alert never stops the run. A KeyboardInterrupt ends it cleanly."""
    prober = prober or make_prober(config)
    evaluator = Evaluator(config)
    watch = StandbyWatch(config) if config.max_standby_lag else None
    raised: list[Alert] = []
    start = clock()
    number = 0
    last: RoundResult | None = None
    stopped = STOP_INTERRUPTED
    try:
        while True:
            if config.max_probes is not None \
                    and number >= config.max_probes:
                stopped = STOP_MAX_PROBES
                break
            if config.max_duration is not None \
                    and clock() - start >= config.max_duration:
                stopped = STOP_MAX_DURATION
                break
            number += 1
            probes = probe_round(prober, config.urls)
            reading, alerts = watch.check() if watch else (None, ())
            raised.extend(a for a in alerts if not a.cleared)
            last = evaluator.evaluate(number, clock() - start, probes,
                                      reading, alerts)
            if on_probe is not None:
                on_probe(last)
            if last.triggered:
                stopped = STOP_TRIGGER
                break
            # Keep the cadence (round n starts at n * interval) but never
            # sleep past --max-duration.
            wake = start + number * config.interval
            if config.max_duration is not None:
                wake = min(wake, start + config.max_duration)
            wait = wake - clock()
            if wait > 0:
                sleep(wait)
    except KeyboardInterrupt:
        stopped = STOP_INTERRUPTED
    baseline, source = evaluator.current_baseline()
    triggered = stopped == STOP_TRIGGER
    return MonitorResult(stopped, number, clock() - start, triggered,
                         last.breaches if triggered and last else (),
                         last, baseline, source, tuple(raised))


def baseline_path() -> Path:
    return conf.data_dir() / BASELINE_FILE_NAME


def record_baseline(config: MonitorConfig,
                    on_probe: Callable[[RoundResult], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep,
                    path: Path | None = None,
                    prober: Prober | None = None) -> tuple[Baseline, Path]:
    """Probe `baseline_probes` rounds on SQLite and save the per-URL median
    latency as JSON (0600) in the data dir. Refuses (BaselineError) when the
    target's profile is not SQLite or any probe fails; then nothing is
    written. Raises MonitorInputError when the target does not answer."""
    prober = prober or make_prober(config)
    info = check_target(config, prober)
    if info.profile != profiles.SQLITE:
        raise BaselineError(
            f'a baseline is recorded on SQLite, before the cutover; '
            f'{info.target} runs on {info.profile or "an unknown profile"}')
    samples: dict[str, list[float]] = {url: [] for url in config.urls}
    evaluator = Evaluator(config)
    start = time.monotonic()
    for number in range(1, config.baseline_probes + 1):
        probes = probe_round(prober, config.urls)
        result = evaluator.evaluate(number, time.monotonic() - start,
                                    probes)
        if on_probe is not None:
            on_probe(result)
        for probe in probes:
            if not probe.ok:
                raise BaselineError(
                    f'baseline not recorded: {probe.url} failed '
                    f'({probe.error}); fix the app first')
            samples[probe.url].append(probe.ms)
        if number < config.baseline_probes:
            sleep(config.interval)
    baseline = Baseline(
        config.target, info.profile, config.baseline_probes,
        {url: round(statistics.median(ms), 3) for url, ms in samples.items()},
        datetime.now(UTC).isoformat())
    path = Path(path or baseline_path())
    try:
        write_json_report(path, baseline.as_dict())
    except OSError as err:
        raise BaselineError(f'cannot write baseline file {path}: '
                            f'{err.strerror}') from None
    return baseline, path


def load_baseline(path: Path | None = None) -> Baseline | None:
    """The stored baseline, None if there is none; BaselineError if the
    file is unreadable or malformed."""
    path = Path(path or baseline_path())
    fix = 'record it again with --record-baseline'
    data = fsutil.read_json(path, 'baseline file', BaselineError, fix)
    if data is None:
        return None
    try:
        ms = {str(url): float(value) for url, value in data['ms'].items()}
        return Baseline(str(data['target']), str(data['profile']),
                        int(data['rounds']), ms,
                        str(data.get('recorded_at', '')))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BaselineError(f'baseline file {path} is not valid; {fix}'
                            ) from None


def select_baseline(config: MonitorConfig, path: Path | None = None
                    ) -> tuple[Baseline | None, str | None]:
    """The stored baseline if it was recorded against the same target
    (in-process and HTTP latencies differ), plus a warning otherwise."""
    baseline = load_baseline(path)
    if baseline is None:
        return None, None
    if baseline.target != config.target:
        return None, (f'stored baseline was recorded for '
                      f'{baseline.target}, not {config.target}; using the '
                      f'first {config.baseline_probes} probes instead')
    return baseline, None

