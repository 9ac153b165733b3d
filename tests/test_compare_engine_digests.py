"""Checksum mode's bucket digests computed inside each engine
(engines/digests.py): equal data gives equal digests on SQLite and
PostgreSQL without the Python per-row path, every changed value is found
exactly, a rendering difference only costs a re-read."""
import collections
import contextlib
import datetime as dt
import sqlite3
import uuid

import pytest
from django.db import connections, models
from django.test.utils import isolate_apps

from anthias_app.models import Asset
from anthias_rollback import engines
from anthias_rollback.compare import orchestrator
from anthias_rollback.compare.readers import LocalReader
from anthias_rollback.engines import digests
from tests.helpers.compare import fill_both
from tests.kitchensink.models import Item, Tag

BOTH = ['sqlite', 'postgres']
UTC = dt.UTC


@pytest.fixture
def sample_model():
    """A model with one column of each type that has an in-engine form,
    its table created on both aliases for the test."""
    with isolate_apps('tests.kitchensink'):
        class Sample(models.Model):
            name = models.CharField(max_length=50, null=True)
            body = models.TextField(blank=True)
            flag = models.BooleanField(default=False)
            at = models.DateTimeField(null=True)
            day = models.DateField(null=True)
            clock = models.TimeField(null=True)
            ref = models.UUIDField(null=True)
            blob = models.BinaryField(null=True)
            data = models.JSONField(null=True)
            count = models.IntegerField(null=True)
            tag = models.ForeignKey(Tag, null=True, on_delete=models.CASCADE,
                                    db_constraint=False)

            class Meta:
                app_label = 'kitchensink'
                db_table = 'test_engine_digest_sample'

        with tables_on_both(Sample):
            yield Sample


@contextlib.contextmanager
def tables_on_both(model):
    """*model*'s table on both aliases while the block runs."""
    for alias in BOTH:
        with connections[alias].schema_editor() as editor:
            editor.create_model(model)
    try:
        yield
    finally:
        for alias in BOTH:
            with connections[alias].schema_editor() as editor:
                editor.delete_model(model)


def sample_rows(model, n=40):
    rows = []
    for i in range(1, n + 1):
        rows.append(model(
            id=i, name=None if i == 1 else ('' if i == 2 else f'név {i} 🎉'),
            body='tab\tand\nnewline' * (i % 3), flag=i % 2 == 0,
            at=None if i == 3 else dt.datetime(
                2024, 2, 29, 23, 59, i % 60, 0 if i % 2 else i * 1001,
                tzinfo=UTC),
            day=dt.date(2000 + i, 1, 1 + i % 28),
            clock=None if i == 4 else dt.time(6, i % 60, 15,
                                              0 if i % 3 else i),
            ref=uuid.UUID(int=i * 7919), blob=None if i == 5 else (
                bytes([0, 255, i]) * (i % 3)),
            data=None if i == 6 else {'zz': i, 'a': {'y': [1, 'ü']},
                                      'ok': i % 2 == 0},
            count=None if i == 7 else -i * 1000,
            tag_id=uuid.UUID(int=i) if i % 4 else None))
    return rows


def fill_samples(model):
    for alias in BOTH:
        model.objects.using(alias).bulk_create(sample_rows(model))


def compare(model, monkeypatch, bucket_rows=4):
    monkeypatch.setattr(orchestrator, 'BUCKET_ROWS', bucket_rows)
    left, right = LocalReader('sqlite'), LocalReader('postgres')
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        for alias in BOTH:
            stack.enter_context(engines.for_alias(alias).read_snapshot(
                alias))
        result = orchestrator.compare_model(
            model, 'sqlite', 'postgres', left_reader=left,
            right_reader=right, notes=notes)
    return result, left, right, notes


