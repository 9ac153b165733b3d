"""The change journal and the write fence on a real PostgreSQL server,
with real second sessions: another role, a REPEATABLE READ transaction
that began before the fence, a writer that holds its transaction open,
a session with triggers disabled."""
import threading
import time

import psycopg2
import pytest
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback.engines import postgres_journal as pj
from tests.helpers.factories import AssetFactory
from tests.helpers.pg import pg_session

PG = ['postgres']




@pytest.fixture
def journaled(transactional_db):
    """Asset on PostgreSQL with the journal installed; removed after."""
    pj_models = [Asset]
    with connections['postgres'].cursor():
        pass
    from django.db import transaction
    with transaction.atomic(using='postgres'):
        pj.postgres_install_journal('postgres', pj_models,
                                    {'rows': {}}, forced=False)
    yield
    pj.postgres_remove_journal('postgres', [Asset._meta.db_table])


def make_asset(name='x', **kw):
    return AssetFactory.build(name=name, **kw)


def save_pg(asset):
    asset.save(using='postgres')
    return asset


@pytest.mark.django_db(databases=PG, transaction=True)
def test_orm_writes_are_journaled_with_key_and_operation(journaled):
    before = snapshot_now()
    a = save_pg(make_asset('one'))
    a.name = 'two'
    a.save(using='postgres')
    b = save_pg(make_asset('three'))
    Asset.objects.using('postgres').filter(pk=b.pk).delete()
    changes = pj.postgres_changes_after('postgres', before)
    assert [(c.table, c.op, c.pk) for c in changes] == [
        ('assets', 'I', a.pk), ('assets', 'U', a.pk),
        ('assets', 'I', b.pk), ('assets', 'D', b.pk)]
    net = pj.postgres_journal_net('postgres')['assets']
    assert (net['inserted'], net['deleted'], net['updated']) == (2, 1, 1)


def snapshot_now():
    with connections['postgres'].cursor() as cursor:
        cursor.execute('SELECT pg_current_snapshot()::text')
        return cursor.fetchone()[0]


@pytest.mark.django_db(databases=PG, transaction=True)
def test_fence_refuses_every_session_and_role_at_once(journaled):
    s = connections['postgres'].settings_dict
    other = pg_session()
    other.autocommit = True
    with other.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS anthias_other")
        cur.execute("CREATE ROLE anthias_other LOGIN PASSWORD 'pw'")
        cur.execute('GRANT ALL ON assets TO anthias_other')
    second_role = pg_session('anthias_other', 'pw')
    # A REPEATABLE READ transaction that began (and read) before the
    # fence: a flag row would be invisible to its snapshot.
    existing = save_pg(make_asset('existing'))
    early = pg_session()
    early.set_session(isolation_level='REPEATABLE READ')
    with early.cursor() as cur:
        cur.execute('SELECT count(*) FROM assets')
        assert cur.fetchone()[0] == 1
    try:
        pj.postgres_raise_fence('postgres')
        assert pj.postgres_fence_state('postgres') == 'up'
        with pytest.raises(Exception, match='fenced'):
            save_pg(make_asset('after fence'))
        with early.cursor() as cur, pytest.raises(
                psycopg2.Error, match='fenced'):
            cur.execute("UPDATE assets SET name = 'early' WHERE "
                        'asset_id = %s', [existing.pk])
        with second_role.cursor() as cur, pytest.raises(
                psycopg2.Error, match='fenced'):
            cur.execute('DELETE FROM assets WHERE asset_id = %s',
                        [existing.pk])
        with second_role.cursor() as cur, pytest.raises(
                psycopg2.Error, match='fenced'):
            second_role.rollback()
            cur.execute('TRUNCATE assets')
    finally:
        for conn in (early, second_role):
            conn.close()
        pj.postgres_lower_fence('postgres')
        with other.cursor() as cur:
            cur.execute('REVOKE ALL ON assets FROM anthias_other')
            cur.execute('DROP ROLE anthias_other')
        other.close()
    assert Asset.objects.using('postgres').get(pk=existing.pk).name == \
        'existing'
    assert s['NAME']


