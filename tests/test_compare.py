import datetime as dt
import hashlib
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback import compare, events, models_graph, profiles
from anthias_rollback.compare import algorithms, orchestrator, streams
from anthias_rollback.engines import digests
from anthias_rollback.exceptions import (
    CompareError,
    DeadlineError,
    SchemaMismatchError,
)
from tests.helpers.compare import asset_copies, build_assets, fill_both
from tests.kitchensink.models import Item, ItemDetail, Tag

BOTH = ['sqlite', 'postgres']


def by_label(report):
    return {m.label: m for m in report.models}


@pytest.mark.parametrize('deep', [False, True])
@pytest.mark.django_db(databases=BOTH)
def test_identical_hard_values_are_100_percent(deep):
    fill_both('sqlite', 'postgres')
    report = compare.compare_aliases('sqlite', 'postgres', deep=deep)
    models = by_label(report)
    assert report.complete and report.ok, [
        m.to_dict() for m in report.models if not m.ok]
    assert report.integrity == 100.0
    assert report.differences == 0
    assert models['anthias_app.Asset'].identical == 40
    assert models['kitchensink.Item'].identical == 8
    assert models['kitchensink.Item_tags'].identical == 6
    assert models['kitchensink.Tag'].identical == 4
    assert report.at_risk_keys() == compare.AtRiskReport({}, {})


def change_rows_on_postgres(assets):
    """One change of each kind; returns what the report must say."""
    pg = 'postgres'
    a_name, a_gone, a_dt = (assets[3].asset_id, assets[4].asset_id,
                            assets[5].asset_id)
    Asset.objects.using(pg).filter(pk=a_name).update(name='changed')
    Asset.objects.using(pg).filter(pk=a_gone).delete()
    new = asset_copies(assets[:1], 1)[0]
    new.asset_id = 'added-on-postgres'
    new.save(using=pg, force_insert=True)
    moved = Asset.objects.using(pg).get(pk=a_dt)
    Asset.objects.using(pg).filter(pk=a_dt).update(
        start_date=moved.start_date + dt.timedelta(microseconds=1))
    item = Item.objects.using(pg).get(pk=4)
    item.data['a']['y'][1] = 2.6
    Item.objects.using(pg).filter(pk=4).update(data=item.data)
    flag = Item.objects.using(pg).get(pk=5).flag
    Item.objects.using(pg).filter(pk=5).update(flag=not flag)
    tag = Tag.objects.using(pg).order_by('pk')[2]
    Tag.objects.using(pg).filter(pk=tag.pk).update(label='relabelled')
    return {
        'anthias_app.Asset': {
            'missing': [a_gone], 'extra': ['added-on-postgres'],
            'changed': {a_name: ('name',), a_dt: ('start_date',)}},
        'kitchensink.Item': {'missing': [], 'extra': [],
                             'changed': {4: ('data',), 5: ('flag',)}},
        'kitchensink.Tag': {'missing': [], 'extra': [],
                            'changed': {tag.pk.hex: ('label',)}},
    }


@pytest.mark.parametrize('deep', [False, True])
@pytest.mark.django_db(databases=BOTH)
def test_changes_are_named_exactly(deep):
    assets = fill_both('sqlite', 'postgres', n_assets=60)
    expected = change_rows_on_postgres(assets)
    report = compare.compare_aliases('sqlite', 'postgres', deep=deep)
    models = by_label(report)
    assert not report.ok and report.complete
    for label, want in expected.items():
        got = models[label]
        assert list(got.missing_keys) == want['missing'], label
        assert list(got.extra_keys) == want['extra'], label
        assert dict(got.changed) == want['changed'], label
    others = [m for m in report.models if m.label not in expected]
    assert all(m.ok for m in others)
    asset = models['anthias_app.Asset']
    assert (asset.left_rows, asset.right_rows) == (60, 60)
    assert asset.identical == 57
    assert asset.integrity == pytest.approx(100 * 57 / 60)
    at_risk = report.at_risk_keys()
    assert set(at_risk.keys['anthias_app.Asset']) == {
        'added-on-postgres', *expected['anthias_app.Asset']['changed']}
    assert set(at_risk.keys['kitchensink.Item']) == {4, 5}
    assert at_risk.resurrected == {'anthias_app.Asset': 1}