def engine_digests(model, alias, bounds):
    engine = engines.for_alias(alias)
    with engine.read_snapshot(alias):
        return engine.bucket_digests(alias, model, bounds)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_identical_rows_match_in_the_engines(sample_model, monkeypatch):
    fill_samples(sample_model)
    bounds = [5, 6, 20, 33]
    sqlite_digests = engine_digests(sample_model, 'sqlite', bounds)
    assert [rows for rows, _ in sqlite_digests] == [4, 1, 14, 13, 8]
    assert sqlite_digests == engine_digests(sample_model, 'postgres',
                                            bounds)
    result, left, right, notes = compare(sample_model, monkeypatch)
    assert result.ok and result.identical == 40 and result.rechecked == 0
    # The engine path, never the Python per-row digests.
    assert left.digest_paths == right.digest_paths == collections.Counter(
        engine=1)
    assert notes == []


@pytest.mark.django_db(databases=BOTH)
def test_text_keys_and_json_key_order_match_without_rereads(monkeypatch):
    # Assets: text keys whose bytewise and locale orders differ, and JSON
    # written in the other key order on each side (helpers/compare.py).
    fill_both('sqlite', 'postgres', n_assets=40)
    result, left, _, _ = compare(Asset, monkeypatch, bucket_rows=3)
    assert result.ok and result.identical == 40
    assert result.rechecked == 0
    assert left.digest_paths == collections.Counter(engine=1)


CHANGES = [
    # (row id, field, new value on PostgreSQL)
    (8, 'name', 'changed'),
    (2, 'name', None),                       # '' -> NULL
    (1, 'name', ''),                         # NULL -> ''
    (9, 'body', 'tab\tand\nnewlinX'),
    (11, 'flag', True),
    (11, 'at', dt.datetime(2024, 2, 29, 23, 59, 11, 1, tzinfo=UTC)),
    (12, 'at', dt.datetime(2024, 2, 29, 23, 59, 12, 12013, tzinfo=UTC)),
    (12, 'day', dt.date(2012, 1, 14)),
    (13, 'clock', dt.time(6, 13, 15, 1)),    # zero fraction -> 1 us
    (15, 'clock', dt.time(6, 15, 15)),       # 15 us -> zero fraction
    (14, 'ref', uuid.UUID(int=14 * 7919 + 1)),
    (15, 'blob', b'\x01'),                 # b'' -> 1 byte
    (13, 'blob', b''),
    (16, 'blob', None),
    (17, 'data', {'zz': 17, 'a': {'y': [1, 'u']}, 'ok': False}),
    (18, 'count', -18001),
    (19, 'tag_id', uuid.UUID(int=20)),
]


@pytest.mark.parametrize('pk,field,value', CHANGES,
                         ids=[f'{f}-{pk}' for pk, f, _ in CHANGES])
@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_each_changed_value_is_found_exactly(sample_model, monkeypatch,
                                              pk, field, value):
    fill_samples(sample_model)
    sample_model.objects.using('postgres').filter(pk=pk).update(
        **{field: value})
    name = sample_model._meta.get_field(field).name
    result, left, _, _ = compare(sample_model, monkeypatch)
    assert result.changed == ((pk, (name,)),)
    assert result.missing_keys == result.extra_keys == ()
    assert result.identical == 39
    assert 0 < result.rechecked < 40   # its bucket, not the table
    assert left.digest_paths == collections.Counter(engine=1)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_missing_and_extra_rows_by_engine_digests(sample_model,
                                                  monkeypatch):
    fill_samples(sample_model)
    sample_model.objects.using('postgres').filter(pk__in=[1, 40]).delete()
    extra = sample_rows(sample_model, 41)[-1]
    extra.save(using='postgres', force_insert=True)
    result, _, _, _ = compare(sample_model, monkeypatch)
    assert result.missing_keys == (1, 40)
    assert result.extra_keys == (41,)
    assert result.changed == ()


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_unexpected_sqlite_storage_class_is_reread_not_matched(
        sample_model, monkeypatch):
    # SQLite holds the bytes of '-21000' in the integer column (a blob
    # escapes the integer affinity): the engine text marks it ('!'), the
    # bucket is compared exactly, and Python's canonical forms tell the
    # rows apart.
    fill_samples(sample_model)
    with connections['sqlite'].cursor() as cursor:
        cursor.execute('UPDATE test_engine_digest_sample SET count = '
                       "CAST(CAST(count AS TEXT) AS BLOB) WHERE id = 21")
        cursor.execute('SELECT typeof(count) FROM test_engine_digest_sample'
                       ' WHERE id = 21')
        assert cursor.fetchone() == ('blob',)
    result, _, _, _ = compare(sample_model, monkeypatch)
    assert result.rechecked > 0
    assert result.changed == ((21, ('count',)),)


