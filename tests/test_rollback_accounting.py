"""The cutover accounting under concurrent writes (issue: a delete
committed between the journal read and a table's count looked like a row
PostgreSQL lost, and `auto` restored the pre-cutover backup over writes
PostgreSQL still held, exit 0)."""
import sqlite3
import subprocess
import sys
import time

import pytest
from django.db import connections

from anthias_rollback.window import journal as window_journal
from tests.conftest import ROOT
from tests.helpers.pg import pg_session
from tests.helpers.rollback import seed_device

ALL = ['default', 'sqlite', 'postgres']


def live_asset_ids(live) -> set[str]:
    conn = sqlite3.connect(f'file:{live}?mode=ro', uri=True)
    try:
        return {r[0] for r in conn.execute('SELECT asset_id FROM assets')}
    finally:
        conn.close()


def postgres_asset_ids() -> set[str]:
    with connections['postgres'].cursor() as cursor:
        cursor.execute('SELECT asset_id FROM assets')
        return {r[0] for r in cursor.fetchall()}


def start_rollback(env, *args):
    return subprocess.Popen(
        [sys.executable, str(ROOT / 'manage.py'), 'rollback_migration',
         '--emergency', '--yes', *args], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(flag, proc, seconds=90):
    deadline = time.monotonic() + seconds
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, 'the pause was never reached'
        time.sleep(0.05)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_delete_between_the_source_phase_and_the_fence_is_no_loss(
        data_dir, settings, host_env):
    """The deterministic form of the race: the rollback pauses after its
    source phase, before the fence; another session deletes rows and
    commits; the accounting (in the build's snapshot: the cutover, the
    journal and the counts read together) must balance, so PostgreSQL
    stays the source and nothing is dropped."""
    device = seed_device(settings)   # leaves a verified backup behind
    connections['sqlite'].close()
    paused = data_dir / 'paused.flag'
    env = dict(host_env,
               ANTHIAS_ROLLBACK_PAUSE_AT='rollback:source-done:4',
               ANTHIAS_ROLLBACK_PAUSED_FLAG=str(paused))
    proc = start_rollback(env)
    wait_for(paused, proc)
    other = pg_session()
    other.autocommit = True
    with other.cursor() as cur:
        cur.execute('DELETE FROM assets WHERE asset_id = ANY(%s)',
                    [device.asset_ids[:3]])
    other.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert 'source:        postgres' in out, out
    assert 'data loss: none (proven' in out.strip().splitlines()[-1]
    assert live_asset_ids(device.live) == postgres_asset_ids()
    assert not set(device.asset_ids[:3]) & live_asset_ids(device.live)


def read_mixed_log(log):
    """Per key, whether its last acknowledged write left it present."""
    present: dict[str, bool] = {}
    for line in log.read_text().splitlines():
        kind, rest = line.split(' ', 1)
        if kind == 'ok':
            present[rest.split()[0]] = True
        elif kind == 'del':
            present[rest.split()[0]] = False
    return present


@pytest.mark.slow
@pytest.mark.django_db(databases=ALL, transaction=True)
def test_writers_that_delete_never_make_auto_restore_the_backup(
        data_dir, settings, host_env, tmp_path):
    """Writers that insert, update and delete while the emergency
    rollback runs, with a verified backup present: PostgreSQL stays the
    source, exit 0, and the live file holds exactly the acknowledged
    state."""
    device = seed_device(settings)
    connections['sqlite'].close()
    log = tmp_path / 'writes.log'
    writers = [subprocess.Popen(
        [sys.executable, '-m', 'tests.helpers.orm_writer', str(log), '20',
         'mix'], env=host_env, cwd=ROOT) for _ in range(3)]
    try:
        deadline = time.monotonic() + 60
        while sum(1 for line in (log.read_text().splitlines()
                                 if log.exists() else [])
                  if line.startswith('del ')) < 20:
            assert time.monotonic() < deadline, 'writers never deleted'
            time.sleep(0.05)
        proc = start_rollback(host_env)
        out, err = proc.communicate(timeout=120)
        for writer in writers:
            writer.wait(timeout=60)
    finally:
        for writer in writers:
            writer.kill()
    assert proc.returncode == 0, out + err
    assert 'source:        postgres' in out, out
    restored = live_asset_ids(device.live)
    # The fence froze PostgreSQL: the live file equals it, and every
    # acknowledged create or delete is reflected.
    assert restored == postgres_asset_ids()
    present = read_mixed_log(log)
    assert sum(1 for p in present.values() if not p) >= 20
    wrong = [pk for pk, p in present.items() if (pk in restored) != p]
    assert wrong == []
    assert window_journal.account_cutover('postgres') == []
