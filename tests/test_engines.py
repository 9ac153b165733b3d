"""engines/: the one seam for engine-specific code, each engine directly.

Every engine function is exercised on the real engine: a SQLite file in
WAL mode and the run's PostgreSQL server, no mocks.
"""
import contextlib
import itertools
import sqlite3

import psycopg2
import pytest
from django.apps import apps
from django.db import DatabaseError, connections, transaction

from anthias_rollback import engines, profiles
from anthias_rollback.engines import postgresql as pg_engine
from anthias_rollback.engines import sqlite as sqlite_engine
from anthias_rollback.exceptions import ConfigError
from tests.helpers.transfer import rows_by_pk
from tests.kitchensink.models import Category

BOTH = ['sqlite', 'postgres']
CATEGORY = Category._meta.db_table
ALIASES = pytest.mark.parametrize('alias', BOTH)


def mark(alias: str) -> str:
    """The raw driver's parameter mark (engine SQL goes to the driver)."""
    return '?' if alias == 'sqlite' else '%s'


def read_all(alias: str, sql: str, params=(), chunk_rows: int = 1000
             ) -> list[tuple]:
    engine = engines.for_alias(alias)
    return [row for chunk in engine.fetch_chunks(alias, sql, params,
                                                 chunk_rows)
            for row in chunk]


def second_connection_insert(alias: str, name: str) -> None:
    """Commit a Category row through a connection Django does not know."""
    table = connections[alias].ops.quote_name(CATEGORY)
    if alias == 'sqlite':
        raw = sqlite3.connect(connections[alias].settings_dict['NAME'],
                              timeout=10)
        try:
            assert raw.execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
            raw.execute(f'INSERT INTO {table} (name) VALUES (?)', [name])
            raw.commit()
        finally:
            raw.close()
        return
    raw = psycopg2.connect(**connections[alias].get_connection_params())
    try:
        with raw, raw.cursor() as cursor:
            cursor.execute(f'INSERT INTO {table} (name) VALUES (%s)',
                           [name])
    finally:
        raw.close()


# -- the seam

def test_for_alias_picks_the_engine_module():
    assert engines.for_alias('sqlite') is sqlite_engine
    assert engines.for_alias('postgres') is pg_engine
    assert engines.is_sqlite('sqlite') is True
    assert engines.is_sqlite('postgres') is False


def test_for_alias_follows_a_temporary_alias(tmp_path):
    with profiles.sqlite_file_alias(tmp_path / 'x.db') as alias:
        assert engines.for_alias(alias) is sqlite_engine
    with profiles.postgres_override_alias({'db': 'elsewhere'}) as alias:
        assert engines.for_alias(alias) is pg_engine


def test_unsupported_vendor_is_config_error():
    # Django's dummy backend: a vendor this app does not know (no
    # connection is ever opened).
    config = {'ENGINE': 'django.db.backends.dummy', 'NAME': 'x',
              'PASSWORD': 'Dummy-pw', 'HOST': 'db.local'}
    with profiles.temporary_alias(config) as alias:
        with pytest.raises(ConfigError) as excinfo:
            engines.for_alias(alias)
        assert pytest.raises(ConfigError, engines.is_sqlite, alias)
    message = str(excinfo.value)
    assert repr(alias) in message and 'not supported' in message
    assert 'Dummy-pw' not in message


@pytest.mark.parametrize('module', [sqlite_engine, pg_engine],
                         ids=['sqlite', 'postgresql'])
def test_engine_implements_the_whole_interface(module):
    # Read at test time: the interface grows with the code.
    missing = [name for name in engines.INTERFACE
               if not hasattr(module, name)]
    assert missing == [], f'{module.__name__} lacks {missing}'
    for name in engines.INTERFACE:
        if name.isupper():
            assert isinstance(getattr(module, name), bool), name
        else:
            assert callable(getattr(module, name)), name
    # The flags differ as the engines do: COPY text vs parameters.
    assert pg_engine.ROWS_AS_COPY_TEXT and not sqlite_engine.ROWS_AS_COPY_TEXT


# -- snapshots and chunked reads