@pytest.mark.django_db(databases=BOTH)
def test_model_with_float_and_decimal_keeps_python_digests(monkeypatch):
    fill_both('sqlite', 'postgres')
    Item.objects.using('postgres').filter(pk=3).update(price='3.5001')
    result, left, right, notes = compare(Item, monkeypatch, bucket_rows=2)
    assert result.changed == ((3, ('price',)),)
    assert result.identical == 7
    assert left.digest_paths == right.digest_paths == collections.Counter(
        python=1)
    assert len(notes) == 1 and 'kitchensink.Item' in notes[0]
    for column in ('ratio', 'price', 'span', 'ip'):
        assert column in notes[0]


def test_row_texts_are_injective_on_sqlite():
    """Values that the canonical forms tell apart render differently,
    including where a concatenation could run columns together."""
    db = sqlite3.connect(':memory:')
    forms = {'a': 'text', 'b': 'text', 'n': 'int', 'f': 'bool',
             'blob': 'binary'}
    db.execute('CREATE TABLE t (a text, b text, n integer, f bool, '
               'blob blob)')
    rows = [('a', 'bc', 1, 1, b''), ('ab', 'c', 1, 1, b''),
            ('', None, 1, 1, b''), (None, '', 1, 1, b''),
            ('~', None, 1, 1, b''), ('1:', 'x', 1, 1, b''),
            ('a', 'bc', 12, 1, b''), ('a', 'bc', 1, 0, b''),
            ('a', 'bc', 1, 1, None), ('a', 'bc', 1, 1, b'\x00'),
            ('a', 'bc', -1, 1, b''), ('a', 'bc', None, 1, b''),
            ('a', 'bc', 1, None, b''), ('a', 'bc', 1, 1, b'\x0a')]
    db.executemany('INSERT INTO t VALUES (?, ?, ?, ?, ?)', rows)
    expression = ' || '.join(digests._sqlite_form(c, k)
                             for c, k in forms.items())
    texts = [t for (t,) in db.execute(f'SELECT {expression} FROM t')]
    assert len(set(texts)) == len(rows), texts
    # A value of the wrong storage class is marked (b for blob), never
    # rendered as the integer PostgreSQL prints with its i.
    db.execute("UPDATE t SET n = CAST('1' AS BLOB) WHERE a = 'a' "
               "AND b = 'bc' AND n = 1 AND f = 1 AND blob = x''")
    texts = [t for (t,) in db.execute(f'SELECT {expression} FROM t')]
    assert sum(",b1,i1," in t for t in texts) == 1, texts


# -- false-match guards: SQLite values PostgreSQL's text could mimic -------