@pytest.mark.django_db(databases=BOTH)
def test_bisection_over_many_segments(monkeypatch):
    # Small segments: differences land in different segments and the
    # bisection must still name exactly them.
    monkeypatch.setattr(algorithms, 'SEGMENT_ROWS', 7)
    monkeypatch.setattr(streams, 'CHUNK_ROWS', 5)
    assets = fill_both('sqlite', 'postgres', n_assets=120)
    keys = sorted(a.asset_id for a in assets)
    changed = keys[::17]
    Asset.objects.using('postgres').filter(pk__in=changed).update(
        is_enabled=True, nocache=True, play_order=-1)
    report = compare.compare_aliases('sqlite', 'postgres',
                                     models=['anthias_app.Asset'])
    got = report.models[0]
    assert sorted(pk for pk, _ in got.changed) == changed
    assert all('play_order' in names for _, names in got.changed)
    assert got.identical == 120 - len(changed)
    assert got.missing_keys == () and got.extra_keys == ()


@pytest.mark.django_db(databases=BOTH)
def test_find_at_risk_keys_lists_extra_and_changed_rows():
    assets = fill_both('sqlite', 'postgres')
    Asset.objects.using('sqlite').filter(pk=assets[7].asset_id).delete()
    Asset.objects.using('postgres').filter(pk=assets[8].asset_id).update(
        md5='x')
    Asset.objects.using('postgres').filter(pk=assets[9].asset_id).delete()
    found = compare.find_at_risk_keys('sqlite', 'postgres')
    assert set(found.keys) == {'anthias_app.Asset'}
    assert set(found.keys['anthias_app.Asset']) == {assets[7].asset_id,
                                                    assets[8].asset_id}
    assert len(found.keys['anthias_app.Asset']) == 2
    assert found.resurrected == {'anthias_app.Asset': 1}


@pytest.mark.django_db(databases=BOTH)
def test_sample_is_clamped_and_noted():
    fill_both('sqlite', 'postgres')
    report = compare.compare_aliases('sqlite', 'postgres', sample_size=20,
                                     models=['anthias_app.Asset',
                                             'kitchensink.Item'])
    models = by_label(report)
    assert models['anthias_app.Asset'].sampled == 20
    assert models['kitchensink.Item'].sampled == 8
    assert any('kitchensink.Item: sample size 20 is more than its 8 rows'
               in note for note in report.notes)
    assert report.ok


@pytest.mark.django_db(databases=BOTH)
def test_bad_numbers_and_unknown_model_raise():
    with pytest.raises(CompareError, match='sample size must be >= 0'):
        compare.compare_aliases('sqlite', 'postgres', sample_size=-1)
    with pytest.raises(CompareError, match='timeout must be > 0'):
        compare.compare_aliases('sqlite', 'postgres', timeout=-2)
    with pytest.raises(CompareError, match="unknown model 'nope.Nope'"):
        compare.compare_aliases('sqlite', 'postgres', models=['nope.Nope'])


@pytest.mark.django_db(databases=BOTH)
def test_model_missing_on_one_side_is_a_schema_error():
    # PostgreSQL DDL is transactional: the test's rollback restores it.
    with connections['postgres'].schema_editor() as editor:
        editor.delete_model(ItemDetail)
    with pytest.raises(SchemaMismatchError) as excinfo:
        compare.compare_aliases('sqlite', 'postgres')
    message = str(excinfo.value)
    assert 'kitchensink.ItemDetail' in message
    assert 'kitchensink_itemdetail is missing on postgres' in message


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_timeout_returns_partial_report():
    fill_both('sqlite', 'postgres')
    report = compare.compare_aliases('sqlite', 'postgres', timeout=1e-6)
    assert not report.complete
    assert report.stopped_reason.startswith('timeout after')
    assert report.not_compared
    with pytest.raises(DeadlineError):
        compare.find_at_risk_keys('sqlite', 'postgres', timeout=1e-6)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for suffix in ('', '-wal'):
        part = Path(str(path) + suffix)
        if part.exists():
            digest.update(part.read_bytes())
    return digest.hexdigest()


