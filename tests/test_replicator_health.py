"""A failing replicate_changes says so: every round's outcome is recorded
beside the standby (window.standby.record_round), and switch_database
--show, rollback_readiness, /health and the monitor's standby alert name
the failure and its last error until a round succeeds again.

The failure is real: the standby file loses a table the applier needs
(renamed away with sqlite3, then back), or PostgreSQL is really stopped.
"""
import json
import os
import sqlite3
import stat
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from anthias_rollback.exceptions import ReplicationError
from anthias_rollback.window import replicator as window_replicator
from anthias_rollback.window import standby as window_standby
from tests.conftest import postgres_stopped
from tests.helpers.factories import AssetFactory
from tests.helpers.rollback import seed_device

ALL = ['default', 'sqlite', 'postgres']
ERROR = 'no such table: assets'


def once(data_dir):
    return window_replicator.run_replicator('postgres', data_dir=data_dir,
                                            once=True)


def rename_table(data_dir, old, new):
    conn = sqlite3.connect(window_standby.standby_path(data_dir))
    try:
        conn.execute(f'ALTER TABLE {old} RENAME TO {new}')
        conn.commit()
    finally:
        conn.close()


def show(*args):
    out = StringIO()
    call_command('switch_database', '--show', *args, stdout=out,
                 stderr=StringIO())
    return out.getvalue()


def readiness(*args):
    """(exit code, stdout) of rollback_readiness."""
    out = StringIO()
    try:
        call_command('rollback_readiness', *args, stdout=out,
                     stderr=StringIO())
    except CommandError as err:
        return err.returncode, out.getvalue() + f'\nerror: {err}'
    return 0, out.getvalue()