# (SQL setting row 8 on SQLite, field, its value on PostgreSQL): equal
# if SQLite's printf were trusted blindly, different for Django.
MIMICS = [
    # printf's %Q stops at a NUL: 'abc' would print on both sides.
    ("name = 'abc' || char(0) || 'x'", 'name', 'abc'),
    ("body = 'a' || char(0)", 'body', 'a'),
    # A blob in a text column prints its bytes as text.
    ("name = CAST('abc' AS BLOB)", 'name', 'abc'),
    ("ref = CAST('0000000000000000000000000000f778' AS BLOB)", 'ref',
     uuid.UUID(int=8 * 7919)),
    # A blob or text where the integer should be.
    ("count = CAST('-8000' AS BLOB)", 'count', -8000),
    ("at = CAST('2024-02-29 23:59:08.008008' AS BLOB)", 'at',
     dt.datetime(2024, 2, 29, 23, 59, 8, 8008, tzinfo=UTC)),
    # NULL, '' and 'NULL' (%Q prints NULL unquoted).
    ("name = NULL", 'name', 'NULL'),
    ("name = 'NULL'", 'name', None),
    ("name = NULL", 'name', ''),
    # A quote or a backslash (PostgreSQL's quote_literal doubles both).
    ("name = 'it''s'", 'name', "it''s"),
    ("name = 'a\\b'", 'name', 'a\\\\b'),
    # A JSON value stored as a blob.
    ("data = CAST('{\"zz\": 8}' AS BLOB)", 'data', {'zz': 8}),
]


@pytest.mark.parametrize('sql,field,value', MIMICS,
                         ids=[sql for sql, _, _ in MIMICS])
@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_a_mimicking_sqlite_value_never_matches(sample_model, monkeypatch,
                                                sql, field, value):
    fill_samples(sample_model)
    with connections['sqlite'].cursor() as cursor:
        cursor.execute(f'UPDATE test_engine_digest_sample SET {sql} '
                       'WHERE id = 8')
    sample_model.objects.using('postgres').filter(pk=8).update(
        **{field: value})
    bounds = [5, 6, 20, 33]
    left = engine_digests(sample_model, 'sqlite', bounds)
    right = engine_digests(sample_model, 'postgres', bounds)
    # Row 8 is in bucket [6, 20): that bucket differs, the others agree.
    assert left[2] != right[2]
    assert [a == b for a, b in zip(left, right)] == [
        True, True, False, True, True]


HARD_TEXTS = ["it's", "''", "'", '\\', "\\'", 'NULL', '', 'a,b', "t3:'x',",
              'n0:NULL,', 'tab\tnew\nline', 'ü 🎉', '[', ']']


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_hard_texts_match_without_rereads(sample_model, monkeypatch):
    fill_samples(sample_model)
    for index, text in enumerate(HARD_TEXTS, start=1):
        for alias in BOTH:
            sample_model.objects.using(alias).filter(pk=index).update(
                name=text, body=text[::-1])
    result, left, _, _ = compare(sample_model, monkeypatch)
    assert result.ok and result.identical == 40 and result.rechecked == 0
    assert left.digest_paths == collections.Counter(engine=1)


# SQLite text as written (key order, escapes, duplicate keys, spaces)
# and the value Django reads from it, which PostgreSQL holds.
JSON_TEXTS = [
    ('{"zz": 1, "a": "\\u00fc", "zz": 2}', {'a': 'ü', 'zz': 2}),
    (('{"\\u00fc": 1, "ab": 2, "b": {"yy": [1, {"k2": 0, "k": 1}], '
      '"x": null}}'),
     {'ü': 1, 'ab': 2, 'b': {'yy': [1, {'k2': 0, 'k': 1}], 'x': None}}),
    ('{"b":1,"a":[true,false,1.5,"\\"q\\""]}',
     {'a': [True, False, 1.5, '"q"'], 'b': 1}),
    ('"a string"', 'a string'),
    ('null', None),
    # Not JSON: Django reads the text itself (an RS inside: the bucket's
    # JSON is read row by row).
    ('not json \x1e at all', 'not json \x1e at all'),
]


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_json_as_sqlite_holds_it_matches_jsonb(sample_model, monkeypatch):
    fill_samples(sample_model)
    for index, (text, value) in enumerate(JSON_TEXTS, start=8):
        with connections['sqlite'].cursor() as cursor:
            # Text that is not JSON: past the column's CHECK, as an older
            # schema or another writer could leave it.
            cursor.execute('PRAGMA ignore_check_constraints = ON')
            cursor.execute('UPDATE test_engine_digest_sample SET data = %s '
                           'WHERE id = %s', [text, index])
            cursor.execute('PRAGMA ignore_check_constraints = OFF')
        sample_model.objects.using('postgres').filter(pk=index).update(
            data=models.Value(value, output_field=models.JSONField()))
    bounds = [5, 6, 20, 33]
    assert engine_digests(sample_model, 'sqlite', bounds) == \
        engine_digests(sample_model, 'postgres', bounds)
    # A changed value in the same bucket is still found.
    sample_model.objects.using('postgres').filter(pk=9).update(
        data={'ü': 1, 'ab': 2, 'b': {'yy': [1, {'k2': 0, 'k': 2}],
                                      'x': None}})
    result, _, _, _ = compare(sample_model, monkeypatch)
    assert result.changed == ((9, ('data',)),)


