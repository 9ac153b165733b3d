"""SIGKILL the rollback at many points: the live file is always whole
(old or new data, integrity ok) and a rerun finishes the job."""
import subprocess
import sys
import time

import pytest
from django.db import DatabaseError, connections

from anthias_app.models import Asset
from anthias_rollback import profiles
from anthias_rollback.window import journal as window_journal
from tests.conftest import ROOT, run_manage
from tests.helpers.rollback import (
    fingerprint_postgres,
    fingerprint_sqlite,
    normalise,
    scratch_files,
    seed_device,
    write_on_postgres,
)

ALL = ['default', 'sqlite', 'postgres']
# The default build is incremental (the journal's tail on the cutover
# file); the full copy's own points are reached with --full.
FULL_COPY_POINTS = [
    'rollback:schema-created',
    'rollback:copied-migrations.Migration',
    'rollback:copied-contenttypes.ContentType',
    'rollback:copied-auth.Permission',
    'rollback:copied-auth.User',
    'rollback:copied-anthias_app.Asset',
    'rollback:copied-sessions.Session',
    'transfer_before_commit',
]
KILL_POINTS = [
    ('rollback:locked', ()),
    ('atomic-write:before-rename', ()),    # first durable write: run state
    ('rollback:preflight-done', ()),
    ('rollback:source-done', ()),
    ('window:fence-raised', ()),
    ('rollback:fence-done', ()),
    ('rollback:base-copied', ()),
    ('rollback:snapshot-taken', ()),
    ('replicate:chunk-applied', ()),
    ('rollback:tail-applied', ()),
    ('rollback:snapshot-taken', ('--full',)),
    *((point, ('--full',)) for point in FULL_COPY_POINTS),
    ('rollback:build-done', ()),
    ('rollback:verify-done', ()),
    ('swap:intent-written', ()),
    ('swap:checkpointed', ()),
    ('swap:safety-linked', ()),
    ('swap:side-files-removed', ()),
    ('swap:renamed', ()),
    ('rollback:swap-done', ()),
    ('rollback:profile-done', ()),
    ('rollback:proof-done', ()),
    ('rollback:post-verify-done', ()),
    ('rollback:reported', ()),
]
# Killed once the new file is live: the rerun resumes (no second build,
# no second swap) instead of starting again.
AFTER_SWAP = {'swap:renamed', 'rollback:swap-done', 'rollback:profile-done',
              'rollback:proof-done', 'rollback:post-verify-done',
              'rollback:reported'}


@pytest.fixture
def unfence():
    yield
    connections['postgres'].close()


@pytest.mark.slow
@pytest.mark.parametrize(('point', 'args'), KILL_POINTS)
@pytest.mark.django_db(databases=ALL, transaction=True)
def test_killed_rollback_leaves_whole_file_and_rerun_finishes(
        point, args, data_dir, settings, host_env, unfence):
    device = seed_device(settings)
    write_on_postgres(device)
    old = normalise(fingerprint_sqlite(device.live))
    new = normalise(fingerprint_postgres())
    assert old != new
    connections['sqlite'].close()
    connections['default'].close()

    env = dict(host_env, ANTHIAS_ROLLBACK_KILL_AT=point)
    copies_before = set(device.live.parent.glob('*.pre-rollback-*'))
    done = run_manage(env, 'rollback_migration', '--emergency', *args)
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
    assert window_journal.window_state('postgres').fence == 'up', point
    with pytest.raises(DatabaseError, match='fenced'):
        Asset.objects.using('postgres').filter(
            pk=device.asset_ids[2]).update(name='stale writer')
    assert 'data loss: none (proven' in done.stdout, point
    assert scratch_files(device.live) == [], point
    safety_copies = set(device.live.parent.glob('*.pre-rollback-*')) - \
        copies_before
    if point in AFTER_SWAP:
        assert 'resumed:       the run started at' in done.stdout, point
        assert 'phases:' in done.stdout and ' build ' in done.stdout
        assert len(safety_copies) == 1, (point, safety_copies)
    else:
        assert 'resumed:' not in done.stdout, point


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
