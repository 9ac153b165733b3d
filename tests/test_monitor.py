"""The monitor package: the probers, the window, the baseline and the
trigger rules, driven through the real Django stack (a real slow/failing
view, the real /health view on the real test databases). Sleep and
clock are fake, so no test waits for an interval. The standby rule
runs on a real standby file kept by the real replicator, aged by
editing its position."""
import os
import stat

import pytest
from django.db import connections
from django.db.backends.postgresql.base import DatabaseWrapper

from anthias_rollback import profiles
from anthias_rollback.exceptions import (
    BaselineError,
    ConfigError,
    MonitorInputError,
)
from anthias_rollback.monitor import loop as monitor_loop
from anthias_rollback.monitor import probes as monitor_probes
from anthias_rollback.monitor import rules as monitor_rules
from anthias_rollback.monitor.rules import (
    Baseline,
    MonitorConfig,
    Probe,
    Thresholds,
)
from anthias_rollback.window import journal as window_journal
from anthias_rollback.window import replicator as window_replicator
from anthias_rollback.window import standby as window_standby
from tests import monitor_views
from tests.conftest import postgres_stopped
from tests.helpers.factories import AssetFactory
from tests.helpers.rollback import age_standby, seed_device
from tests.monitor_views import FAIL, OK, closed_port_url, serve_test_app

DB = {'databases': ['default', 'sqlite'], 'transaction': True}
FLAKY = '/monitor-test/flaky'
HEALTH = '/health'
# The runbook's thresholds, with a 200 ms floor on a slowdown (the default
# is 50): an in-process probe on a loaded 2-core machine can take tens of
# ms, and the slow probes here take 400 ms or more.
RUNBOOK = Thresholds(max_response_ms=1000, max_error_rate=5,
                     max_degradation_pct=300, min_slowdown_ms=200)