# -- the SQLite side split among processes ----------------------------------

@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_sqlite_worker_split_gives_the_same_digests(sample_model,
                                                    monkeypatch):
    from anthias_rollback.compare import readers

    fill_samples(sample_model)
    bounds = [3, 5, 6, 11, 20, 27, 33, 38]
    engine = engines.for_alias('sqlite')
    monkeypatch.setattr(digests, 'digest_workers', lambda alias: 3)
    watch = digests.SnapshotWatch('sqlite')
    try:
        with engine.read_snapshot('sqlite'):
            whole = engine.bucket_digests('sqlite', sample_model, bounds)
            parts = [digests.engine_bucket_sums(
                'sqlite', sample_model, bounds, (index, 3))
                for index in range(3)]
            split = readers.split_digests('sqlite', sample_model, bounds,
                                          watch, None)
    finally:
        watch.close()
    assert [rows for rows, _ in whole] == [2, 2, 1, 5, 9, 7, 6, 5, 3]
    # Every row in exactly one slice, each slice's rows in their buckets.
    assert sum(rows for part in parts for rows, _ in part) == 40
    assert all(any(rows for rows, _ in part) for part in parts)
    assert digests.as_digests(digests.add_sums(
        digests.add_sums(parts[0], parts[1]), parts[2])) == whole
    assert split == whole
    assert whole == engine_digests(sample_model, 'postgres', bounds)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_a_write_between_snapshots_makes_one_process_hash_all(
        sample_model, monkeypatch):
    """The workers' transactions start after the reader's: a write
    committed in between must not mix into the digests (the buckets it
    touched would look equal in one state and be compared in another)."""
    from anthias_rollback.compare import readers

    fill_samples(sample_model)
    bounds = [5, 6, 20, 33]
    engine = engines.for_alias('sqlite')
    monkeypatch.setattr(digests, 'digest_workers', lambda alias: 2)
    path = connections['sqlite'].settings_dict['NAME']
    watch = digests.SnapshotWatch('sqlite')
    try:
        assert watch.unchanged()
        with engine.read_snapshot('sqlite'):
            before = engine.bucket_digests('sqlite', sample_model, bounds)
            writer = sqlite3.connect(path)
            with writer:
                writer.execute('UPDATE test_engine_digest_sample SET '
                               "name = 'written meanwhile' WHERE id = 35")
            writer.close()
            assert not watch.unchanged()
            split = readers.split_digests('sqlite', sample_model, bounds,
                                          watch, None)
    finally:
        watch.close()
    # This process's snapshot, not the file as it is now.
    assert split == before
    assert engine_digests(sample_model, 'sqlite', bounds)[4] != before[4]


# -- storage order, not key order ---------------------------------------------