def postgres_write_activity() -> tuple:
    with connections['postgres'].cursor() as cursor:
        cursor.execute('SELECT pg_current_wal_lsn()')
        return cursor.fetchone()


@pytest.mark.parametrize('parallel', [False, True])
@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_read_only_snapshot_no_writes_no_locks_left(parallel):
    assets = fill_both('sqlite', 'postgres')
    sqlite_path = Path(connections['sqlite'].settings_dict['NAME'])
    connections['sqlite'].close()
    before_file = file_digest(sqlite_path)
    seen = {}

    def progress(event):
        if event.kind != events.MODEL_START or seen:
            return
        # Inside the comparison: both sides are read-only snapshots.
        with connections['postgres'].cursor() as cursor:
            cursor.execute('SHOW transaction_read_only')
            seen['pg_read_only'] = cursor.fetchone()[0]
            cursor.execute('SHOW transaction_isolation')
            seen['pg_isolation'] = cursor.fetchone()[0]
        with connections['sqlite'].cursor() as cursor:
            cursor.execute('PRAGMA query_only')
            seen['sqlite_query_only'] = cursor.fetchone()[0]
        # A reader never blocks a SQLite writer (no write lock taken).
        other = sqlite3.connect(sqlite_path, timeout=0.1)
        other.execute('BEGIN IMMEDIATE')
        other.execute('ROLLBACK')
        other.close()
        # A row committed elsewhere meanwhile is not seen: one snapshot.
        extra = asset_copies(assets[:1], 1)[0]
        extra.asset_id = 'committed-during-compare'
        extra.save(using=writer, force_insert=True)

    with profiles.temporary_alias(
            connections['postgres'].settings_dict) as writer:
        wal_before = postgres_write_activity()
        report = compare.compare_aliases('sqlite', 'postgres',
                                         progress=progress,
                                         parallel=parallel)
    if not parallel:
        assert seen == {'pg_read_only': 'on',
                        'pg_isolation': 'repeatable read',
                        'sqlite_query_only': 1}
    assert report.ok, [m.to_dict() for m in report.models if not m.ok]
    # The row committed during the run is there now, but was not compared.
    assert Asset.objects.using('postgres').filter(
        pk='committed-during-compare').exists()
    Asset.objects.using('postgres').filter(
        pk='committed-during-compare').delete()
    assert wal_before <= postgres_write_activity()
    # No locks left: both connections are back in autocommit, idle.
    assert connections['postgres'].get_autocommit()
    with connections['postgres'].cursor() as cursor:
        # (This query itself locks pg_locks and catalog views.)
        cursor.execute("SELECT count(*) FROM pg_locks WHERE pid = "
                       "pg_backend_pid() AND locktype = 'relation' AND "
                       "relation::regclass::text NOT LIKE 'pg\\_%'")
        assert cursor.fetchone()[0] == 0
    with connections['sqlite'].cursor() as cursor:
        cursor.execute('PRAGMA query_only')
        assert cursor.fetchone()[0] == 0
    connections['sqlite'].close()
    other = sqlite3.connect(sqlite_path, timeout=0.1)
    other.execute('BEGIN EXCLUSIVE')
    other.execute('ROLLBACK')
    other.close()
    assert file_digest(sqlite_path) == before_file


@pytest.mark.django_db(databases=BOTH)
def test_text_keys_in_bytewise_order_on_both_engines():
    assets = build_assets(12)
    Asset.objects.using('sqlite').bulk_create(asset_copies(assets, 0))
    Asset.objects.using('postgres').bulk_create(asset_copies(assets, 1))
    keys = {}
    for alias in BOTH:
        keys[alias] = [k for chunk, _ in compare.stream_canonical_rows(
            Asset, alias) for k in chunk]
    assert keys['sqlite'] == keys['postgres'] == sorted(
        a.asset_id for a in assets)


