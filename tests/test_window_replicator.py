"""window.replicator on real files and the real PostgreSQL: the standby
equals PostgreSQL after every kind of write, batches follow transaction
visibility (a late commit is never skipped), a SIGKILL at any instant
leaves a whole standby whose position matches its content, PostgreSQL
stopped mid-run is survived, and a rollback with PostgreSQL down
restores the standby within its bound."""
import os
import random
import signal
import sqlite3
import stat
import threading
import time

import psycopg2
import pytest
from django.db import connections, transaction

from anthias_app.models import Asset
from anthias_rollback import compare, events, profiles
from anthias_rollback.window import replicator as window_replicator
from anthias_rollback.window import standby as window_standby
from tests.conftest import postgres_stopped
from tests.helpers.factories import AssetFactory
from tests.helpers.rollback import seed_device
from tests.kitchensink.models import Category, Item, Membership, Person, Tag

ALL = ['default', 'sqlite', 'postgres']


def once(data_dir):
    return window_replicator.run_replicator('postgres', data_dir=data_dir,
                                            once=True)


def assert_standby_equals_postgres(data_dir):
    path = window_standby.standby_path(data_dir)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        assert conn.execute('PRAGMA foreign_key_check').fetchall() == []
        assert conn.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    finally:
        conn.close()
    with profiles.sqlite_file_alias(path) as alias:
        report = compare.compare_aliases(alias, 'postgres', parallel=False)
    bad = [(m.label, m.left_rows, m.right_rows, m.differences)
           for m in report.models if not m.ok]
    assert bad == []


def pg_session():
    s = connections['postgres'].settings_dict
    return psycopg2.connect(dbname=s['NAME'], host=s['HOST'],
                            port=s['PORT'] or None, user=s['USER'],
                            password=s['PASSWORD'])


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_cutover_file_is_private_and_recorded(data_dir, settings):
    seed_device(settings, n_assets=5)
    folder = window_standby.standby_dir(data_dir)
    cut = window_standby.cutover_path(data_dir)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(cut.stat().st_mode) == 0o600
    from anthias_rollback.engines import postgres_journal as pj
    info = pj.postgres_cutover('postgres')['info']['standby_cutover']
    assert info['path'] == str(cut)
    conn = sqlite3.connect(cut)
    try:
        assert conn.execute('SELECT count(*) FROM assets').fetchone()[0] \
            == 5
    finally:
        conn.close()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_every_kind_of_write_reaches_the_standby(data_dir, settings):
    device = seed_device(settings, n_assets=10)
    result = once(data_dir)
    assert result.position.started_from == 'cutover file'
    assert_standby_equals_postgres(data_dir)
    pg = 'postgres'
    # inserts, updates, deletes, delete-then-reinsert of the same key
    AssetFactory.build(asset_id='new-1', name='new').save(using=pg)
    Asset.objects.using(pg).filter(pk=device.asset_ids[0]).update(
        name='changed ✏️', metadata={'x': [1, 2]})
    Asset.objects.using(pg).filter(pk=device.asset_ids[1]).delete()
    Asset.objects.using(pg).filter(pk=device.asset_ids[2]).delete()
    AssetFactory.build(asset_id=device.asset_ids[2],
                       name='reborn').save(using=pg)
    # kitchen sink: relations, many-to-many, a key change, unique swap
    root = Category.objects.using(pg).create(name='root')
    child = Category.objects.using(pg).create(name='child', parent=root)
    tags = [Tag.objects.using(pg).create(label=f't{i}') for i in range(3)]
    item = Item.objects.using(pg).create(category=child, title='i',
                                         data={'k': 'v'}, blob=b'\x00\x01')
    item.tags.set(tags, through_defaults=None)
    other = Item.objects.using(pg).create(category=root, title='o')
    item.related.add(other)
    person = Person.objects.using(pg).create(name='p')
    Membership.objects.using(pg).create(person=person, item=item)
    once(data_dir)
    assert_standby_equals_postgres(data_dir)
    item.tags.remove(tags[0])
    Category.objects.using(pg).filter(pk=root.pk).update(name='tmp')
    Category.objects.using(pg).filter(pk=child.pk).update(name='root')
    Category.objects.using(pg).filter(pk=root.pk).update(name='child')
    with transaction.atomic(using=pg), connections[pg].cursor() as cursor:
        cursor.execute('UPDATE kitchensink_person SET id = id + 1000')
        cursor.execute('UPDATE kitchensink_membership SET person_id = '
                       'person_id + 1000')
    Tag.objects.using(pg).filter(pk=tags[2].pk).delete()
    once(data_dir)
    assert_standby_equals_postgres(data_dir)
    with connections[pg].cursor() as cursor:
        cursor.execute('TRUNCATE kitchensink_item_related')
    other.related.add(item)
    result = once(data_dir)
    assert result.entries >= 1
    assert_standby_equals_postgres(data_dir)
    position = window_standby.read_position(
        window_standby.standby_path(data_dir))
    state = window_standby.standby_state(data_dir)
    assert state.pending == 0 and state.position == position
    assert 0 <= state.lag_seconds < 60


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_long_transaction_that_commits_late_is_not_skipped(data_dir,
                                                             settings):
    first = seed_device(settings, n_assets=3).asset_ids[0]
    once(data_dir)
    early, late = pg_session(), pg_session()
    try:
        with early.cursor() as cur:   # begins before the batch below
            cur.execute("UPDATE assets SET name = 'long' WHERE asset_id "
                        "= %s", [first])
        with late.cursor() as cur:
            cur.execute("UPDATE assets SET name = 'quick' WHERE asset_id "
                        "<> %s", [first])
        late.commit()
        once(data_dir)      # its tick sees 'quick', not 'long'
        early.commit()      # commits after that batch's tick
    finally:
        early.close()
        late.close()
    once(data_dir)
    assert_standby_equals_postgres(data_dir)
    conn = sqlite3.connect(window_standby.standby_path(data_dir))
    try:
        assert conn.execute("SELECT name FROM assets WHERE asset_id "
                            "= ?", [first]).fetchone()[0] == 'long'
    finally:
        conn.close()