@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_rows_stored_out_of_key_order_match_block_by_block(sample_model,
                                                           monkeypatch):
    """Each side reads its table in storage order: rows inserted in an
    order unrelated to their keys, and PostgreSQL read one heap block
    per statement, still give the same digests as SQLite's, with every
    row counted once."""
    rows = sample_rows(sample_model, n=250)
    # Storage order: a shuffle of the keys, differently on each side.
    sample_model.objects.using('sqlite').bulk_create(
        sorted(rows, key=lambda r: (r.id * 37) % 251))
    sample_model.objects.using('postgres').bulk_create(
        sorted(rows, key=lambda r: (r.id * 89) % 251))
    bounds = [17, 60, 61, 150, 240]
    whole = engine_digests(sample_model, 'postgres', bounds)
    monkeypatch.setattr(digests, 'POSTGRES_BATCH_BLOCKS', 1)
    engine = engines.for_alias('postgres')
    with engine.read_snapshot('postgres'):
        with connections['postgres'].cursor() as cursor:
            cursor.execute("SELECT pg_relation_size("
                           "'test_engine_digest_sample') / 8192")
            assert cursor.fetchone()[0] >= 3   # several statements
        by_block = engine.bucket_digests('postgres', sample_model, bounds)
        # The planner's setting is put back within the transaction.
        with connections['postgres'].cursor() as cursor:
            cursor.execute("SELECT current_setting('enable_sort')")
            assert cursor.fetchone()[0] == 'on'
    assert [n for n, _ in whole] == [16, 43, 1, 89, 90, 11]
    assert by_block == whole
    assert engine_digests(sample_model, 'sqlite', bounds) == whole


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_a_row_moved_to_another_bucket_changes_both(sample_model):
    """A key changed on one side: the row leaves one bucket and joins
    another; both digests change, the others do not."""
    fill_samples(sample_model)
    sample_model.objects.using('postgres').filter(pk=8).update(id=45)
    bounds = [5, 10, 20, 30]
    left = engine_digests(sample_model, 'sqlite', bounds)
    right = engine_digests(sample_model, 'postgres', bounds)
    assert [a == b for a, b in zip(left, right, strict=True)] == [
        True, False, True, True, False]
    assert [n for n, _ in right] == [4, 4, 10, 10, 12]


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_a_column_named_rowid_does_not_split_the_rows():
    """The SQLite slices are of the table's own rowids: a model column
    named rowid (NULL in some rows) must not be taken for them."""
    with isolate_apps('tests.kitchensink'):
        class Shadow(models.Model):
            rowid = models.IntegerField(null=True)

            class Meta:
                app_label = 'kitchensink'
                db_table = 'test_engine_digest_shadow'

        with tables_on_both(Shadow):
            for alias in BOTH:
                Shadow.objects.using(alias).bulk_create(
                    Shadow(id=i, rowid=None if i % 3 else 1000 - i)
                    for i in range(1, 31))
            bounds = [10, 20]
            with engines.for_alias('sqlite').read_snapshot('sqlite'):
                parts = [digests.engine_bucket_sums('sqlite', Shadow,
                                                    bounds, (index, 3))
                         for index in range(3)]
            assert sum(rows for part in parts for rows, _ in part) == 30
            assert all(any(rows for rows, _ in part) for part in parts)
            assert digests.as_digests(digests.add_sums(digests.add_sums(
                parts[0], parts[1]), parts[2])) == engine_digests(
                Shadow, 'postgres', bounds)


@pytest.mark.django_db(databases=['postgres'])
def test_the_bucket_tree_counts_bounds_like_bisect():
    """PostgreSQL's bucket of a text key (a tree of CASEs, where
    width_bucket would walk the whole array) is the number of bounds at
    or below it, bytewise, for every bound count and every position."""
    import bisect

    keys = ['', 'A', 'B', 'a', 'b', 'é', 'ü', 'z', '~', '€', '🎉']
    for count in range(12):
        bounds = sorted({keys[(i * 7) % len(keys)] for i in range(count)},
                        key=lambda k: k.encode())
        params: list = []
        tree = digests._bucket_tree('k COLLATE "C"', bounds, params)
        with connections['postgres'].cursor() as cursor:
            cursor.execute(
                f'SELECT k, {tree} FROM unnest(%s::text[]) AS k',
                params + [keys + ['aa', 'b\x7f']])
            found = dict(cursor.fetchall())
        assert found == {k: bisect.bisect_right(bounds, k)
                         for k in keys + ['aa', 'b\x7f']}, bounds