def test_checksum_is_engine_neutral():
    rows = [(1, 'é🎉', None, True, 1.5, '2024-01-01 00:00:00.000001')]
    assert compare.checksum_rows(rows) == compare.checksum_rows(list(rows))
    assert compare.checksum_rows(rows) != compare.checksum_rows(
        [(1, 'é🎉', None, 1, 1.5, '2024-01-01 00:00:00.000001')])


def test_check_sqlite_file(tmp_path):
    with pytest.raises(CompareError, match='does not exist'):
        compare.check_sqlite_file(tmp_path / 'missing.db')
    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    with pytest.raises(CompareError, match='is not a SQLite database'):
        compare.check_sqlite_file(text)
    good = tmp_path / 'good.db'
    sqlite3.connect(good).execute('CREATE TABLE t (x)').connection.close()
    compare.check_sqlite_file(good)


@pytest.mark.django_db(databases=BOTH)
def test_performance_report_times_both_sides():
    fill_both('sqlite', 'postgres')
    perf = compare.measure_query_performance(
        'sqlite', 'postgres', models=['anthias_app.Asset',
                                      'kitchensink.Item'],
        max_query_ms=60_000)
    queries = {(t.label, t.query) for t in perf.timings}
    assert ('anthias_app.Asset', 'count') in queries
    assert ('anthias_app.Asset', 'pk lookup') in queries
    assert ('kitchensink.Item', 'filter category') in queries
    assert ('kitchensink.Item', 'order by pk desc limit 20') in queries
    assert perf.ok and all(t.left_ms > 0 and t.right_ms > 0
                           for t in perf.timings)


@pytest.mark.django_db(databases=BOTH)
def test_engine_fast_paths_equal_the_field_converters():
    assets = fill_both('sqlite', 'postgres')
    odd = [a.asset_id for a in assets[:3]]
    # Valid but unusual SQLite storage: must take the converters' path.
    with connections['sqlite'].cursor() as cursor:
        cursor.execute("UPDATE assets SET start_date = replace(start_date, "
                       "' ', 'T') || '+00:00', play_time_from = '08:00', "
                       "metadata = ' ' || metadata || ' ' "
                       "WHERE asset_id = %s", [odd[0]])
        cursor.execute("UPDATE assets SET end_date = substr(end_date, 1, "
                       "19) WHERE asset_id = %s", [odd[1]])
        cursor.execute("UPDATE assets SET metadata = '\"a string\"' "
                       "WHERE asset_id = %s", [odd[2]])
    Asset.objects.using('postgres').filter(pk=odd[0]).update(
        play_time_from=dt.time(8, 0))
    Asset.objects.using('postgres').filter(pk=odd[1]).update(
        end_date=Asset.objects.using('sqlite').get(pk=odd[1]).end_date)
    Asset.objects.using('postgres').filter(pk=odd[2]).update(
        metadata='a string')
    for model in models_graph.plan_models().models:
        for alias in BOTH:
            fast, slow = (
                [row for _, rows in compare.stream_canonical_rows(
                    model, alias, fast=flag) for row in rows]
                for flag in (True, False))
            assert fast == slow, (model._meta.label, alias)
    report = compare.compare_aliases('sqlite', 'postgres')
    assert report.ok, [m.to_dict() for m in report.models if not m.ok]


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_reader_process_gives_the_same_report():
    assets = fill_both('sqlite', 'postgres', n_assets=80)
    expected = change_rows_on_postgres(assets)
    reports = [compare.compare_aliases('sqlite', 'postgres',
                                       parallel=parallel)
               for parallel in (True, False)]
    assert [m.to_dict() | {'seconds': 0} for m in reports[0].models] == [
        m.to_dict() | {'seconds': 0} for m in reports[1].models]
    asset = by_label(reports[0])['anthias_app.Asset']
    assert dict(asset.changed) == expected['anthias_app.Asset']['changed']


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_parent_connections_survive_parallel_compare():
    """Forked readers must never close the parent's sockets: the
    rollback keeps using its PostgreSQL session after comparing."""
    from tests.helpers.factories import AssetFactory

    AssetFactory.create_batch(5)
    with connections['postgres'].cursor() as c:
        c.execute('SELECT pg_backend_pid()')
        pid = c.fetchone()[0]
    with connections['sqlite'].cursor() as c:
        c.execute('SELECT 1')
    compare.compare_aliases('sqlite', 'postgres', parallel=True)
    with connections['postgres'].cursor() as c:
        c.execute('SELECT pg_backend_pid()')
        assert c.fetchone()[0] == pid
    with connections['sqlite'].cursor() as c:
        c.execute('SELECT count(*) FROM assets')
        assert c.fetchone()[0] == 5


