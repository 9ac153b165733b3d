"""The incremental rollback (the journal's tail applied to the standby or
the cutover file) in real processes: it equals the full copy row for row
after every kind of write, takes the standby when there is one, and
falls back to the full copy, saying why, whenever it cannot be sure."""
import datetime as dt
import io
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from django.apps import apps
from django.contrib.auth.models import Group, Permission, User
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.db import connections, models
from django.db.backends.signals import connection_created
from django.utils import timezone

from anthias_app.models import Asset
from anthias_rollback import switch
from anthias_rollback.rollback import preview
from anthias_rollback.rollback import state as rollback_state
from anthias_rollback.window import journal as window_journal
from anthias_rollback.window import replicator as window_replicator
from anthias_rollback.window import standby as window_standby
from tests.conftest import run_manage
from tests.helpers.compare import kitchen_objects
from tests.helpers.factories import AssetFactory
from tests.helpers.rollback import scratch_files, seed_device
from tests.kitchensink.models import Item, Membership, Person, Tag

ALL = ['default', 'sqlite', 'postgres']


def seed_with_kitchen(settings, n_assets: int = 20):
    for batch in kitchen_objects(0):
        type(batch[0])._base_manager.using('sqlite').bulk_create(batch)
    return seed_device(settings, n_assets=n_assets)


def every_kind_of_write(device) -> None:
    """Inserts, updates, deletes, a delete then a reinsert of the same
    key, and many-to-many changes (auto and explicit through tables)."""
    pg = 'postgres'
    ids = device.asset_ids
    Asset.objects.using(pg).filter(pk=ids[0]).update(
        name='edited ✏️', metadata={'b': 1, 'a': [1, 2]})
    Asset.objects.using(pg).filter(pk=ids[1]).delete()
    again = Asset.objects.using(pg).get(pk=ids[2])
    again.delete()
    again.pk = ids[2]          # delete() cleared it
    again.name = 'deleted and back 🔁'
    again.save(using=pg, force_insert=True)
    AssetFactory.build(asset_id='new-on-pg').save(using=pg)
    Asset.objects.using(pg).filter(pk__in=ids[5:12]).update(is_enabled=False)
    item = Item.objects.using(pg).get(pk=1)
    item.tags.remove(*list(item.tags.all()))
    tag = Tag.objects.using(pg).create(id=uuid.UUID(int=42), label='new 🏷')
    Item.objects.using(pg).get(pk=3).tags.add(tag)
    Item.objects.using(pg).get(pk=4).related.add(
        Item.objects.using(pg).get(pk=5))
    Membership.objects.using(pg).filter(pk=1).delete()
    Membership.objects.using(pg).create(
        person=Person.objects.using(pg).get(pk=1),
        item=Item.objects.using(pg).get(pk=1), role='re-added')
    user = User.objects.using(pg).get(username=device.usernames[0])
    group = Group.objects.using(pg).create(name='editors')
    user.groups.add(group)
    user.user_permissions.add(Permission.objects.using(pg).first())
    User.objects.using(pg).filter(username=device.usernames[1]).delete()
    # A TRUNCATE in the tail: that table is re-read whole.
    expires = timezone.now() + dt.timedelta(days=1)
    Session.objects.using(pg).create(session_key='gone', session_data='x',
                                     expire_date=expires)
    with connections[pg].cursor() as cursor:
        cursor.execute('TRUNCATE django_session')
    Session.objects.using(pg).create(session_key='after-truncate',
                                     session_data='y', expire_date=expires)


def json_columns() -> dict[str, set[str]]:
    return {m._meta.db_table: {f.column for f in m._meta.concrete_fields
                               if isinstance(f, models.JSONField)}
            for m in apps.get_models(include_auto_created=True)}


def table_dump(path: Path) -> dict[str, list]:
    """Every row of every table (and sqlite_sequence), read with sqlite3,
    in a stable order. JSON columns are parsed: a full copy writes
    PostgreSQL's jsonb text (keys reordered, no escapes), the untouched
    rows of a base keep the text the app wrote; the values are equal."""
    parse = json_columns()
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND name NOT LIKE 'anthias_rb_%' ORDER BY name")]
        dump = {}
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            names = [d[0] for d in cursor.description]
            rows = [tuple(json.loads(v) if n in parse.get(table, ())
                          and v is not None else v
                          for n, v in zip(names, row))
                    for row in cursor.fetchall()]
            dump[table] = sorted(rows, key=repr)
        return dump
    finally:
        conn.close()


