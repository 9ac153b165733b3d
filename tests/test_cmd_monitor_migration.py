"""monitor_migration: output, exit codes, refusals, --json, --auto-rollback.

Intervals are a few milliseconds of real sleep: call_command cannot take
a fake clock (the core tests in test_monitor.py use one). The standby
alert runs on a real standby kept by the real replicator, aged by editing
its position, in a real monitor process."""
import json
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from anthias_rollback import conf, locking, profiles, rollback
from anthias_rollback.monitor import loop as monitor_loop
from anthias_rollback.window import replicator as window_replicator
from tests import monitor_views
from tests.conftest import run_manage
from tests.helpers.rollback import age_standby, seed_device
from tests.monitor_views import FAIL, OK, closed_port_url, serve_test_app

DB = {'databases': ['default', 'sqlite'], 'transaction': True}
ALL = ['default', 'sqlite', 'postgres']
FLAKY = '/monitor-test/flaky'
FAST = ('--interval', '0.005')


def watch(*args):
    out, err = StringIO(), StringIO()
    call_command('monitor_migration', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def refused(*args, code=1):
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command('monitor_migration', *args, stdout=out, stderr=err)
    assert excinfo.value.returncode == code
    return str(excinfo.value), out.getvalue()


@pytest.fixture
def flaky(settings):
    settings.ANTHIAS_ROLLBACK_VERIFY_URLS = [FLAKY]
    monitor_views.reset()
    yield monitor_views
    monitor_views.reset()


@pytest.mark.django_db(**DB)
def test_one_line_per_round_and_a_final_line(data_dir, flaky):
    out, err = watch(*FAST, '--max-probes', '3')
    lines = out.splitlines()
    assert lines[0].startswith('watching in-process (profile sqlite): '
                               f'/health, {FLAKY}')
    rounds = lines[1:4]
    assert [line.split()[0] for line in rounds] == ['#1', '#2', '#3']
    assert all(f'{FLAKY} 200' in line and 'window errors 0.0 %' in line
               for line in rounds)
    assert lines[-1].startswith('no trigger: 3 rounds in ')
    assert 'stopped: max-probes' in lines[-1]
    assert err == ''


@pytest.mark.django_db(**DB)
def test_single_failure_is_reported_but_no_trigger(data_dir, flaky):
    flaky.queue(OK, FAIL)
    out, _ = watch(*FAST, '--max-probes', '4', '--window', '20')
    bad = [line for line in out.splitlines() if ' BAD ' in line]
    assert bad == []  # 1 failure of 40 probes is 2.5 %
    assert f'{FLAKY} 500' in out.splitlines()[2]
    assert out.splitlines()[-1].startswith('no trigger')


@pytest.mark.django_db(**DB)
def test_trigger_without_auto_rollback_exits_3(data_dir, flaky):
    flaky.set_behaviour(status=500)
    message, out = refused(*FAST, '--window', '4', '--max-probes', '20',
                           code=3)
    assert out.count(' BAD ') == 3
    assert 'bad 3/3: error rate 37.5 % > 5 %' in out
    assert message.startswith('ROLLBACK TRIGGER after 3 bad rounds')
    assert 'rollback_migration --emergency' in message
    assert '\n' not in message


@pytest.mark.django_db(**DB)
def test_json_lines_only_on_stdout(data_dir, flaky):
    flaky.queue(OK, monitor_views.slow(0.6))
    out, _ = watch(*FAST, '--max-probes', '2', '--json-lines',
                   '--max-response-ms', '400')
    events = [json.loads(line) for line in out.splitlines()]
    assert [e['event'] for e in events] == ['probe', 'probe', 'result']
    first, second, result = events
    assert first['number'] == 1 and first['breaches'] == []
    assert [p['url'] for p in first['probes']] == ['/health', FLAKY]
    assert first['probes'][0]['database_ok'] is True
    assert second['breaches'][0]['kind'] == 'response_time'
    assert second['streak'] == 1 and second['triggered'] is False
    assert result['stopped'] == 'max-probes' and not result['triggered']
    assert all('time' in e for e in events)


@pytest.mark.django_db(**DB)
def test_max_duration_bounds_a_real_run(data_dir, flaky):
    start = time.monotonic()
    out, _ = watch('--interval', '0.05', '--max-duration', '0.3')
    took = time.monotonic() - start
    assert 0.3 <= took < 3
    assert 'stopped: max-duration' in out.splitlines()[-1]


@pytest.mark.parametrize('args, match', [
    (('--interval', '0'), 'argument --interval: must be greater than 0'),
    (('--interval', '-2'), 'argument --interval: must be greater than 0'),
    (('--window', '0'), 'argument --window: must be at least 1'),
    (('--consecutive', '-1'), 'argument --consecutive: must be at least 1'),
    (('--baseline-probes', '0'), '--baseline-probes: must be at least 1'),
    (('--max-response-ms', '0'), '--max-response-ms: must be greater th'),
    (('--max-error-rate', '-5'), '--max-error-rate: must be greater than'),
    (('--max-degradation-pct', '0'), '--max-degradation-pct: must be gre'),
    (('--max-duration', '0'), '--max-duration: must be greater than 0'),
    (('--timeout', '0'), '--timeout: must be greater than 0'),
    (('--base-url', 'localhost:8080'), 'must start with http://'),
    (('--max-standby-lag', '-1'), '--max-standby-lag: must be 0 or more'),
    (('--max-standby-lag', 'nan'), '--max-standby-lag: must be a finite'),
    (('--max-standby-lag', '1e9'), '--max-standby-lag: must be at most'),
])
def test_bad_input_one_line_exit_2_nothing_written(data_dir, args, match):
    # Argparse types refuse these before run(): a usage error, code 2.
    message, out = refused(*args, code=2)
    assert match in message
    assert '\n' not in message and out == ''
    assert list(data_dir.iterdir()) == []


def test_threshold_setting_not_a_number(data_dir, settings):
    settings.ANTHIAS_ROLLBACK_MONITOR_MAX_DEGRADATION_PCT = 'x3'
    message, _ = refused(*FAST)
    assert message == ('ANTHIAS_ROLLBACK_MONITOR_MAX_DEGRADATION_PCT=\'x3\' '
                       'is not a number')


def test_standby_lag_setting_not_a_number(data_dir, settings):
    settings.ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG = 'soon'
    message, _ = refused(*FAST)
    assert message == ("ANTHIAS_ROLLBACK_MONITOR_MAX_STANDBY_LAG='soon' "
                       'is not a number')


def test_base_url_not_answering(data_dir):
    url = closed_port_url()
    message, out = refused('--base-url', url, '--timeout', '2')
    assert message.startswith(f'base URL {url} does not answer (/health:')
    assert 'is the app running there?' in message
    # stdout holds only the verdict: the same line.
    assert out.splitlines() == [message]
    assert list(data_dir.iterdir()) == []


@pytest.mark.django_db(**DB)
def test_unknown_verify_url_refused(data_dir, settings):
    settings.ANTHIAS_ROLLBACK_VERIFY_URLS = '/api/v1/nope'
    message, _ = refused(*FAST)
    assert 'URL /api/v1/nope matches no URL pattern' in message


@pytest.mark.django_db(**DB)
def test_record_baseline_then_run_reads_it(data_dir, flaky):
    out, _ = watch(*FAST, '--record-baseline', '--baseline-probes', '2')
    path = data_dir / monitor_loop.BASELINE_FILE_NAME
    assert out.splitlines()[-1].startswith(
        'baseline recorded (2 rounds on sqlite): /health ')
    assert str(path) in out.splitlines()[-1]
    stored = json.loads(path.read_text())
    assert set(stored['ms']) == {'/health', FLAKY}
    stored['ms'][FLAKY] = 0.5  # pretend SQLite answered in 0.5 ms
    path.write_text(json.dumps(stored))

    flaky.set_behaviour(sleep=0.4)
    message, out = refused(*FAST, '--consecutive', '2', '--max-probes',
                           '5', code=3)
    assert 'slower than baseline 0.5 ms > 300 %' in message
    assert 'baseline from file' in out.splitlines()[0]


@pytest.mark.django_db(**DB)
def test_record_baseline_refused_on_postgres(data_dir, flaky):
    profiles.write_active_profile(data_dir, 'postgres')
    message, _ = refused(*FAST, '--record-baseline')
    assert 'recorded on SQLite' in message and 'runs on postgres' in message
    assert not (data_dir / monitor_loop.BASELINE_FILE_NAME).exists()


@pytest.mark.django_db(**DB)
def test_auto_rollback_refused_when_not_on_postgres(data_dir, flaky):
    message, _ = refused(*FAST, '--auto-rollback')
    assert '--auto-rollback' in message and 'nothing to roll back' in message


@pytest.mark.django_db(**DB)
def test_http_mode_command_against_a_real_server(data_dir, flaky):
    flaky.set_behaviour(status=500)
    with serve_test_app() as base_url:
        message, out = refused(*FAST, '--base-url', base_url, '--window',
                               '4', '--consecutive', '2', code=3)
    assert out.splitlines()[0].startswith(f'watching {base_url} '
                                          '(profile sqlite)')
    assert 'error rate 25.0 %' in message


def test_subprocess_exit_3_when_database_unreachable(host_env):
    env = dict(host_env, ANTHIAS_DB_PROFILE='postgres',
               ANTHIAS_POSTGRES_URL='postgresql://anthias:hunter2@'
                                    '127.0.0.1:1/anthias')
    proc = run_manage(env, 'monitor_migration', '--interval', '0.01',
                      '--consecutive', '2', '--max-duration', '60')
    assert proc.returncode == 3, proc.stderr
    assert 'database unreachable (/health HTTP 503: default (PostgreSQL ' \
        '127.0.0.1:1/anthias) does not answer' in proc.stdout
    assert 'ROLLBACK TRIGGER after 2 bad rounds' in proc.stderr
    assert 'hunter2' not in proc.stdout + proc.stderr


def test_subprocess_usage_error_exit_2(host_env):
    proc = run_manage(host_env, 'monitor_migration', '--interval', 'soon')
    assert proc.returncode == 2
    assert "argument --interval: 'soon' is not a number" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_auto_rollback_leaves_device_on_sqlite_with_zero_loss(data_dir,
                                                              settings,
                                                              flaky):
    from tests.helpers import rollback as helpers

    device = helpers.seed_device(settings)
    helpers.write_on_postgres(device)
    args = (*FAST, '--window', '4', '--consecutive', '2', '--max-probes',
            '10', '--auto-rollback')
    # A rollback that cannot run passes its exit code on; nothing changed.
    flaky.queue(FAIL, FAIL)
    with locking.operation_lock(data_dir, 'someone else'):
        message, _ = refused(*args, code=1)
    assert 'the rollback failed' in message
    assert 'another operation holds the lock' in message
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'

    # Two failing rounds, then healthy again: the rollback's own
    # post-verify of the verify URLs must pass on the restored file.
    flaky.queue(FAIL, FAIL)
    out, err = watch(*args)
    assert 'ROLLBACK TRIGGER after 2 bad rounds' in err
    assert out.splitlines()[-1].startswith('rolled back after the trigger')
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'
    assert helpers.normalise(helpers.fingerprint_sqlite(device.live)) == \
        helpers.normalise(helpers.fingerprint_postgres())
    # The same report a person's rollback writes.
    from anthias_rollback import rollback
    assert rollback.latest_report(conf.reports_dir()) is not None


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_auto_rollback_with_a_follow_up_says_rolled_back_not_failed(
        data_dir, settings, flaky):
    """Exit 4 from the rollback (here its restart command fails; a
    standby restore's bounded loss is the other case) means the device
    is back on SQLite: the monitor's last line must not call it a failed
    rollback, which would send a 3 a.m. operator to do it again."""
    from tests.helpers import rollback as helpers

    helpers.seed_device(settings)
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = 'sh -c "exit 7"'
    flaky.queue(FAIL, FAIL)
    message, _ = refused(*FAST, '--window', '4', '--consecutive', '2',
                         '--max-probes', '10', '--auto-rollback', code=4)
    assert 'rolled back after the trigger' in message
    assert 'failed' not in message.split('rolled back after the trigger')[0]
    assert 'the rollback failed' not in message
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'


# --- the standby alert ------------------------------------------------------

def lagging_device(settings, data_dir, seconds: float) -> None:
    """On postgres in an open window, with a real standby *seconds*
    behind (replicate_changes ran once, then "stopped")."""
    seed_device(settings, n_assets=5)
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    age_standby(data_dir, seconds)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_subprocess_lagging_standby_alerts_exit_3_and_never_rolls_back(
        data_dir, settings, host_env):
    lagging_device(settings, data_dir, 90)
    # --auto-rollback and a trigger after one bad round: an alert that
    # counted as a breach would roll this device back at once.
    proc = run_manage(host_env, 'monitor_migration', '--interval', '0.05',
                      '--max-probes', '3', '--consecutive', '1',
                      '--auto-rollback')
    assert proc.returncode == 3, proc.stdout + proc.stderr
    alerts = [line for line in proc.stderr.splitlines()
              if line.startswith('ALERT (standby_lag): standby 9')]
    assert len(alerts) == 1, proc.stderr
    assert '> 30 s' in alerts[0] and 'replicate_changes' in alerts[0]
    rounds = [line for line in proc.stdout.splitlines()
              if line.startswith('#')]
    assert len(rounds) == 3 and all(' ok ' in line and 'standby 9' in line
                                    for line in rounds), proc.stdout
    assert proc.stdout.splitlines()[-1].startswith(
        'ALERT, no rollback trigger: standby 9')
    assert 'rolling back' not in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    assert rollback.latest_report(conf.reports_dir()) is None

    # The stream: one alert event, the same round after round in the
    # probes' data, the result listing it, then the error object (exit 3).
    proc = run_manage(host_env, 'monitor_migration', '--interval', '0.05',
                      '--max-probes', '3', '--json-lines',
                      '--max-standby-lag', '60')
    assert proc.returncode == 3, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e['event'] for e in events] == [
        'probe', 'alert', 'probe', 'probe', 'result', 'error']
    assert events[1]['kind'] == 'standby_lag' and events[1]['round'] == 1
    assert '> 60 s' in events[1]['message']
    assert all(e['standby']['state'] == 'lagging'
               for e in events if e['event'] == 'probe')
    assert [a['kind'] for a in events[4]['alerts']] == ['standby_lag']
    assert events[-1]['exit_code'] == 3


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_standby_within_the_threshold_says_nothing(data_dir, settings,
                                                   flaky):
    lagging_device(settings, data_dir, 10)
    out, err = watch(*FAST, '--max-probes', '3')
    assert err == ''
    assert 'standby alert past 30s behind' in out.splitlines()[0]
    rounds = out.splitlines()[1:4]
    assert all(' | standby 1' in line and 's behind' in line
               for line in rounds), out
    assert out.splitlines()[-1].startswith('no trigger: 3 rounds')


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_missing_standby_is_one_line_and_0_turns_the_check_off(
        data_dir, settings, flaky):
    seed_device(settings, n_assets=5)   # window open, no replicator ran
    message, out = refused(*FAST, '--max-probes', '4', code=3)
    assert message.startswith('ALERT, no rollback trigger: no usable '
                              'standby while a rollback window is open')
    assert out.count(' | standby missing') == 4
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError):
        call_command('monitor_migration', *FAST, '--max-probes', '4',
                     stdout=out, stderr=err)
    assert err.getvalue().count('ALERT (standby_missing)') == 1
    assert len(err.getvalue().splitlines()) == 1
    out, err = watch(*FAST, '--max-probes', '2', '--max-standby-lag', '0')
    assert 'standby not checked' in out.splitlines()[0]
    assert 'standby' not in ''.join(out.splitlines()[1:])
    assert err == ''