@ALIASES
@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_read_snapshot_does_not_see_later_commits(alias):
    engine = engines.for_alias(alias)
    Category.objects.using(alias).create(name='before')
    table = connections[alias].ops.quote_name(CATEGORY)
    sql = f'SELECT name FROM {table} ORDER BY name'
    with engine.read_snapshot(alias):
        assert read_all(alias, sql) == [('before',)]
        second_connection_insert(alias, 'after')
        # Same snapshot for every statement in the block.
        assert read_all(alias, sql) == [('before',)]
        assert read_all(alias, sql) == [('before',)]
    # A fresh read sees the committed row.
    with engine.read_snapshot(alias):
        assert read_all(alias, sql) == [('after',), ('before',)]
    assert sorted(Category.objects.using(alias).values_list(
        'name', flat=True)) == ['after', 'before']


@ALIASES
@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_read_snapshot_is_read_only_and_ends_cleanly(alias):
    engine = engines.for_alias(alias)
    table = connections[alias].ops.quote_name(CATEGORY)
    with (engine.read_snapshot(alias), pytest.raises(DatabaseError),
          connections[alias].cursor() as cursor):
        cursor.execute(f'INSERT INTO {table} (name) VALUES '
                       f"('written in a snapshot')")
    # After the block the connection writes again, in autocommit.
    assert connections[alias].get_autocommit()
    Category.objects.using(alias).create(name='after the snapshot')
    assert Category.objects.using(alias).count() == 1


@ALIASES
@pytest.mark.django_db(databases=BOTH)
@pytest.mark.parametrize('total,size,expected', [
    (7, 3, [3, 3, 1]), (6, 3, [3, 3]), (2, 5, [2]), (0, 4, []),
    (5, 1, [1, 1, 1, 1, 1])])
def test_fetch_chunks_yields_every_row_in_chunks(alias, total, size,
                                                 expected):
    if alias == 'sqlite':
        sql = ('WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 '
               'FROM c WHERE x < ?) SELECT x FROM c WHERE x <= ?')
        params = [max(total, 1), total]
    else:
        sql = 'SELECT x FROM generate_series(1, %s) AS x ORDER BY x'
        params = [total]
    engine = engines.for_alias(alias)
    with engine.read_snapshot(alias):
        chunks = list(engine.fetch_chunks(alias, sql, params, size))
    assert [len(chunk) for chunk in chunks] == expected
    assert [row[0] for chunk in chunks for row in chunk] == list(
        range(1, total + 1))


@ALIASES
@pytest.mark.django_db(databases=BOTH)
def test_fetch_chunks_without_params_keeps_percent_signs(alias):
    engine = engines.for_alias(alias)
    with engine.read_snapshot(alias):
        rows = read_all(alias, "SELECT '100%' AS x")
    assert rows == [('100%',)]


# -- byte order and key clauses

TEXT_KEYS = ['a', 'B', 'é', 'Z', 'b', 'aa', 'É', '~']


def postgres_linguistic_collation() -> str | None:
    """A collation this server can really sort with that is not byte
    order (ICU may be listed yet not built in), or None. A libc one is
    made from the OS's en_US.UTF-8 locale when the OS has it (.ci/run
    generates it with localedef: the embedded server has no ICU)."""
    with contextlib.suppress(DatabaseError), \
            transaction.atomic(using='postgres'), \
            connections['postgres'].cursor() as cursor:
        cursor.execute('CREATE COLLATION IF NOT EXISTS "en_US.utf8" '
                       "(provider = libc, locale = 'en_US.utf8')")
    with connections['postgres'].cursor() as cursor:
        cursor.execute("SELECT collname FROM pg_collation WHERE collname "
                       "IN ('unicode', 'und-x-icu', 'en_US.utf8', "
                       "'en_US', 'C.utf8') ORDER BY collname")
        names = [row[0] for row in cursor.fetchall()]
    for name in names:
        try:
            with (transaction.atomic(using='postgres'),
                  connections['postgres'].cursor() as cursor):
                cursor.execute(f'SELECT %s < %s COLLATE "{name}"',
                               ['a', 'B'])
                if cursor.fetchone()[0]:   # 'a' < 'B': not bytewise
                    return name
        except DatabaseError:
            continue
    return None