@pytest.mark.django_db(databases=PG, transaction=True)
def test_wait_for_writers_waits_for_an_open_writing_transaction(journaled):
    row = save_pg(make_asset('before'))
    writer = pg_session()
    with writer.cursor() as cur:   # a transaction left open after writing
        cur.execute("UPDATE assets SET name = 'open' WHERE asset_id = %s",
                    [row.pk])
    try:
        pj.postgres_raise_fence('postgres')
        open_writers = pj.postgres_open_writers('postgres')
        assert [w['pid'] for w in open_writers] == [
            writer.get_backend_pid()]
        started = time.monotonic()
        assert pj.postgres_wait_for_writers('postgres', 300) is False
        assert time.monotonic() - started < 5
        threading.Timer(0.5, writer.commit).start()
        assert pj.postgres_wait_for_writers('postgres', 10_000) is True
    finally:
        writer.close()
        pj.postgres_lower_fence('postgres')
    # The write committed before the fence was fully taken: journaled.
    assert Asset.objects.using('postgres').get(pk=row.pk).name == 'open'
    assert [c.op for c in pj.postgres_changes_after('postgres', '1:1:')
            if c.pk == row.pk] == ['I', 'U']


@pytest.mark.django_db(databases=PG, transaction=True)
def test_a_write_with_triggers_disabled_is_found_by_xmin(journaled):
    kept = save_pg(make_asset('kept'))
    snapshot = snapshot_now()
    sneaky = pg_session()
    try:
        with sneaky.cursor() as cur:
            cur.execute("SET session_replication_role = replica")
            cur.execute("UPDATE assets SET name = 'sneaky' WHERE "
                        'asset_id = %s', [kept.pk])
        sneaky.commit()
    finally:
        sneaky.close()
    assert pj.postgres_changes_after('postgres', snapshot) == []
    rows = Asset.objects.using('postgres').count()
    assert pj.postgres_table_after(
        'postgres', 'assets', 'asset_id', snapshot) == (rows, [kept.pk])
    # Rows written before the snapshot are not named (the age() cut).
    assert pj.postgres_table_after(
        'postgres', 'assets', 'asset_id', snapshot_now()) == (rows, [])


@pytest.mark.django_db(databases=PG, transaction=True)
def test_remove_journal_leaves_tables_writable_and_unjournaled(journaled):
    pj.postgres_raise_fence('postgres')
    pj.postgres_remove_journal('postgres', [Asset._meta.db_table])
    save_pg(make_asset('free again'))
    assert not pj.postgres_journal_installed('postgres')
    assert pj.postgres_journaled_tables('postgres') == []
    # the fixture's removal runs again: idempotent


@pytest.mark.django_db(databases=PG, transaction=True)
def test_an_imported_snapshot_reads_what_the_exporter_reads():
    """The incremental build counts in a second session that imports its
    snapshot: a delete committed after the export is invisible there too,
    and the import fails once the exporting transaction is over."""
    kept, gone = save_pg(make_asset('kept')), save_pg(make_asset('gone'))

    def count_in(exported):
        try:
            with pj.postgres_imported_snapshot('postgres', exported):
                return Asset.objects.using('postgres').count()
        finally:
            connections['postgres'].close()

    def in_thread(exported):
        found = {}

        def run():
            try:
                found['count'] = count_in(exported)
            except Exception as err:   # noqa: BLE001  # reported below
                found['error'] = err
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return found

    with pj.postgres_snapshot_transaction('postgres'):
        exported = pj.postgres_export_snapshot('postgres')
        other = pg_session()
        try:
            with other.cursor() as cur:
                cur.execute('DELETE FROM assets WHERE asset_id = %s',
                            [gone.pk])
            other.commit()
        finally:
            other.close()
        assert in_thread(exported) == {'count': 2}
    assert Asset.objects.using('postgres').count() == 1
    assert kept.pk in set(Asset.objects.using('postgres').values_list(
        'pk', flat=True))
    late = in_thread(exported)
    assert 'count' not in late and 'snapshot' in str(late['error'])
