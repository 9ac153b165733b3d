"""SIGKILL the rollback at many points: the live file is always whole
(old or new data, integrity ok) and a rerun finishes the job."""
import subprocess
import sys
import time

import pytest
from django.db import DatabaseError, connections

from anthias_app.models import Asset
from anthias_rollback import profiles, window
from tests.conftest import ROOT, run_manage
from tests.helpers.rollback import (
    fingerprint_postgres,
    fingerprint_sqlite,
    normalise,
    seed_device,
    write_on_postgres,
)

ALL = ['default', 'sqlite', 'postgres']
KILL_POINTS = [
    'rollback:locked',
    'atomic-write:before-rename',      # first durable write: run state
    'rollback:preflight-done',
    'rollback:source-done',
    'window:fence-raised',
    'rollback:fence-done',
    'rollback:schema-created',
    'rollback:snapshot-taken',
    'rollback:copied-migrations.Migration',
    'rollback:copied-contenttypes.ContentType',
    'rollback:copied-auth.Permission',
    'rollback:copied-auth.User',
    'rollback:copied-anthias_app.Asset',
    'rollback:copied-sessions.Session',
    'transfer_before_commit',
    'rollback:build-done',
    'rollback:verify-done',
    'swap:intent-written',
    'swap:checkpointed',
    'swap:safety-linked',
    'swap:side-files-removed',
    'swap:renamed',
    'rollback:swap-done',
    'rollback:profile-done',
    'rollback:proof-done',
    'rollback:post-verify-done',
]


@pytest.fixture
def unfence():
    yield
    connections['postgres'].close()


@pytest.mark.slow
@pytest.mark.parametrize('point', KILL_POINTS)
@pytest.mark.django_db(databases=ALL, transaction=True)
def test_killed_rollback_leaves_whole_file_and_rerun_finishes(
        point, data_dir, settings, host_env, unfence):
    device = seed_device(settings)
    write_on_postgres(device)
    old = normalise(fingerprint_sqlite(device.live))
    new = normalise(fingerprint_postgres())
    assert old != new
    connections['sqlite'].close()
    connections['default'].close()

    env = dict(host_env, ANTHIAS_ROLLBACK_KILL_AT=point)
    done = run_manage(env, 'rollback_migration', '--emergency')
    assert done.returncode == -9, (point, done.stdout, done.stderr)
    assert normalise(fingerprint_sqlite(device.live)) in (old, new), point

    done = run_manage(host_env, 'rollback_migration', '--emergency')
    assert done.returncode == 0, (point, done.stdout, done.stderr)
    assert 'ROLLED BACK' in done.stdout.strip().splitlines()[-1]
    assert normalise(fingerprint_sqlite(device.live)) == new
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'
    connections['postgres'].close()
    assert normalise(fingerprint_postgres()) == new
    # The fence stays up after the rollback (no write may land in the
    # abandoned database), whatever phase the first run died in; the
    # rerun's loss is proven. No half-built file is left behind.
    assert window.window_state('postgres').fence == 'up', point
    with pytest.raises(DatabaseError, match='fenced'):
        Asset.objects.using('postgres').filter(
            pk=device.asset_ids[2]).update(name='stale writer')
    assert 'data loss: none (proven' in done.stdout, point
    leftovers = [p.name for p in device.live.parent.iterdir()
                 if '.rollback-new-' in p.name or '.dry-run-' in p.name]
    assert leftovers == [], point


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_second_rollback_is_refused_while_first_runs(data_dir, settings,
                                                     host_env, unfence):
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    env = dict(host_env, ANTHIAS_ROLLBACK_PAUSE_AT='rollback:locked:10')
    first = subprocess.Popen(
        [sys.executable, str(ROOT / 'manage.py'), 'rollback_migration',
         '--emergency'], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        lock = data_dir / 'anthias_rollback.lock'
        for _ in range(100):
            if lock.exists() and 'rollback_migration' in lock.read_text():
                break
            time.sleep(0.1)
        before = fingerprint_sqlite(device.live)
        second = run_manage(host_env, 'rollback_migration', '--emergency')
        assert second.returncode == 1
        assert 'another operation holds the lock' in second.stderr
        assert f'pid {first.pid}' in second.stderr
        assert fingerprint_sqlite(device.live) == before
        assert profiles.resolve_active_profile(data_dir, {}).name == \
            'postgres'
    finally:
        _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