def text_table(alias: str) -> tuple[str, bool]:
    """A temporary text table, and whether its column's own collation
    differs from byte order (then only the engine's clauses can make the
    results bytewise). SQLite: NOCASE. PostgreSQL: a linguistic
    collation (the test server's database is often C; the embedded
    server has ICU's "unicode")."""
    collation, distinct = '', True
    if alias == 'sqlite':
        collation = 'COLLATE NOCASE'
    else:
        name = postgres_linguistic_collation()
        if name is None:
            # Never weaker in silence: in byte order already, the test
            # could not tell the engine's clauses from the column's own.
            pytest.fail('the PostgreSQL server has no linguistic '
                        'collation (ICU "unicode" or a libc en_US); the '
                        'byte-order tests need one')
        collation = f'COLLATE "{name}"'
    with connections[alias].cursor() as cursor:
        cursor.execute(f'CREATE TEMP TABLE anthias_keys (s TEXT '
                       f'{collation}, n INTEGER)')
        for n, key in enumerate(TEXT_KEYS):
            cursor.execute('INSERT INTO anthias_keys (s, n) VALUES (%s, %s)',
                           [key, n])
    return 'anthias_keys', distinct


def by_bytes(keys) -> list[str]:
    return sorted(keys, key=lambda key: key.encode('utf-8'))


@ALIASES
@pytest.mark.django_db(databases=BOTH)
def test_byte_order_sorts_text_bytewise(alias):
    engine = engines.for_alias(alias)
    table, distinct = text_table(alias)
    plain = [r[0] for r in read_all(alias, f'SELECT s FROM {table} '
                                           'ORDER BY s')]
    # Precondition: the column's own order is not the byte order.
    assert (plain != by_bytes(TEXT_KEYS)) == distinct
    ordered = [r[0] for r in read_all(
        alias, f'SELECT s FROM {table} ORDER BY '
               f'{engine.byte_order("s", True)}')]
    assert ordered == by_bytes(TEXT_KEYS)
    # Not text: the column as is.
    assert engine.byte_order('n', False) == 'n'
    numbers = [r[0] for r in read_all(
        alias, f'SELECT n FROM {table} ORDER BY '
               f'{engine.byte_order("n", False)}')]
    assert numbers == sorted(numbers)


@ALIASES
@pytest.mark.django_db(databases=BOTH)
@pytest.mark.parametrize('low,high', [
    ('Z', 'b'), ('B', 'a'), (None, 'a'), ('b', None), ('aa', 'aa'),
    ('a', 'é'), (None, None)])
def test_key_range_clause_text_is_byte_range(alias, low, high):
    engine = engines.for_alias(alias)
    table, _ = text_table(alias)
    clause, params = engine.key_range_clause('s', 'text', low, high)
    where = f' WHERE {clause}' if clause else ''
    found = [r[0] for r in read_all(alias, f'SELECT s FROM {table}{where}',
                                    params)]
    expected = [k for k in TEXT_KEYS
                if (low is None or k.encode() >= low.encode())
                and (high is None or k.encode() < high.encode())]
    assert by_bytes(found) == by_bytes(expected)
    assert len(params) == (low is not None) + (high is not None)


@ALIASES
@pytest.mark.django_db(databases=BOTH)
def test_key_ranges_partition_all_text_keys(alias):
    """Consecutive [low, high) ranges cover every key exactly once (how
    the copy splits a table)."""
    engine = engines.for_alias(alias)
    table, _ = text_table(alias)
    bounds = [None, 'B', 'a', 'b', '~', None]
    seen = []
    for low, high in itertools.pairwise(bounds):
        clause, params = engine.key_range_clause('s', 'text', low, high)
        seen += [r[0] for r in read_all(
            alias, f'SELECT s FROM {table} WHERE {clause}', params)]
    assert sorted(seen) == sorted(TEXT_KEYS)


