"""window/journal.py: tables created while the window is open (an
upgrade's `migrate` on the device's PostgreSQL) are journaled and fenced
from the statement that creates them, and a rollback keeps their rows."""
import pytest
from django.db import DatabaseError, connections

from anthias_app.models import Asset
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.window import journal as window_journal
from tests.conftest import run_manage
from tests.helpers.pg import pg_session
from tests.helpers.rollback import seed_device
from tests.kitchensink.models import Category, Item, ItemDetail

ALL = ['default', 'sqlite', 'postgres']


def recreate_mid_window(model) -> None:
    """The table appears during the window, made by Django's own schema
    editor (the DDL `migrate` runs) in another session than the one that
    opened the window."""
    table = model._meta.db_table
    admin = pg_session()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP TABLE {table}')
    admin.close()
    assert table not in pj.postgres_trigger_tables('postgres')
    with connections['postgres'].schema_editor() as editor:
        editor.create_model(model)


def journal_tables() -> set[str]:
    with connections['postgres'].cursor() as cursor:
        cursor.execute(f'SELECT DISTINCT tbl FROM {pj.JOURNAL}')
        return {row[0] for row in cursor.fetchall()}


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_table_created_in_the_window_is_journaled_fenced_and_kept(
        data_dir, settings, host_env):
    seed_device(settings)
    recreate_mid_window(ItemDetail)
    table = ItemDetail._meta.db_table
    state = window_journal.window_state('postgres')
    assert table in state.tables and state.problems == ()
    category = Category.objects.using('postgres').create(name='c')
    item = Item.objects.using('postgres').create(
        title='made after the upgrade', category=category)
    ItemDetail.objects.using('postgres').create(item=item, notes='new')
    assert table in journal_tables()
    connections['sqlite'].close()
    done = run_manage(host_env, 'rollback_migration', '--emergency',
                      '--yes')
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'data loss: none (proven' in done.stdout.splitlines()[-1]
    assert ItemDetail.objects.using('sqlite').get(
        item_id=item.pk).notes == 'new'
    # A stale process writing to the new table is refused, as to any.
    connections['postgres'].close()
    with pytest.raises(DatabaseError, match='fenced'):
        ItemDetail.objects.using('postgres').filter(
            item_id=item.pk).update(notes='stale')


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_ending_the_window_removes_the_watch(data_dir, settings, host_env):
    seed_device(settings)
    done = run_manage(host_env, 'end_rollback_window')
    assert done.returncode == 0, done.stdout + done.stderr
    with connections['postgres'].cursor() as cursor:
        cursor.execute('SELECT count(*) FROM pg_event_trigger WHERE '
                       'evtname = %s', [pj.WATCH])
        assert cursor.fetchone()[0] == 0
    # A table made now gets no trigger.
    recreate_mid_window(ItemDetail)
    assert pj.postgres_trigger_tables('postgres') == []


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_proof_is_complete_past_any_cap(data_dir, settings):
    """15,001 journaled writes and 1,500 made with the triggers off
    after a copy's snapshot: every one is named (the journal read stopped
    at 10,000 and the row versions at 1,000 without saying so, and
    export_unapplied_writes exported a fixture short of 5,001 rows)."""
    seed_device(settings, n_assets=3)
    with pj.postgres_snapshot_transaction('postgres') as snapshot:
        pass
    Asset.objects.using('postgres').bulk_create(
        [Asset(asset_id=f'j{n}', name='n') for n in range(15001)],
        batch_size=5000)
    with connections['postgres'].cursor() as cursor:
        cursor.execute('SET session_replication_role = replica')
    try:
        Asset.objects.using('postgres').bulk_create(
            [Asset(asset_id=f'x{n}', name='n') for n in range(1500)])
    finally:
        with connections['postgres'].cursor() as cursor:
            cursor.execute('RESET session_replication_role')
    proof = window_journal.prove_copy('postgres', snapshot,
                                      {'anthias_app.Asset': 3})
    journaled = {w.pk for w in proof.lost if w.operation == 'insert'}
    bypassed = {w.pk for w in proof.lost if w.operation == 'write'}
    assert len(journaled) == 15001 and len(bypassed) == 1500
    assert proof.count_differences == {'anthias_app.Asset': (3, 16504)}