def monitor(*args):
    """(exit code, stdout + stderr) of one in-process monitor round."""
    out, err = StringIO(), StringIO()
    try:
        call_command('monitor_migration', '--interval', '0.005',
                     '--max-probes', '1', *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + err.getvalue()
    return 0, out.getvalue() + err.getvalue()


def fail_rounds(data_dir, n):
    for _ in range(n):
        with pytest.raises(ReplicationError, match=ERROR):
            once(data_dir)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_failing_replicator_is_named_everywhere_then_cleared(data_dir,
                                                               settings):
    seed_device(settings, n_assets=5)
    once(data_dir)
    health = window_standby.replicator_health(data_dir)
    assert health.recorded and not health.failing
    assert health.last_success_at and health.last_position_at
    path = window_standby.health_path(data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # A real failure: the standby loses the table the next batch needs.
    rename_table(data_dir, 'assets', 'assets_away')
    AssetFactory.build(name='written after the break').save(using='postgres')
    fail_rounds(data_dir, 2)
    health = window_standby.replicator_health(data_dir)
    assert health.failing and health.consecutive_failures == 2
    assert ERROR in health.last_error and not health.postgres_down
    assert health.first_failure_at and health.last_success_at

    # switch_database --show: text and JSON
    text = show()
    line = next(x for x in text.splitlines() if x.startswith('replicator:'))
    assert 'replicate_changes is failing' in line and ERROR in line
    assert '2 rounds in a row' in line
    shown = json.loads(show('--json'))['replicator']
    assert shown['failing'] is True and shown['consecutive_failures'] == 2
    assert ERROR in shown['last_error']

    # rollback_readiness: NOT READY, exit 3, the error and where to look
    code, out = readiness()
    assert code == 3, out
    failed = next(x for x in out.splitlines() if 'FAIL  standby' in x)
    assert 'replicate_changes is failing' in failed and ERROR in failed
    assert 'see its log' in failed
    assert 'not ready: standby' in out
    code, out = readiness('--json')
    report = json.loads(out.split('\nerror: ')[0])
    check = {c['name']: c for c in report['checks']}['standby']
    assert check['ok'] is False and check['informational'] is False
    assert ERROR in check['reason']

    # /health: a standby block and a warning; the device still serves.
    body = Client().get('/health').json()
    assert body['standby']['failing'] is True
    assert ERROR in body['standby']['last_error']
    assert any('replicate_changes is failing' in w and ERROR in w
               for w in body['warnings'])

    # The monitor: one replicator_failing alert, with the error; exit 3.
    code, out = monitor()
    assert code == 3, out
    assert 'ALERT (replicator_failing)' in out and ERROR in out
    code, out = monitor('--json-lines')
    events = [json.loads(x) for x in out.splitlines() if x.startswith('{')]
    alert = next(e for e in events if e['event'] == 'alert')
    assert alert['kind'] == 'replicator_failing' and ERROR in alert['message']
    probe = next(e for e in events if e['event'] == 'probe')
    assert probe['standby']['state'] == 'failing'
    assert ERROR in probe['standby']['last_error']

    # Mended: the next round succeeds and every reader is clear.
    rename_table(data_dir, 'assets_away', 'assets')
    once(data_dir)
    health = window_standby.replicator_health(data_dir)
    assert not health.failing and health.last_error is None
    assert health.first_failure_at is None
    assert 'failing' not in next(x for x in show().splitlines()
                                 if x.startswith('replicator:'))
    code, out = readiness()
    assert code == 0 and out.splitlines()[-1] == 'READY', out
    body = Client().get('/health').json()
    assert body['standby']['failing'] is False
    assert body['standby']['last_error'] is None
    assert not any('replicate_changes' in w for w in body['warnings'])
    code, out = monitor()
    assert code == 0, out
    assert 'ALERT' not in out


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_replicator_that_never_built_the_standby_says_why(data_dir,
                                                            settings):
    """The incident: every round failed before a standby existed, and
    --show said 'replicate_changes not run'."""
    seed_device(settings, n_assets=3)
    folder = window_standby.standby_dir(data_dir)
    # The file the bootstrap builds in is a directory: it cannot start.
    (folder / f'.{window_standby.STANDBY_NAME}.{os.getpid()}.tmp').mkdir()
    for _ in range(3):
        with pytest.raises(ReplicationError, match='Is a directory'):
            once(data_dir)
    assert not window_standby.standby_path(data_dir).exists()
    health = window_standby.replicator_health(data_dir)
    assert health.consecutive_failures == 3
    assert 'Is a directory' in health.last_error
    kept = json.loads(show('--json'))['standby']
    assert kept['problem'].startswith('no standby: replicate_changes is '
                                      'failing: round failed: ')
    assert 'Is a directory' in kept['problem']
    assert 'standby: no standby: replicate_changes is failing' in show()
    code, out = readiness()
    assert code == 3 and 'FAIL  standby' in out, out
    assert 'Is a directory' in out


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_postgres_down_is_recorded_as_such_and_is_no_finding(data_dir,
                                                             settings):
    """PostgreSQL stopped: the rounds fail and say so, but the standby is
    as current as it can be: readiness notes it, not NOT READY."""
    seed_device(settings, n_assets=3)
    once(data_dir)
    with postgres_stopped():
        with pytest.raises(ReplicationError, match='unreachable'):
            once(data_dir)
        health = window_standby.replicator_health(data_dir)
        assert health.failing and health.postgres_down
        assert 'unreachable' in health.last_error
        code, out = readiness()
        line = next(x for x in out.splitlines() if ' standby ' in x)
        assert 'FAIL' not in line and 'unreachable' in line, out
        assert 'not ready: standby' not in out
    # PostgreSQL is back but the replicator has not run since: it cannot
    # reach what answers here, so that is a finding again.
    code, out = readiness()
    assert code == 3 and 'FAIL  standby' in out, out
    once(data_dir)
    assert not window_standby.replicator_health(data_dir).failing


def record_migration(data_dir, app, name, delete=False):
    conn = sqlite3.connect(window_standby.standby_path(data_dir))
    try:
        if delete:
            conn.execute('DELETE FROM django_migrations WHERE app = ? AND '
                         'name = ?', [app, name])
        else:
            conn.execute('INSERT INTO django_migrations (app, name, '
                         "applied) VALUES (?, ?, '2026-01-01')", [app, name])
        conn.commit()
    finally:
        conn.close()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_standby_ahead_of_the_code_is_not_ready_behind_is_a_note(
        data_dir, settings):
    seed_device(settings, n_assets=3)
    once(data_dir)
    code, out = readiness()
    assert code == 0, out
    # Behind: the rollback migrates it forward in isolation.
    record_migration(data_dir, 'anthias_app', '0001_initial', delete=True)
    code, out = readiness()
    line = next(x for x in out.splitlines() if ' standby ' in x)
    assert code == 0 and line.startswith('ok'), out
    assert 'migrations behind this code: a rollback migrates it ' \
        'forward in isolation' in line
    # Ahead: recorded migrations this code does not know.
    record_migration(data_dir, 'anthias_app', '9999_from_a_newer_release')
    code, out = readiness()
    assert code == 3, out
    line = next(x for x in out.splitlines() if 'FAIL  standby' in x)
    assert 'unknown to this code: anthias_app.9999_from_a_newer_release' \
        in line
    assert 'deploy the code that applied them' in line