@ALIASES
@pytest.mark.django_db(databases=BOTH)
def test_key_clauses_int_keys(alias):
    engine = engines.for_alias(alias)
    ids = [Category.objects.using(alias).create(name=f'c{n}').pk
           for n in range(8)]
    table = connections[alias].ops.quote_name(CATEGORY)
    query = f'SELECT id FROM {table} WHERE '

    def keys(clause_params) -> list[int]:
        clause, params = clause_params
        return sorted(r[0] for r in read_all(alias, query + clause,
                                             params))

    with engine.read_snapshot(alias):
        assert keys(engine.key_range_clause('id', 'int', ids[2],
                                            ids[5])) == ids[2:5]
        assert keys(engine.key_range_clause('id', 'int', None,
                                            ids[3])) == ids[:3]
        assert keys(engine.key_range_clause('id', 'int', ids[6],
                                            None)) == ids[6:]
        assert keys(engine.key_in_clause(
            'id', 'int', [ids[1], ids[4], ids[7] + 100])) == [ids[1],
                                                                ids[4]]
        assert keys(engine.key_in_clause('id', 'int', [ids[0]])) == [
            ids[0]]
    assert engine.key_range_clause('id', 'int', None, None) == ('', [])


@ALIASES
@pytest.mark.django_db(databases=BOTH)
def test_key_in_clause_text_keys(alias):
    engine = engines.for_alias(alias)
    for name in ('a', 'é', 'x y', "O'Brien", 'Z'):
        Category.objects.using(alias).create(name=name)
    table = connections[alias].ops.quote_name(CATEGORY)
    clause, params = engine.key_in_clause(
        'name', 'text', ['a', 'é', "O'Brien", 'missing'])
    found = [r[0] for r in read_all(
        alias, f'SELECT name FROM {table} WHERE {clause}', params)]
    assert sorted(found) == sorted(['a', 'é', "O'Brien"])


@pytest.mark.django_db(databases=['sqlite'])
def test_sqlite_key_in_clause_many_keys():
    """Up to the caller's batch of keys, one placeholder each."""
    ids = [Category.objects.using('sqlite').create(name=f'k{n}').pk
           for n in range(300)]
    table = connections['sqlite'].ops.quote_name(CATEGORY)
    clause, params = sqlite_engine.key_in_clause('id', 'int', ids[::2])
    assert clause.count('?') == 150
    found = read_all('sqlite', f'SELECT id FROM {table} WHERE {clause}',
                     params)
    assert sorted(r[0] for r in found) == ids[::2]


@pytest.mark.django_db(databases=['postgres'])
def test_postgres_key_in_clause_is_one_array_parameter():
    ids = [Category.objects.using('postgres').create(name=f'k{n}').pk
           for n in range(300)]
    table = connections['postgres'].ops.quote_name(CATEGORY)
    clause, params = pg_engine.key_in_clause('id', 'int', ids[::2])
    assert len(params) == 1
    found = read_all('postgres', f'SELECT id FROM {table} WHERE {clause}',
                     params)
    assert sorted(r[0] for r in found) == ids[::2]


# -- writing a copy: truncate, write_rows, sequences, finish_load

def encoded_rows(source: str, target: str) -> tuple[list[str], list]:
    """Category rows of *source* as *target*'s write_rows wants them."""
    engine = engines.for_alias(target)
    fields = Category._meta.concrete_fields
    writers = [engine.value_writer(f, target) for f in fields]
    rows = []
    for obj in Category.objects.using(source).order_by('pk'):
        values = [w(getattr(obj, f.attname)) for w, f in
                  zip(writers, fields)]
        rows.append('\t'.join(values) if engine.ROWS_AS_COPY_TEXT
                    else tuple(values))
    return [f.column for f in fields], rows


def kitchensink_tables() -> list[str]:
    """Category and every table pointing at it (PostgreSQL's TRUNCATE,
    without CASCADE, needs them all in one statement)."""
    config = apps.get_app_config('kitchensink')
    return [m._meta.db_table
            for m in config.get_models(include_auto_created=True)]