@pytest.mark.django_db(databases=BOTH)
def test_digest_forms_agree_on_identical_hard_values(monkeypatch):
    # Small buckets: every bucket's digests must agree across engines,
    # so nothing is re-read (unicode, emoji, NULLs, JSON key order and
    # escapes, microseconds, Decimals, UUIDs, binary...).
    monkeypatch.setattr(orchestrator, 'BUCKET_ROWS', 3)
    fill_both('sqlite', 'postgres', n_assets=30)
    report = compare.compare_aliases('sqlite', 'postgres')
    assert report.ok, [m.to_dict() for m in report.models if not m.ok]
    assert {m.label: m.rechecked for m in report.models
            if m.rechecked} == {}
    assert all(m.identical == m.left_rows for m in report.models)


def test_mismatched_ranges_merge_neighbours():
    same, other = (2, b'a'), (2, b'b')
    bounds = ['b', 'd', 'f']
    # Buckets: (-inf, b) [b, d) [d, f) [f, +inf)
    assert compare.mismatched_ranges(
        bounds, [same, same, same, same], [same, same, same, same]) == (
        8, [])
    assert compare.mismatched_ranges(
        bounds, [same, same, same, same], [other, same, other, other]) == (
        2, [(None, 'b'), ('d', None)])
    assert compare.mismatched_ranges(
        bounds, [same, same, (0, b''), same], [same, other, other, same]) \
        == (4, [('b', 'f')])
    assert compare.mismatched_ranges([], [same], [(3, b'a')]) == (
        0, [(None, None)])


@pytest.mark.parametrize('parallel', [False, True])
@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_buckets_name_exactly_what_deep_names(monkeypatch, parallel):
    """Many small buckets, differences at both ends and in the middle,
    keys before the first and after the last bound: the checksum mode
    re-reads only mismatching buckets and reports exactly what the
    row-by-row mode reports."""
    monkeypatch.setattr(orchestrator, 'BUCKET_ROWS', 4)
    assets = fill_both('sqlite', 'postgres', n_assets=80)
    expected = change_rows_on_postgres(assets)
    keys = sorted(a.asset_id for a in assets)
    Asset.objects.using('postgres').filter(pk__in=keys[:5]).delete()
    Asset.objects.using('sqlite').filter(pk=keys[-1]).delete()
    first = asset_copies(assets[:1], 1)[0]
    first.asset_id = '0000-before-every-key'
    first.save(using='postgres', force_insert=True)
    report = compare.compare_aliases('sqlite', 'postgres', sample_size=30,
                                     parallel=parallel)
    deep = compare.compare_aliases('sqlite', 'postgres', deep=True)
    fields = ('left_rows', 'right_rows', 'compared', 'identical',
              'missing_keys', 'extra_keys', 'changed')
    for got, want in zip(report.models, deep.models, strict=True):
        assert [getattr(got, f) for f in fields] == [
            getattr(want, f) for f in fields], got.label
    models = by_label(report)
    asset = models['anthias_app.Asset']
    assert dict(asset.changed) == expected['anthias_app.Asset']['changed']
    assert set(asset.missing_keys) == {*keys[:5], assets[4].asset_id}
    assert set(asset.extra_keys) == {'added-on-postgres', keys[-1],
                                     '0000-before-every-key'}
    # Only the buckets holding a difference were read again: 11 differing
    # keys touch at most 11 of the ~20 buckets (each holds its bound key).
    assert 0 < asset.rechecked < asset.compared
    assert asset.sampled == 30
    assert models['kitchensink.Tag'].rechecked > 0
    assert all(m.rechecked == 0 for m in report.models
               if m.label not in expected)