def _child_replicates(data_dir, kill_after):
    """Fork a replicator (this process's setup, new connections) and
    SIGKILL it after *kill_after* seconds."""
    for conn in connections.all(initialized_only=True):
        conn.close()
    pid = os.fork()
    if pid == 0:   # the child: replicate until killed
        try:
            window_replicator.run_replicator('postgres', data_dir=data_dir,
                                             interval=0.01)
        finally:
            os._exit(0)
    time.sleep(kill_after)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.slow
@pytest.mark.django_db(databases=ALL, transaction=True)
def test_sigkill_at_random_points_leaves_a_whole_standby(data_dir,
                                                        settings):
    device = seed_device(settings, n_assets=20)
    rng = random.Random(int(os.environ.get('ANTHIAS_TEST_SEED', '7')))
    trials = 0
    for trial in range(100):
        pg = 'postgres'
        for i in range(rng.randint(1, 40)):
            AssetFactory.build(asset_id=f't{trial}-{i}').save(using=pg)
        Asset.objects.using(pg).filter(
            pk=rng.choice(device.asset_ids)).update(name=f'n{trial}')
        if trial % 7 == 3:
            Asset.objects.using(pg).filter(
                asset_id__startswith=f't{trial - 1}-').delete()
        if trial % 25 == 10:   # a fresh standby: kill the bootstrap too
            window_standby.standby_path(data_dir).unlink(missing_ok=True)
        _child_replicates(data_dir, rng.uniform(0, 0.3))
        path = window_standby.standby_path(data_dir)
        if path.exists():
            conn = sqlite3.connect(path)
            try:
                assert conn.execute('PRAGMA integrity_check'
                                    ).fetchone()[0] == 'ok'
            finally:
                conn.close()
        once(data_dir)
        assert_standby_equals_postgres(data_dir)
        trials += 1
    assert trials == 100