class FakeTime:
    """sleep() advances clock(); nothing really waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def config(urls=(HEALTH, FLAKY), **kwargs) -> MonitorConfig:
    kwargs.setdefault('thresholds', RUNBOOK)
    kwargs.setdefault('interval', 5.0)
    kwargs.setdefault('max_probes', 6)
    return MonitorConfig(urls=tuple(urls), **kwargs)


def watch(cfg: MonitorConfig, **kwargs):
    rounds = []
    fake = FakeTime()
    result = monitor_loop.run_monitor(cfg, on_probe=rounds.append,
                                      sleep=fake.sleep, clock=fake.clock,
                                      **kwargs)
    return result, rounds


def kinds(rnd) -> set[str]:
    return {b.kind for b in rnd.breaches}


@pytest.fixture
def flaky():
    monitor_views.reset()
    yield monitor_views
    monitor_views.reset()


class ScriptedProber:
    """Probes with given latencies, for the pure evaluation rules (the
    real-view tests below cover the probers themselves)."""

    def __init__(self, *latencies: float) -> None:
        self.latencies = list(latencies)

    def __call__(self, url: str) -> Probe:
        ms = self.latencies.pop(0) if len(self.latencies) > 1 \
            else self.latencies[0]
        return Probe(url, 200, ms, None)


# --- triggers through the real stack -----------------------------------

@pytest.mark.django_db(**DB)
def test_single_slow_spike_never_triggers(data_dir, flaky):
    flaky.queue(OK, monitor_views.slow(0.6), OK, OK, OK, OK)
    result, rounds = watch(config(thresholds=Thresholds(400, 5, 300, 50)))
    assert not result.triggered
    assert result.stopped == monitor_rules.STOP_MAX_PROBES
    assert [r.streak for r in rounds] == [0, 1, 0, 0, 0, 0]
    assert monitor_rules.RESPONSE_TIME in kinds(rounds[1])
    assert rounds[1].probes[1].status == 200
    assert rounds[1].probes[1].ms >= 600



@pytest.mark.django_db(**DB)
def test_trigger_after_k_consecutive_slow_rounds(data_dir, flaky):
    flaky.set_behaviour(sleep=0.6)
    result, rounds = watch(config(thresholds=Thresholds(400, 5, 300, 50),
                                  consecutive=3))
    assert result.triggered and result.stopped == monitor_rules.STOP_TRIGGER
    assert len(rounds) == result.rounds == 3
    assert [r.triggered for r in rounds] == [False, False, True]
    assert [r.streak for r in rounds] == [1, 2, 3]
    assert {b.kind for b in result.reasons} == {monitor_rules.RESPONSE_TIME}
    assert FLAKY in result.reasons[0].message


@pytest.mark.django_db(**DB)
def test_bad_rounds_must_be_consecutive(data_dir, flaky):
    slow = monitor_views.slow(0.6)
    flaky.queue(slow, slow, OK, slow, slow, OK, slow, slow)
    result, rounds = watch(config(thresholds=Thresholds(400, 5, 300, 50),
                                  consecutive=3, max_probes=8))
    assert not result.triggered
    assert [r.streak for r in rounds] == [1, 2, 0, 1, 2, 0, 1, 2]


@pytest.mark.django_db(**DB)
def test_error_rate_trigger(data_dir, flaky):
    flaky.set_behaviour(status=500)
    # window 4 x 2 URLs: one failure per round is 12.5 %, 25 %, 37.5 %.
    result, rounds = watch(config(window=4, consecutive=3))
    assert result.triggered and len(rounds) == 3
    assert [r.error_rate for r in rounds] == [12.5, 25.0, 37.5]
    assert all(kinds(r) == {monitor_rules.ERROR_RATE} for r in rounds)
    failed = rounds[0].probes[1]
    assert failed.status == 500 and failed.error == 'HTTP 500'
    assert rounds[0].probes[0].status == 200


@pytest.mark.django_db(**DB)
def test_one_error_in_a_full_size_window_is_no_trigger(data_dir, flaky):
    flaky.queue(OK, FAIL)
    # The rate counts the whole window (20 rounds x 2 URLs), so one early
    # failure is 2.5 %, not the 25 % of the four probes made so far.
    result, rounds = watch(config(window=20))
    assert not result.triggered
    assert rounds[1].error_rate == 2.5
    assert all(not r.bad for r in rounds)


@pytest.mark.django_db(**DB)
def test_degradation_against_baseline_of_first_probes(data_dir, flaky):
    slow = monitor_views.slow(0.4)
    flaky.queue(OK, OK, slow, slow, slow)
    result, rounds = watch(config(baseline_probes=2, consecutive=2,
                                  max_probes=5))
    assert [r.bad for r in rounds] == [False, False, True, True]
    assert result.triggered and len(rounds) == 4
    assert kinds(rounds[2]) == {monitor_rules.DEGRADATION}
    assert 'slower than baseline' in result.reasons[0].message
    assert result.baseline_source == 'probes'
    assert result.baseline.ms[FLAKY] < 200


@pytest.mark.django_db(**DB)
def test_degradation_against_a_stored_baseline_counts_at_once(data_dir,
                                                              flaky):
    stored = Baseline(monitor_rules.IN_PROCESS, 'sqlite', 5, {FLAKY: 1.0})
    flaky.set_behaviour(sleep=0.4)
    result, rounds = watch(config(urls=(FLAKY,), baseline=stored,
                                  consecutive=2))
    assert [kinds(r) for r in rounds] == [{monitor_rules.DEGRADATION}] * 2
    assert result.triggered and result.baseline_source == 'file'


def test_degradation_needs_a_real_slowdown_not_jitter():
    # 2 ms -> 20 ms is 900 % slower but only 18 ms: noise in-process.
    cfg = config(urls=(FLAKY,), baseline_probes=2, consecutive=1,
                 max_probes=4, thresholds=Thresholds(1000, 5, 300, 50))
    result, rounds = watch(cfg, prober=ScriptedProber(2, 2, 20, 20))
    assert not result.triggered
    result, rounds = watch(cfg, prober=ScriptedProber(2, 2, 60))
    assert result.triggered
    assert kinds(rounds[-1]) == {monitor_rules.DEGRADATION}


@pytest.mark.django_db(databases=['default', 'sqlite', 'postgres'],
                       transaction=True)
def test_database_unreachable_triggers(data_dir):
    conn = connections['default']
    saved = conn.settings_dict.copy()
    down = dict(saved, ENGINE='django.db.backends.postgresql',
                NAME='anthias', USER='anthias', PASSWORD='hunter2',
                HOST='127.0.0.1', PORT=1,
                OPTIONS={'connect_timeout': 2})
    conn.close()
    connections['default'] = DatabaseWrapper(down, 'default')
    try:
        result, rounds = watch(config(urls=(HEALTH,), consecutive=2))
    finally:
        connections['default'].close()
        connections['default'] = conn
    assert result.triggered and len(rounds) == 2
    probe = rounds[0].probes[0]
    assert probe.status == 503 and probe.database_ok is False
    assert monitor_rules.DATABASE_UNREACHABLE in kinds(rounds[0])
    assert 'hunter2' not in repr(result)


# --- the loop -------------------------------------------------------------

def test_max_duration_bounds_the_run_and_keeps_the_cadence():
    fake = FakeTime()
    result = monitor_loop.run_monitor(
        config(urls=(HEALTH,), interval=1.0, max_duration=3.5,
               max_probes=None),
        sleep=fake.sleep, clock=fake.clock, prober=ScriptedProber(1))
    assert result.stopped == monitor_rules.STOP_MAX_DURATION
    assert result.rounds == 4 and not result.triggered
    assert fake.sleeps == [1.0, 1.0, 1.0, 0.5]
    assert result.seconds == 3.5


def test_ctrl_c_stops_cleanly():
    def on_probe(rnd):
        if rnd.number == 2:
            raise KeyboardInterrupt

    fake = FakeTime()
    result = monitor_loop.run_monitor(config(max_probes=None),
                                      on_probe=on_probe,
                                      sleep=fake.sleep, clock=fake.clock,
                                      prober=ScriptedProber(1))
    assert result.stopped == monitor_rules.STOP_INTERRUPTED
    assert result.rounds == 2 and not result.triggered


@pytest.mark.parametrize('kwargs, match', [
    ({'interval': 0}, '--interval'),
    ({'interval': -1.5}, '--interval'),
    ({'interval': float('nan')}, '--interval'),
    ({'window': 0}, '--window'),
    ({'baseline_probes': -1}, '--baseline-probes'),
    ({'consecutive': 0}, '--consecutive'),
    ({'max_duration': 0}, '--max-duration'),
    ({'max_probes': 0}, '--max-probes'),
    ({'timeout': 0}, '--timeout'),
    ({'base_url': 'ftp://x'}, 'http://'),
    ({'urls': ()}, 'nothing to probe'),
    ({'max_standby_lag': -1}, '--max-standby-lag'),
    ({'max_standby_lag': float('inf')}, '--max-standby-lag'),
    ({'max_standby_lag': 30}, 'needs the data dir'),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(MonitorInputError, match=match):
        config(**kwargs)


@pytest.mark.parametrize('field', ['max_response_ms', 'max_error_rate',
                                   'max_degradation_pct'])
def test_non_positive_thresholds_are_refused(field):
    with pytest.raises(MonitorInputError, match=field):
        monitor_rules.default_thresholds(**{field: 0})


def test_thresholds_come_from_settings(settings):
    assert monitor_rules.default_thresholds() == Thresholds(1000, 5, 300, 50)
    settings.ANTHIAS_ROLLBACK_MONITOR_MAX_RESPONSE_MS = '250'
    assert monitor_rules.default_thresholds().max_response_ms == 250
    assert monitor_rules.default_thresholds(
        max_response_ms=9).max_response_ms == 9
    settings.ANTHIAS_ROLLBACK_MONITOR_MAX_ERROR_RATE = 'lots'
    with pytest.raises(ConfigError,
                       match='ANTHIAS_ROLLBACK_MONITOR_MAX_ERROR_RATE'):
        monitor_rules.default_thresholds()


def test_monitored_urls_are_health_then_verify_urls(settings):
    settings.ANTHIAS_ROLLBACK_VERIFY_URLS = \
        '/api/v1/assets/count, /health /monitor-test/flaky'
    assert monitor_probes.monitored_urls() == (
        '/health', '/api/v1/assets/count', '/monitor-test/flaky')


def test_unknown_url_refused_in_process(data_dir):
    with pytest.raises(MonitorInputError, match='/no/such/page'):
        monitor_probes.check_target(config(urls=(HEALTH, '/no/such/page')))


# --- baseline file --------------------------------------------------------

@pytest.mark.django_db(**DB)
def test_record_baseline_then_a_run_reads_it(data_dir, flaky):
    fake = FakeTime()
    seen = []
    baseline, path = monitor_loop.record_baseline(
        config(baseline_probes=3), on_probe=seen.append, sleep=fake.sleep)
    assert path == data_dir / monitor_loop.BASELINE_FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(seen) == 3 and fake.sleeps == [5.0, 5.0]
    assert baseline.profile == 'sqlite' and baseline.rounds == 3
    assert set(baseline.ms) == {HEALTH, FLAKY}
    assert monitor_loop.load_baseline() == baseline

    stored, warning = monitor_loop.select_baseline(config())
    assert stored == baseline and warning is None
    flaky.set_behaviour(sleep=0.4)
    result, rounds = watch(config(baseline=stored, consecutive=2))
    assert result.triggered and len(rounds) == 2
    assert result.baseline_source == 'file' and result.baseline == stored


@pytest.mark.django_db(**DB)
def test_record_baseline_refused_off_sqlite_and_on_errors(data_dir, flaky):
    profiles.write_active_profile(data_dir, 'postgres')
    with pytest.raises(BaselineError, match='recorded on SQLite'):
        monitor_loop.record_baseline(config(), sleep=FakeTime().sleep)
    profiles.write_active_profile(data_dir, 'sqlite')
    flaky.queue(OK, FAIL)
    with pytest.raises(BaselineError, match=f'{FLAKY} failed .HTTP 500'):
        monitor_loop.record_baseline(config(), sleep=FakeTime().sleep)
    assert not (data_dir / monitor_loop.BASELINE_FILE_NAME).exists()


def test_baseline_file_checks(data_dir):
    assert monitor_loop.load_baseline() is None
    path = data_dir / monitor_loop.BASELINE_FILE_NAME
    path.write_text('{"target": "in-process"}')
    with pytest.raises(BaselineError, match='record it again'):
        monitor_loop.load_baseline()
    path.write_text('{"target": "http://10.0.0.9", "profile": "sqlite", '
                    '"rounds": 5, "ms": {"/health": 3.5}}')
    stored, warning = monitor_loop.select_baseline(config())
    assert stored is None
    assert 'http://10.0.0.9' in warning and 'in-process' in warning


# --- HTTP mode against a real server ----------------------------------------

@pytest.mark.django_db(**DB)
def test_http_mode_against_a_real_server(data_dir, flaky):
    with serve_test_app() as base_url:
        cfg = config(base_url=base_url + '/', window=4, timeout=5)
        info = monitor_probes.check_target(cfg)
        assert info.target == base_url and info.profile == 'sqlite'
        flaky.queue(OK, FAIL, FAIL, FAIL)
        result, rounds = watch(cfg)
    assert [r.bad for r in rounds] == [False, True, True, True]
    assert result.triggered
    health, failing = rounds[1].probes
    assert health.status == 200 and health.database_ok is True
    assert failing.status == 500 and failing.error == 'HTTP 500'


@pytest.mark.django_db(**DB)
def test_http_timeout_is_a_failed_probe(data_dir, flaky):
    flaky.set_behaviour(sleep=0.6)
    with serve_test_app() as base_url:
        probe = monitor_probes.HttpProber(base_url, timeout=0.2)(FLAKY)
    assert probe.status is None and not probe.ok
    assert 'timed out' in probe.error


def test_base_url_not_answering_is_refused():
    url = closed_port_url()
    with pytest.raises(MonitorInputError) as excinfo:
        monitor_probes.check_target(config(base_url=url, timeout=2))
    message = str(excinfo.value)
    assert f'base URL {url} does not answer' in message
    assert '\n' not in message


@pytest.mark.django_db(**DB)
def test_base_url_of_another_app_is_refused(data_dir):
    with (serve_test_app() as base_url,
          pytest.raises(MonitorInputError, match='answers 404')):
        monitor_probes.check_target(config(urls=('/not-health', FLAKY),
                                           base_url=base_url))


# --- the standby rule: alerts, never a trigger ----------------------------

PG = {'databases': ['default', 'sqlite', 'postgres'], 'transaction': True}


def standby_config(data_dir, max_lag=30.0, **kwargs):
    # consecutive=1: were an alert a breach, its first round would
    # trigger.
    kwargs.setdefault('consecutive', 1)
    kwargs.setdefault('max_probes', 4)
    return config(urls=(HEALTH,), max_standby_lag=max_lag,
                  data_dir=data_dir, postgres_alias='postgres', **kwargs)


def replicate_once(data_dir):
    return window_replicator.run_replicator('postgres', data_dir=data_dir,
                                            once=True)


def alert_kinds(rounds) -> list[list[tuple[str, bool]]]:
    return [[(a.kind, a.cleared) for a in r.alerts] for r in rounds]


@pytest.mark.django_db(**PG)
def test_lagging_standby_is_one_alert_and_never_a_trigger(data_dir,
                                                          settings):
    seed_device(settings, n_assets=5)
    replicate_once(data_dir)
    AssetFactory.build(asset_id='not-yet-replicated').save(using='postgres')
    age_standby(data_dir, 120)
    result, rounds = watch(standby_config(data_dir),
                           prober=ScriptedProber(1))
    assert not result.triggered
    assert result.stopped == monitor_rules.STOP_MAX_PROBES
    assert all(not r.bad and r.streak == 0 for r in rounds)
    # Raised once, not once per round.
    assert alert_kinds(rounds) == [[(monitor_rules.STANDBY_LAG, False)],
                                   [], [], []]
    alert = rounds[0].alerts[0]
    assert 'standby 120.' in alert.message and '> 30 s' in alert.message
    assert '1 journal entries not applied' in alert.message
    assert result.alerts == (alert,)
    reading = rounds[-1].standby
    assert reading.state == monitor_rules.STANDBY_LAGGING
    assert 120 <= reading.lag_seconds < 180 and reading.pending == 1
    assert result.as_dict()['alerts'] == [
        {'kind': 'standby_lag', 'message': alert.message, 'cleared': False}]
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'


@pytest.mark.django_db(**PG)
def test_standby_catching_up_clears_the_alert_and_a_new_lag_raises_again(
        data_dir, settings):
    seed_device(settings, n_assets=5)
    replicate_once(data_dir)
    age_standby(data_dir, 60)
    seen = []

    def on_probe(rnd):
        seen.append(rnd)
        if rnd.number == 2:
            replicate_once(data_dir)      # the replicator is back
        elif rnd.number == 4:
            age_standby(data_dir, 45)     # ...and stopped again

    fake = FakeTime()
    result = monitor_loop.run_monitor(standby_config(data_dir, max_probes=6),
                                      on_probe=on_probe, sleep=fake.sleep,
                                      clock=fake.clock,
                                      prober=ScriptedProber(1))
    assert alert_kinds(seen) == [
        [(monitor_rules.STANDBY_LAG, False)], [],
        [(monitor_rules.STANDBY_LAG, True)],
        [], [(monitor_rules.STANDBY_LAG, False)], []]
    assert seen[2].alerts[0].message.startswith('standby caught up: ')
    assert [a.cleared for a in result.alerts] == [False, False]
    assert not result.triggered


@pytest.mark.django_db(**PG)
def test_standby_below_the_threshold_says_nothing(data_dir, settings):
    seed_device(settings, n_assets=5)
    replicate_once(data_dir)
    age_standby(data_dir, 20)
    result, rounds = watch(standby_config(data_dir),
                           prober=ScriptedProber(1))
    assert alert_kinds(rounds) == [[]] * 4 and result.alerts == ()
    assert {r.standby.state for r in rounds} == {monitor_rules.STANDBY_OK}
    assert all(20 <= r.standby.lag_seconds < 30 for r in rounds)
    # The lag is the age of the write the standby lacks (PostgreSQL's
    # clock): 20 s behind means a write 20 s old is pending.
    assert rounds[0].standby.pending == 1


@pytest.mark.django_db(**PG)
def test_missing_standby_in_an_open_window_is_reported_once(data_dir,
                                                            settings):
    seed_device(settings, n_assets=5)   # window open, no replicator
    result, rounds = watch(standby_config(data_dir),
                           prober=ScriptedProber(1))
    assert alert_kinds(rounds) == [[(monitor_rules.STANDBY_MISSING, False)],
                                   [], [], []]
    assert 'replicate_changes not run' in result.alerts[0].message
    assert str(window_standby.standby_path(data_dir)) in \
        result.alerts[0].message
    assert rounds[-1].standby.state == monitor_rules.STANDBY_ABSENT
    assert not result.triggered


@pytest.mark.django_db(**PG)
def test_no_standby_expected_without_a_window_or_off_postgres(data_dir,
                                                              settings):
    result, rounds = watch(standby_config(data_dir),
                           prober=ScriptedProber(1))
    assert rounds[0].standby == monitor_rules.StandbyResult(
        monitor_rules.STANDBY_NOT_EXPECTED, None, None, 'profile sqlite')
    assert result.alerts == ()
    seed_device(settings, n_assets=5)
    window_journal.end_window('postgres')
    result, rounds = watch(standby_config(data_dir),
                           prober=ScriptedProber(1))
    assert rounds[0].standby.detail == 'no rollback window'
    assert result.alerts == ()
    # 0 turns the rule off: no reading at all.
    result, rounds = watch(standby_config(data_dir, max_lag=0),
                           prober=ScriptedProber(1))
    assert rounds[0].standby is None and result.alerts == ()


@pytest.mark.slow
@pytest.mark.django_db(**PG)
def test_postgres_down_is_not_a_standby_alert(data_dir, settings):
    seed_device(settings, n_assets=5)
    replicate_once(data_dir)
    age_standby(data_dir, 120)
    with postgres_stopped():
        result, rounds = watch(standby_config(data_dir, max_probes=2),
                               prober=ScriptedProber(1))
    assert [r.standby.state for r in rounds] == \
        [monitor_rules.STANDBY_UNKNOWN] * 2
    assert 'PostgreSQL not answering' in rounds[0].standby.detail
    assert result.alerts == ()


def test_standby_lag_threshold_comes_from_settings(settings):
    assert monitor_rules.default_max_standby_lag() == 30
    assert monitor_rules.default_max_standby_lag(5.5) == 5.5
    settings.ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG = '0'
    assert monitor_rules.default_max_standby_lag() == 0
    for bad in ('soon', '-1', 'nan'):
        settings.ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG = bad
        with pytest.raises(ConfigError,
                           match='ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG'):
            monitor_rules.default_max_standby_lag()


@pytest.mark.django_db(**PG)
def test_a_failing_replicator_is_one_alert_with_its_error_then_cleared(
        data_dir, settings):
    import sqlite3

    from anthias_rollback.exceptions import ReplicationError

    def rename(old, new):
        conn = sqlite3.connect(window_standby.standby_path(data_dir))
        conn.execute(f'ALTER TABLE {old} RENAME TO {new}')
        conn.commit()
        conn.close()

    seed_device(settings, n_assets=5)
    replicate_once(data_dir)
    rename('assets', 'assets_away')     # a real failure, every round
    AssetFactory.build(asset_id='needs-the-table').save(using='postgres')
    with pytest.raises(ReplicationError):
        replicate_once(data_dir)
    seen = []

    def on_probe(rnd):
        seen.append(rnd)
        if rnd.number == 2:
            rename('assets_away', 'assets')
            replicate_once(data_dir)     # mended: the next round succeeds

    fake = FakeTime()
    result = monitor_loop.run_monitor(standby_config(data_dir, max_probes=4),
                                      on_probe=on_probe, sleep=fake.sleep,
                                      clock=fake.clock,
                                      prober=ScriptedProber(1))
    assert alert_kinds(seen) == [
        [(monitor_rules.REPLICATOR_FAILING, False)], [],
        [(monitor_rules.REPLICATOR_FAILING, True)], []]
    raised = seen[0].alerts[0].message
    assert 'replicate_changes is failing: round failed: no such table: ' \
        'assets' in raised
    assert seen[0].standby.state == monitor_rules.STANDBY_FAILING
    assert 'no such table: assets' in seen[0].standby.last_error
    assert 'replicate_changes succeeds again' in seen[2].alerts[0].message
    assert not result.triggered