def copy_categories(source: str, target: str, batch: int = 2) -> list:
    engine = engines.for_alias(target)
    columns, rows = encoded_rows(source, target)
    batches = (rows[i:i + batch] for i in range(0, len(rows), batch))
    with engine.bulk_load(target):
        engine.truncate(target, kitchensink_tables())
        engine.write_rows(target, CATEGORY, columns, batches)
        return engine.finish_load(source, target, [Category])


def seed_with_gap(alias: str) -> tuple[int, int]:
    """Categories with a parent link, the newest ids deleted: returns
    (highest kept id, highest id ever handed out)."""
    made = [Category.objects.using(alias).create(name=f'{alias} root ☕')]
    for n in range(5):
        made.append(Category.objects.using(alias).create(
            name=f"child {n} O'Brien\t\\", parent=made[0]))
    Category.objects.using(alias).filter(pk__in=[made[-1].pk,
                                                 made[-2].pk]).delete()
    return made[-3].pk, made[-1].pk


@pytest.mark.parametrize('source,target', [('postgres', 'sqlite'),
                                           ('sqlite', 'postgres')])
@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_copy_round_trip_replaces_rows_and_moves_sequences(source,
                                                           target):
    kept, handed_out = seed_with_gap(source)
    # Rows already on the target must go (truncate), ids included.
    for n in range(3):
        Category.objects.using(target).create(name=f'stale {n}')
    problems = copy_categories(source, target)
    assert problems == []
    assert rows_by_pk(target, Category) == rows_by_pk(source, Category)
    key = [(CATEGORY, 'id')]
    src_engine, dst_engine = (engines.for_alias(source),
                              engines.for_alias(target))
    assert src_engine.sequence_values(source, key)[CATEGORY] == handed_out
    after = dst_engine.sequence_values(target, key)[CATEGORY]
    assert after >= kept
    if target == 'sqlite':
        # Rollback direction: no id PostgreSQL ever handed out is reused.
        assert after >= handed_out
    fresh = Category.objects.using(target).create(name='after the copy')
    assert fresh.pk > kept
    if target == 'sqlite':
        assert fresh.pk > handed_out


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_truncate_forgets_sqlite_sequence():
    for n in range(4):
        Category.objects.using('sqlite').create(name=f'x{n}')
    key = [(CATEGORY, 'id')]
    assert sqlite_engine.sequence_values('sqlite', key)[CATEGORY] >= 4
    sqlite_engine.truncate('sqlite', [CATEGORY])
    assert Category.objects.using('sqlite').count() == 0
    assert sqlite_engine.sequence_values('sqlite', key) == {}
    assert Category.objects.using('sqlite').create(name='y').pk == 1


@pytest.mark.django_db(databases=['postgres'], transaction=True)
def test_postgres_sequence_values_before_any_insert():
    key = [(CATEGORY, 'id')]
    with connections['postgres'].cursor() as cursor:
        cursor.execute(f'TRUNCATE {CATEGORY} RESTART IDENTITY CASCADE')
    assert pg_engine.sequence_values('postgres', key) == {CATEGORY: 0}
    obj = Category.objects.using('postgres').create(name='first')
    assert pg_engine.sequence_values('postgres', key) == {
        CATEGORY: obj.pk}


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_sqlite_finish_load_reports_dangling_foreign_keys():
    """SQLite does not check the load (bulk-load pragmas): finish_load
    returns the orphans instead; PostgreSQL refuses them at commit."""
    parent = Category.objects.using('postgres').create(name='parent')
    Category.objects.using('postgres').create(name='child', parent=parent)
    columns, rows = encoded_rows('postgres', 'sqlite')
    orphan = [r for r in rows if r[1] == 'child']
    with sqlite_engine.bulk_load('sqlite'):
        sqlite_engine.truncate('sqlite', [CATEGORY])
        sqlite_engine.write_rows('sqlite', CATEGORY, columns,
                                 iter([orphan]))
        problems = sqlite_engine.finish_load('postgres', 'sqlite',
                                             [Category])
    child_pk = orphan[0][0]
    assert problems == [(CATEGORY, child_pk, 'parent_id', CATEGORY)]