@pytest.mark.slow
@pytest.mark.django_db(databases=ALL, transaction=True)
def test_postgres_stopped_mid_run_is_survived(data_dir, settings):
    seed_device(settings, n_assets=5)
    seen = []
    stop = threading.Event()
    runner = threading.Thread(target=lambda: seen.append(
        window_replicator.run_replicator(
            'postgres', data_dir=data_dir, interval=0.1, max_backoff=1.0,
            stop=stop, progress=seen.append)))
    runner.start()
    try:
        time.sleep(1.0)
        with postgres_stopped():
            time.sleep(3.0)
            assert runner.is_alive()
        AssetFactory.build(asset_id='after-restart').save(using='postgres')
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = window_standby.standby_state(data_dir)
            if state.pending == 0 and state.lag_seconds < 2:
                conn = sqlite3.connect(state.path)
                found = conn.execute("SELECT count(*) FROM assets WHERE "
                                     "asset_id = 'after-restart'"
                                     ).fetchone()[0]
                conn.close()
                if found:
                    break
            time.sleep(0.2)
        else:
            pytest.fail('the replicator did not catch up')
    finally:
        stop.set()
        runner.join(timeout=30)
    warnings = [e.detail for e in seen
                if isinstance(e, events.ProgressEvent)
                and e.kind == events.WARNING]
    assert len(warnings) == 1 and 'unreachable' in warnings[0]
    assert_standby_equals_postgres(data_dir)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_refused_off_the_postgres_profile(data_dir, settings):
    with pytest.raises(window_replicator.ReplicationRefusedError,
                       match='active profile is sqlite'):
        once(data_dir)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_validate_migration_reads_the_standby(data_dir, settings,
                                              host_env):
    """The standby is a plain SQLite database an operator can compare:
    validate_migration --sqlite-db on it passes against PostgreSQL (and
    fails, naming the row, once PostgreSQL moved on)."""
    from tests.conftest import run_manage

    device = seed_device(settings, n_assets=6)
    Asset.objects.using('postgres').filter(pk=device.asset_ids[0]).update(
        name='replicated')
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    path = str(window_standby.standby_path(data_dir))
    done = run_manage(host_env, 'validate_migration', '--sqlite-db', path,
                      '--no-performance-test')
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith('PASS')
    Asset.objects.using('postgres').filter(pk=device.asset_ids[1]).update(
        name='not yet replicated')
    done = run_manage(host_env, 'validate_migration', '--sqlite-db', path,
                      '--no-performance-test')
    assert done.returncode == 3, done.stdout + done.stderr
    assert device.asset_ids[1] in done.stdout + done.stderr
    conn = sqlite3.connect(path)
    assert conn.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
    conn.close()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_replication_carries_on_after_a_migration_on_postgres(data_dir,
                                                              settings):
    """A `migrate` during the window gives PostgreSQL a migration the
    standby lacks (here: the standby is made to predate sessions.0001):
    the next round rebuilds the standby from PostgreSQL instead of
    failing, and the rounds after it replicate as before."""
    from django.contrib.sessions.models import Session
    from django.utils import timezone

    seed_device(settings, n_assets=5)
    assert once(data_dir).position.started_from == 'cutover file'
    path = window_standby.standby_path(data_dir)
    conn = sqlite3.connect(path)
    conn.execute('DROP TABLE django_session')
    conn.execute("DELETE FROM django_migrations WHERE app = 'sessions'")
    conn.commit()
    conn.close()
    Session.objects.using('postgres').create(
        session_key='k' * 32, session_data='{}',
        expire_date=timezone.now())
    AssetFactory.build(asset_id='after-migrate').save(using='postgres')
    result = once(data_dir)
    assert result.position.started_from == 'full copy'
    assert_standby_equals_postgres(data_dir)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*) FROM django_migrations WHERE "
                            "app = 'sessions'").fetchone()[0] >= 1
        assert conn.execute('SELECT session_key FROM django_session'
                            ).fetchall() == [('k' * 32,)]
    finally:
        conn.close()
    Asset.objects.using('postgres').filter(pk='after-migrate').update(
        name='changed after the rebuild')
    result = once(data_dir)
    assert result.entries >= 1
    assert result.position.started_from == 'full copy'
    assert_standby_equals_postgres(data_dir)