def rollback(env: dict, *args: str):
    connections['sqlite'].close()
    done = run_manage(env, 'rollback_migration', '--emergency', *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'data loss: none (proven' in done.stdout.splitlines()[-1]
    return done


def safety_copy(device) -> Path:
    copies = sorted(device.live.parent.glob(
        f'{device.live.name}.pre-rollback-*'))
    copies = [p for p in copies if not p.name.endswith(('-wal', '-shm'))]
    return copies[-1]


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_incremental_equals_the_full_copy_row_for_row(data_dir, settings,
                                                      host_env):
    device = seed_with_kitchen(settings)
    every_kind_of_write(device)
    first = rollback(host_env)
    # The cutover file itself, not a copy: the switch checked it, and its
    # inode, size and mtime say it is still those bytes.
    assert ('copy:          incremental: cutover file (promoted in place, '
            'not copied) as of') in first.stdout
    assert 'quick_check (of the cutover file, by the switch at' in \
        first.stdout
    assert not window_standby.cutover_path(data_dir).exists()
    assert '(incremental copy)' in first.stdout
    assert 'tables re-read whole after a TRUNCATE: django_session' in \
        first.stdout
    incremental = table_dump(device.live)
    # The same PostgreSQL (fenced, unchanged), copied whole this time.
    second = rollback(host_env, '--source', 'postgres', '--full')
    assert 'copy:          full: asked for (--full)' in second.stdout
    full = table_dump(device.live)
    assert table_dump(safety_copy(device)) == incremental
    assert incremental.keys() == full.keys()
    for table in full:
        assert incremental[table] == full[table], table
    # The writes are really there (not two equally wrong copies).
    names = dict(x[:2] for x in full['assets'])
    assert names[device.asset_ids[2]] == 'deleted and back 🔁'
    assert device.asset_ids[1] not in names
    assert 'new-on-pg' in names
    assert [row[0] for row in full['django_session']] == ['after-truncate']


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_standby_is_the_base_when_replicate_changes_ran(
        data_dir, settings, host_env):
    device = seed_device(settings, n_assets=10)
    Asset.objects.using('postgres').filter(pk=device.asset_ids[0]).update(
        name='replicated')
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    position = window_standby.read_position(
        window_standby.standby_path(data_dir))
    Asset.objects.using('postgres').filter(pk=device.asset_ids[1]).update(
        name='after the standby')
    done = rollback(host_env)
    assert (f'copy:          incremental: standby (promoted in place, '
            f'not copied) as of {position.position_at} + 1 journal '
            'entries') in done.stdout
    conn = sqlite3.connect(device.live)
    names = dict(conn.execute('SELECT asset_id, name FROM assets'))
    conn.close()
    assert names[device.asset_ids[0]] == 'replicated'
    assert names[device.asset_ids[1]] == 'after the standby'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_an_incremental_rollback_counts_each_table_once(data_dir, settings):
    """What stays O(rows) on PostgreSQL is one count per table in the
    build's snapshot (the verify phase's expectation and the cutover
    accounting both use it) and the proof's pass: the source phase and
    the cutover summary do not count again (at 1,000,000 rows each
    count is a quarter of a second)."""
    device = seed_device(settings, n_assets=10)
    Asset.objects.using('postgres').filter(pk=device.asset_ids[0]).update(
        name='changed on postgres')
    seen: list[str] = []

    def record(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    def watch(sender, connection, **kwargs):
        # Every PostgreSQL session of the run, other threads' included.
        if connection.alias == 'postgres' \
                and record not in connection.execute_wrappers:
            connection.execute_wrappers.append(record)

    watch(None, connections['postgres'])
    connection_created.connect(watch)
    try:
        call_command('rollback_migration', '--emergency', '--yes',
                     stdout=io.StringIO(), stderr=io.StringIO())
    finally:
        connection_created.disconnect(watch)
        connections['postgres'].execute_wrappers.remove(record)
    counts = [sql for sql in seen
              if 'COUNT(*)' in sql and 'FROM "assets"' in sql]
    assert len(counts) == 1, counts
    conn = sqlite3.connect(device.live)
    names = dict(conn.execute('SELECT asset_id, name FROM assets'))
    conn.close()
    assert names[device.asset_ids[0]] == 'changed on postgres'


@pytest.mark.django_db(databases=ALL, transaction=True)
@pytest.mark.parametrize(('damage', 'reason'), [
    ('missing', 'is missing'),
    ('changed', 'changed since the switch'),
])
def test_a_missing_or_changed_cutover_file_means_the_full_copy(
        damage, reason, data_dir, settings, host_env):
    device = seed_device(settings, n_assets=5)
    Asset.objects.using('postgres').filter(pk=device.asset_ids[0]).update(
        name='on pg')
    cut = window_standby.cutover_path(data_dir)
    if damage == 'missing':
        cut.unlink()
    else:
        with open(cut, 'ab') as fh:     # still opens; not what was taken
            fh.write(b'\0' * 16)
    done = rollback(host_env)
    assert 'copy:          full: no standby; the cutover file' in \
        done.stdout
    assert reason in done.stdout
    assert scratch_files(device.live) == []


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_base_that_reads_back_wrong_falls_back_to_the_full_copy(
        data_dir, settings, host_env):
    """A standby that mangles what is written into it (a trigger planted
    in the file): the changed keys do not read back equal, so the full
    copy is taken, with a warning; the result is PostgreSQL's."""
    device = seed_device(settings, n_assets=5)
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    conn = sqlite3.connect(window_standby.standby_path(data_dir))
    conn.execute("CREATE TRIGGER mangle AFTER INSERT ON assets BEGIN "
                 "UPDATE assets SET name = 'mangled' WHERE asset_id = "
                 "NEW.asset_id; END")
    conn.commit()
    conn.close()
    Asset.objects.using('postgres').filter(pk=device.asset_ids[0]).update(
        name='right')
    done = rollback(host_env)
    assert 'copy:          full: 1 changed key(s) did not read back ' \
        'equal' in done.stdout
    assert 'anthias_app.Asset pk=' in done.stdout + done.stderr
    conn = sqlite3.connect(device.live)
    names = dict(conn.execute('SELECT asset_id, name FROM assets'))
    triggers = conn.execute("SELECT count(*) FROM sqlite_master WHERE "
                            "type = 'trigger'").fetchone()[0]
    conn.close()
    assert names[device.asset_ids[0]] == 'right'
    assert triggers == 0


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_standby_whose_position_is_newer_than_its_rows_is_caught(
        data_dir, settings, host_env):
    """The standby applied 50 updates, then its rows went back to the old
    values while its position stayed (edited by hand, or a db/-wal pair
    restored torn): the keys it applied are re-read against PostgreSQL,
    so the full copy is taken and the result is PostgreSQL's (it said
    "data loss: none (proven)" with 50 stale rows)."""
    device = seed_device(settings, n_assets=60)
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    stale = device.asset_ids[:50]
    Asset.objects.using('postgres').filter(pk__in=stale).update(
        name='new on PostgreSQL')
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    conn = sqlite3.connect(window_standby.standby_path(data_dir))
    with conn:
        marks = ','.join('?' * len(stale))
        conn.execute(f"UPDATE assets SET name = 'stale' WHERE asset_id IN "
                     f"({marks})", stale)
    conn.close()
    Asset.objects.using('postgres').filter(pk=device.asset_ids[55]).update(
        name='in the tail')
    done = rollback(host_env)
    assert 'copy:          full: 50 changed key(s) did not read back ' \
        'equal' in done.stdout, done.stdout
    assert 'data loss: none (proven' in done.stdout.splitlines()[-1]
    conn = sqlite3.connect(device.live)
    names = dict(conn.execute('SELECT asset_id, name FROM assets'))
    conn.close()
    assert {names[pk] for pk in stale} == {'new on PostgreSQL'}
    assert names[device.asset_ids[55]] == 'in the tail'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_migration_applied_on_postgres_means_the_full_copy(
        data_dir, settings, host_env):
    device = seed_device(settings, n_assets=5)
    fake = "app = 'sessions' AND name = '9999_applied_on_pg'"
    with connections['postgres'].cursor() as cursor:
        cursor.execute("INSERT INTO django_migrations (app, name, applied) "
                       "VALUES ('sessions', '9999_applied_on_pg', now())")
    Asset.objects.using('postgres').filter(pk=device.asset_ids[0]).update(
        name='on pg')
    try:
        done = run_manage(host_env, 'rollback_migration', '--emergency')
    finally:
        # flush() leaves django_migrations alone: the next tests' backups
        # would carry the fake migration.
        with connections['postgres'].cursor() as cursor:
            cursor.execute(f'DELETE FROM django_migrations WHERE {fake}')
        connections['sqlite'].close()
        with connections['sqlite'].cursor() as cursor:
            cursor.execute(f'DELETE FROM django_migrations WHERE {fake}')
    assert 'copy:          full: migrations were applied on PostgreSQL ' \
        'since the base was taken (sessions.9999_applied_on_pg)' in \
        done.stdout, done.stdout + done.stderr


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_forced_switch_never_makes_the_cutover_file_a_base(
        data_dir, settings, host_env):
    """--force skipped the check that SQLite held PostgreSQL's rows: a
    value that differed at the switch (same counts) must not come back
    from the cutover file, neither through the rollback nor through a
    standby bootstrapped from it."""
    device = seed_device(settings, n_assets=5)
    switch.switch_profile('sqlite', restart=False)
    window_journal.end_window('postgres')
    Asset.objects.using('postgres').filter(pk=device.asset_ids[0]).update(
        name='only on postgres')
    switch.switch_profile('postgres', force=True, restart=False)
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    position = window_standby.read_position(
        window_standby.standby_path(data_dir))
    assert position.started_from == 'full copy'
    window_standby.standby_path(data_dir).unlink()
    # The prompt's facts follow the build's rules (they once drifted).
    facts = preview.preview(rollback_state.RollbackOptions())
    assert facts.build.startswith('full copy of '), facts.build
    done = rollback(host_env)
    assert 'copy:          full: no standby; the switch was forced' in \
        done.stdout
    conn = sqlite3.connect(device.live)
    names = dict(conn.execute('SELECT asset_id, name FROM assets'))
    conn.close()
    assert names[device.asset_ids[0]] == 'only on postgres'
