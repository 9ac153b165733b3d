"""The standby's position, lag and loss bound do not rest on this
device's clock (a Raspberry Pi has no RTC; NTP or a person moves it):
they come from PostgreSQL's side, journal entries and their times."""
import json
import sqlite3
import time
from datetime import datetime

import pytest
from django.db import connections

from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.window import standby as window_standby
from tests.conftest import ROOT, postgres_stopped, run_manage
from tests.helpers.factories import AssetFactory
from tests.helpers.rollback import seed_device

ALL = ['default', 'sqlite', 'postgres']
HOUR = 3600.0


def skewed(host_env, seconds: float) -> dict:
    """The environment of a child process whose clock is *seconds* off."""
    return dict(host_env, ANTHIAS_TEST_CLOCK_OFFSET=str(seconds),
                PYTHONPATH=f'{ROOT / "tests/helpers/clock_skew"}:'
                           f'{host_env["PYTHONPATH"]}')


def pending_age(position) -> float:
    return pj.postgres_pending('postgres', position.snapshot)[1]


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_replicator_whose_clock_ran_an_hour_ahead(data_dir, settings,
                                                   host_env):
    seed_device(settings, n_assets=5)
    # The stand-in for the clock really is an hour ahead in the child.
    probe = run_manage(skewed(host_env, HOUR), 'shell', '-c',
                       'import time; print(time.time())')
    assert float(probe.stdout.split()[-1]) - time.time() > HOUR - 60
    done = run_manage(skewed(host_env, HOUR), 'replicate_changes', '--once')
    assert done.returncode == 0, done.stdout + done.stderr
    path = window_standby.standby_path(data_dir)
    position = window_standby.read_position(path)
    # Stamped with PostgreSQL's time, not the replicator's.
    assert abs(position.position_ts - time.time()) < 60
    assert abs(position.postgres_seen_ts - time.time()) < 60

    # The replicator dies; ten acknowledged writes it never applies.
    acked = []
    for _ in range(10):
        asset = AssetFactory.build()
        asset.save(using='postgres')
        acked.append((asset.pk, time.time()))
    # Lag: the age of the oldest write the standby lacks, so a 1 s
    # threshold alerts once that write is a second old (on the old
    # clock-based lag, an hour-ahead position read 0 s behind).
    deadline = time.monotonic() + 30
    while pending_age(position) < 1.2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    state = window_standby.standby_state(data_dir, 'postgres')
    assert state.pending == 10 and state.lag_seconds >= 1.2
    watched = run_manage(host_env, 'monitor_migration', '--interval', '0.05',
                         '--max-probes', '2', '--max-standby-lag', '1')
    assert watched.returncode == 3, watched.stdout + watched.stderr
    assert 'ALERT (standby_lag)' in watched.stderr
    assert '10 journal entries not applied' in watched.stderr
    ready = run_manage(host_env, 'rollback_readiness')
    assert '10 journal entries pending' in ready.stdout

    # PostgreSQL down: the standby restore's bound is before every lost
    # write (it said "after <an hour ahead>" when stamped by the clock).
    connections['sqlite'].close()
    with postgres_stopped():
        rolled = run_manage(host_env, 'rollback_migration', '--emergency',
                            '--yes', '--json')
    assert rolled.returncode == 4, rolled.stdout + rolled.stderr
    result = json.loads(rolled.stdout)
    assert result['source'] == 'standby'
    bound = datetime.fromisoformat(
        result['standby_bound']['position_at']).timestamp()
    assert all(acked_at > bound for _, acked_at in acked)
    conn = sqlite3.connect(settings.DATABASES['sqlite']['NAME'])
    try:
        restored = {r[0] for r in conn.execute('SELECT asset_id FROM assets')}
    finally:
        conn.close()
    assert not {pk for pk, _ in acked} & restored


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_once_without_a_window_is_exit_1(data_dir, settings, host_env):
    seed_device(settings, n_assets=3)
    ended = run_manage(host_env, 'end_rollback_window', '--force')
    assert ended.returncode == 0, ended.stderr
    done = run_manage(host_env, 'replicate_changes', '--once')
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'no rollback window is open' in done.stderr
    assert 'Traceback' not in done.stderr


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_fence_goes_up_at_the_first_chance_after_a_standby_restore(
        data_dir, settings, host_env):
    """PostgreSQL was down, so the standby restore could not fence it.
    Until one of our processes reaches it, readiness and /health say so
    (a stale write is still acknowledged); the first command that does
    raises the fence, and the stale write is refused."""
    device = seed_device(settings, n_assets=5)
    done = run_manage(host_env, 'replicate_changes', '--once')
    assert done.returncode == 0, done.stderr
    connections['sqlite'].close()
    with postgres_stopped():
        rolled = run_manage(host_env, 'rollback_migration', '--emergency',
                            '--yes')
        assert rolled.returncode == 4, rolled.stdout + rolled.stderr
        assert 'source:        standby' in rolled.stdout
        ready = run_manage(host_env, 'rollback_readiness')
        assert 'the write fence on PostgreSQL is not up' in ready.stdout
        health = run_manage(host_env, 'shell', '-c',
                            'import json; from anthias_rollback import '
                            'health; print(json.dumps(health.check_health'
                            '().as_dict()))')
        report = json.loads(health.stdout.strip().splitlines()[-1])
        assert report['status'] == 'ok'
        assert any('write fence' in w for w in report['warnings'])
    # Back, and nobody of ours has reached it yet: a stale write lands.
    connections['postgres'].close()
    from anthias_app.models import Asset
    Asset.objects.using('postgres').filter(
        pk=device.asset_ids[0]).update(name='stale, before the fence')
    # The first command that reaches it (any command) raises the fence.
    shown = run_manage(host_env, 'switch_database', '--show')
    assert shown.returncode == 0, shown.stderr
    assert 'raised the write fence' in shown.stderr
    connections['postgres'].close()
    from django.db import DatabaseError
    with pytest.raises(DatabaseError, match='fenced'):
        Asset.objects.using('postgres').filter(
            pk=device.asset_ids[0]).update(name='stale, after')
    ready = run_manage(host_env, 'rollback_readiness')
    assert 'the write fence on PostgreSQL is not up' not in ready.stdout