@pytest.mark.django_db(databases=BOTH)
def test_empty_side_and_integer_keys_by_buckets(monkeypatch):
    monkeypatch.setattr(orchestrator, 'BUCKET_ROWS', 2)
    fill_both('sqlite', 'postgres')
    Item.objects.using('postgres').filter(pk__gt=2).delete()
    ItemDetail.objects.using('sqlite').all().delete()
    report = compare.compare_aliases('sqlite', 'postgres')
    models = by_label(report)
    item = models['kitchensink.Item']
    assert item.missing_keys == tuple(range(3, 9))
    assert item.identical == 2
    detail = models['kitchensink.ItemDetail']
    assert detail.left_rows == 0 and detail.identical == 0
    assert len(detail.extra_keys) == detail.right_rows > 0


def _terminate_compare_backends() -> int:
    with profiles.temporary_alias(
            connections['postgres'].settings_dict) as other, \
            connections[other].cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE '%%anthias_read_%%' "
            "AND pid <> pg_backend_pid()")
        return cursor.fetchone()[0]


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_postgres_reader_killed_mid_checksum_is_a_clean_error(monkeypatch):
    """The PostgreSQL reader's session is terminated while it hashes
    buckets: one clear CompareError, readers gone, the parent's
    connections still usable."""
    monkeypatch.setattr(streams, 'CHUNK_ROWS', 10)
    monkeypatch.setattr(orchestrator, 'BUCKET_ROWS', 8)
    # In-engine digests: one statement per heap block, so the kill lands
    # between two of them.
    monkeypatch.setattr(digests, 'POSTGRES_BATCH_BLOCKS', 1)
    monkeypatch.setenv('ANTHIAS_ROLLBACK_PAUSE_AT', 'compare:digest-chunk:0.2')
    fill_both('sqlite', 'postgres', n_assets=80)
    killed = []

    def progress(event):
        if event.kind == events.BATCH and not killed:
            killed.append(_terminate_compare_backends())

    with pytest.raises(CompareError) as excinfo:
        compare.compare_aliases('sqlite', 'postgres', parallel=True,
                                models=['anthias_app.Asset'],
                                progress=progress)
    assert killed == [1]
    message = str(excinfo.value)
    assert message.startswith('anthias_app.Asset: reading failed:')
    assert '\n' not in message
    assert not [p for p in multiprocessing.active_children()
                if p.name.startswith('anthias-compare-')]
    assert Asset.objects.using('postgres').count() == 80


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_sqlite_writer_commits_during_checksum_unblocked_and_unseen(
        monkeypatch):
    monkeypatch.setattr(streams, 'CHUNK_ROWS', 10)
    monkeypatch.setattr(orchestrator, 'BUCKET_ROWS', 8)
    monkeypatch.setenv('ANTHIAS_ROLLBACK_PAUSE_AT', 'compare:digest-chunk:0.1')
    assets = fill_both('sqlite', 'postgres', n_assets=80)
    sqlite_path = connections['sqlite'].settings_dict['NAME']
    wrote = []

    def progress(event):
        if event.kind != events.BATCH or wrote:
            return
        # The app's writer, mid-comparison: never blocked (short busy
        # timeout), and its rows are not part of this comparison.
        writer = sqlite3.connect(sqlite_path, timeout=0.5)
        writer.execute('UPDATE assets SET name = ? WHERE asset_id = ?',
                       ('written meanwhile', assets[-1].asset_id))
        writer.execute('DELETE FROM assets WHERE asset_id = ?',
                       (assets[0].asset_id,))
        writer.commit()
        writer.close()
        wrote.append(True)

    report = compare.compare_aliases('sqlite', 'postgres', parallel=True,
                                     models=['anthias_app.Asset'],
                                     progress=progress)
    assert wrote == [True]
    assert report.ok, report.models[0].to_dict()
    after = compare.compare_aliases('sqlite', 'postgres',
                                    models=['anthias_app.Asset'])
    asset = after.models[0]
    assert asset.missing_keys == ()
    assert asset.extra_keys == (assets[0].asset_id,)
    assert [pk for pk, _ in asset.changed] == [assets[-1].asset_id]
