"""The standby promoted, not copied (issue 22): the rollback applies the
journal's tail to the standby file itself, under the standby lock, and
renames it into the live file's place; its integrity is the replicator's
recorded quick_check of exactly those bytes. Real processes, a real
PostgreSQL, real files."""
import os
import sqlite3
import threading

import pytest
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback import locking
from anthias_rollback.exceptions import ReplicationError
from anthias_rollback.window import integrity
from anthias_rollback.window import replicator as window_replicator
from anthias_rollback.window import standby as window_standby
from tests.conftest import run_manage
from tests.helpers.rollback import (
    fingerprint_postgres,
    fingerprint_sqlite,
    normalise,
    scratch_files,
    seed_device,
    spoil_table_root,
    write_on_postgres,
)

ALL = ['default', 'sqlite', 'postgres']


def replicate_once(data_dir) -> None:
    window_replicator.run_replicator('postgres', data_dir=data_dir,
                                     once=True)


def rollback(host_env, *args):
    connections['sqlite'].close()
    connections['default'].close()
    done = run_manage(host_env, 'rollback_migration', '--emergency', *args)
    connections['postgres'].close()
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def tables(path) -> set[str]:
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        return {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_standby_itself_becomes_the_live_file(data_dir, settings,
                                                  host_env):
    device = seed_device(settings)
    write_on_postgres(device)
    replicate_once(data_dir)
    path = window_standby.standby_path(data_dir)
    inode = os.stat(path).st_ino
    position = window_standby.read_position(path)
    # A write after the standby's position: the tail the rollback applies.
    Asset.objects.using('postgres').filter(pk=device.asset_ids[3]).update(
        name='in the tail')
    done = rollback(host_env)
    assert ('copy:          incremental: standby (promoted in place, not '
            f'copied) as of {position.position_at} + 1 journal entries'
            in done.stdout), done.stdout
    # Its integrity was the replicator's check, not a read of the file.
    assert "quick_check (of the standby's rows, by replicate_changes" in \
        done.stdout
    assert 'data loss: none (proven' in done.stdout.splitlines()[-1]
    assert os.stat(device.live).st_ino == inode
    assert not path.exists()
    assert window_standby.POSITION_TABLE not in tables(device.live)
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_idle_rounds_leave_the_checked_file_as_it_was(data_dir, settings):
    """A round that applies nothing moves the position on (beside the
    file) without writing the file, so the recorded check still covers
    it; a write through SQLite afterwards makes it stale."""
    device = seed_device(settings, n_assets=5)
    write_on_postgres(device)
    replicate_once(data_dir)
    path = window_standby.standby_path(data_dir)
    first = window_standby.read_position(path)
    assert integrity.recorded_check(data_dir, first)['result'] == 'ok'
    before = os.stat(path)
    replicate_once(data_dir)
    replicate_once(data_dir)
    later = window_standby.read_position(path)
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns,
                                                 before.st_size)
    assert later.batches == first.batches + 2
    assert later.position_ts > first.position_ts
    assert later.entries == first.entries
    assert integrity.recorded_check(data_dir, later) is not None
    # The idle record is not fsynced (twice a second on an SD card): one
    # a power cut left empty or torn is ignored, the file's own older
    # position stands.
    idle = path.parent / window_standby.IDLE_NAME
    for torn in (b'', b'{"inode": '):
        idle.write_bytes(torn)
        assert window_standby.read_position(path) == first
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE assets SET name = 'edited by hand'")
    conn.close()
    assert integrity.recorded_check(data_dir, later) is None


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_standby_changed_since_its_check_is_checked_by_the_rollback(
        data_dir, settings, host_env):
    device = seed_device(settings, n_assets=5)
    write_on_postgres(device)
    replicate_once(data_dir)
    path = window_standby.standby_path(data_dir)
    conn = sqlite3.connect(path)
    with conn:     # valid SQLite, but not the bytes that were checked
        conn.execute('CREATE TABLE scratch (x)')
        conn.execute('DROP TABLE scratch')
    conn.close()
    done = rollback(host_env)
    assert 'standby (promoted in place, not copied)' in done.stdout
    assert 'quick_check (of the standby, during the build)' in done.stdout
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_spoiled_standby_is_left_alone_and_the_full_copy_taken(
        data_dir, settings, host_env):
    """A page spoiled on disk after the replicator's check: the file no
    longer matches the record, the rollback's own quick_check fails, the
    tail's transaction is rolled back and PostgreSQL is copied whole."""
    device = seed_device(settings, n_assets=5)
    write_on_postgres(device)
    replicate_once(data_dir)
    path = window_standby.standby_path(data_dir)
    spoil_table_root(path, 'auth_user')
    spoiled = path.read_bytes()
    done = rollback(host_env)
    assert 'copy:          full: the standby fails quick_check' in \
        done.stdout, done.stdout
    assert 'Traceback' not in done.stderr
    assert path.read_bytes() == spoiled
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_standby_the_replicator_holds_is_copied_not_promoted(
        data_dir, settings, host_env):
    """The replicator's round (here: its lock, held by this process)
    outlasts the rollback's wait: the standby is copied as before, and
    stays where it is."""
    device = seed_device(settings, n_assets=5)
    write_on_postgres(device)
    replicate_once(data_dir)
    path = window_standby.standby_path(data_dir)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with integrity.standby_lock(data_dir, 1.0):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        held.wait(10)
        done = rollback(host_env)
    finally:
        release.set()
        holder.join()
    assert 'copy:          incremental: standby as of' in done.stdout
    assert (f'standby not promoted: the standby {path} is in use (pid '
            f'{os.getpid()})') in done.stdout
    assert window_standby.read_position(path) is not None
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_no_standby_is_built_while_a_rollback_runs(data_dir, settings):
    """Once a rollback has promoted the standby, the replicator must not
    build a new one beside it (a full copy of PostgreSQL, for nothing)
    while the rollback holds its operation lock."""
    seed_device(settings, n_assets=3)
    replicate_once(data_dir)
    window_standby.standby_path(data_dir).unlink()
    with locking.operation_lock(data_dir, 'rollback_migration'), \
            pytest.raises(ReplicationError,
                          match='rollback_migration is running'):
        replicate_once(data_dir)
    assert not window_standby.standby_path(data_dir).exists()


@pytest.mark.slow
@pytest.mark.parametrize('point', ['rollback:tail-applied',
                                   'rollback:tail-committed',
                                   'rollback:standby-promoted'])
@pytest.mark.django_db(databases=ALL, transaction=True)
def test_killed_while_promoting_the_live_file_stays_whole(
        point, data_dir, settings, host_env):
    """SIGKILL inside the tail's transaction on the standby (rolled back
    by SQLite: the standby as it was), after its commit but before the
    rename (a standby with no position: not promoted again, the rerun
    takes the cutover file), and right after the rename (the promoted
    file is a scratch file of the killed run): the live file is the old
    one, and a rerun finishes with PostgreSQL's rows."""
    device = seed_device(settings)
    write_on_postgres(device)
    replicate_once(data_dir)
    Asset.objects.using('postgres').filter(pk=device.asset_ids[3]).update(
        name='in the tail')
    old = normalise(fingerprint_sqlite(device.live))
    new = normalise(fingerprint_postgres())
    connections['sqlite'].close()
    connections['default'].close()
    done = run_manage(dict(host_env, ANTHIAS_ROLLBACK_KILL_AT=point),
                      'rollback_migration', '--emergency')
    assert done.returncode == -9, done.stdout + done.stderr
    assert normalise(fingerprint_sqlite(device.live)) == old
    path = window_standby.standby_path(data_dir)
    if point == 'rollback:tail-applied':
        # Rolled back: the standby still holds its position.
        assert window_standby.read_position(path) is not None
    if point == 'rollback:tail-committed':
        assert path.exists() and window_standby.read_position(path) is None
    done = rollback(host_env)
    assert 'data loss: none (proven' in done.stdout.splitlines()[-1]
    if point == 'rollback:tail-committed':
        assert 'cutover file (promoted in place' in done.stdout
        assert 'standby not used: the standby' in done.stdout
        assert 'has no position' in done.stdout
    assert normalise(fingerprint_sqlite(device.live)) == new
    assert scratch_files(device.live) == []


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_cutover_file_touched_since_the_switch_is_copied_and_hashed(
        data_dir, settings, host_env):
    """The cutover file is promoted only when its inode, size and mtime
    are what the switch recorded; touched (same bytes), it is copied and
    its sha256 checked instead, and it stays in place."""
    device = seed_device(settings, n_assets=5)
    write_on_postgres(device)
    cut = window_standby.cutover_path(data_dir)
    os.utime(cut, ns=(1, 1))
    done = rollback(host_env)
    assert 'copy:          incremental: cutover file as of' in done.stdout
    assert 'the same sha256 now' in done.stdout
    assert cut.exists()
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())
