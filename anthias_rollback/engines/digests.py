"""Bucket digests computed inside each engine (checksum mode).

A row's text is what SQLite's printf prints for its stored values, and
PostgreSQL renders the same text for the same canonical values
(normalize.py). Each column starts with its storage class's first
letter (typeof: i, t, b, n; r for a real), which PostgreSQL prints
from the column's type, so a value SQLite holds in a class the column
should not hold (a blob or a number in a text column, a blob in an
integer one) never renders equal to a PostgreSQL value. Then:
integers and booleans as digits and ','; text as `<bytes>:<%Q>,`
(quoted, quotes doubled); datetimes, dates, times and UUIDs as
`<bytes>:<text>,`, the text Django writes (isoformat, a zero fraction
omitted; 32 hex digits); binaries as uppercase hex and ','; NULL as
`n0:NULL,`, `n0:,`, `n0,` or `n,` by kind. Every form is
self-delimiting (a quoted text ends at its lone closing quote; the
others never hold a ','), so a row's text is injective. %Q and %s stop
at a NUL, which SQLite text can hold and PostgreSQL text cannot: the
byte length, counted past the NUL, then disagrees with every
PostgreSQL value's. Only a false match would be wrong: a rendering
difference sends the bucket to the exact comparison and costs time.

A row's hash is the first 60 bits of the md5 of its text, followed, for
a model with JSON columns, by '[', its JSON values in PostgreSQL's jsonb
text with ', ' between them, and ']' (the row text is self-delimiting
and holds each JSON column's storage class, so SQL NULL, rendered "",
differs from the text ''). A bucket's digest is its row count and the
exact sum of its rows' hashes (reladiff's construction): a changed,
missing or extra row changes it but with odds of about 2**-60, and the
sum does not depend on the order the rows are read in. So each side
reads its table in storage order, never through the key index:
PostgreSQL sums in the server, one statement per range of heap blocks,
each row put in its bucket by width_bucket (a tree of CASEs for a text
key, see _bucket_tree); SQLite renders each row's
text in C (printf) over a range of rowids, and Python puts the row in
its bucket, puts each JSON value in jsonb's shape
(normalize.jsonb_text: SQLite keeps JSON as written, in json.dumps' key
order with unicode escapes) and hashes it. Reading by key cost SQLite a
random page read per row (4.2 s of a 1,000,000-row table) and
PostgreSQL a sort per batch of buckets. Columns without a form here
(decimal, float, duration, IP address, a custom JSON decoder, datetimes
stored in a non-UTC zone) keep the whole model on the Python digests.

A SQLite side may split its rows among processes (compare/readers.py),
each summing a range of rowids in its own read transaction:
digest_workers says how many, and snapshot_watch proves that no write
was committed between the reader's snapshot and the last worker's, else
one process sums every row.
"""
import bisect
import hashlib
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connections, models

from anthias_rollback import faults, fields

# Internal type -> form kind (what the per-engine renderers switch on).
_KINDS = {
    **{name: 'int' for name in fields.INT_TYPES},
    'BooleanField': 'bool', 'NullBooleanField': 'bool',
    **{name: 'text' for name in fields.TEXT_TYPES},
    'FileField': 'text', 'ImageField': 'text',
    'DateTimeField': 'datetime', 'DateField': 'date',
    'TimeField': 'time', 'UUIDField': 'uuid', 'BinaryField': 'binary',
    'JSONField': 'json',
}
# PostgreSQL: heap blocks per statement (8 kB each: 32 MB of table).
POSTGRES_BATCH_BLOCKS = 4096
# SQLite: rows fetched, and progress reported, per chunk.
SQLITE_CHUNK_ROWS = 8192
# Bytes of a bucket's hash sum in its digest (sums of 60-bit hashes).
_SUM_BYTES = 16

Digests = list[tuple[int, bytes]]
# (rows, sum of their hashes) per bucket: one process's share.
Sums = list[list[int]]


def new_sums(bounds: list) -> Sums:
    return [[0, 0] for _ in range(len(bounds) + 1)]


def add_sums(into: Sums, more: Sums) -> Sums:
    """Add *more*'s rows and sums into *into* (the same buckets)."""
    for bucket, (rows, total) in zip(into, more, strict=True):
        bucket[0] += rows
        bucket[1] += total
    return into


def as_digests(sums: Sums) -> Digests:
    """(rows, digest) per bucket; an empty bucket is (0, b'')."""
    return [(rows, total.to_bytes(_SUM_BYTES, 'big')) if rows else (0, b'')
            for rows, total in sums]


def column_kind(field: models.Field, alias: str) -> str | None:
    """The form kind of *field*'s column (a plan's stored field), or
    None: no in-engine form."""
    typed = fields.value_field(field)
    kind = _KINDS.get(typed.get_internal_type())
    if kind == 'json' and (typed.decoder is not None
                           or typed.encoder is not None):
        return None
    if kind == 'datetime':
        # SQLite holds naive UTC text only with USE_TZ and a UTC
        # connection; anything else keeps the Python digests.
        connection = connections[alias]
        if not settings.USE_TZ or (connection.vendor == 'sqlite'
                                   and connection.timezone_name != 'UTC'):
            return None
    return kind


def _columns(model: type[models.Model], alias: str
             ) -> list[tuple[str, str, str | None]]:
    # (column, quoted column, kind), the key's first, as
    # normalize.plan_columns orders them.
    # Imported here: normalize imports the engines package.
    from anthias_rollback.normalize import plan_columns

    return [(plan.column, plan.sql, column_kind(plan.field, alias))
            for plan in plan_columns(model, alias, fast=False)]


def digest_columns(model: type[models.Model], alias: str
                   ) -> list[tuple[str, str]]:
    """(quoted column, kind) of every column, the key's first."""
    return [(quoted, kind or '') for _, quoted, kind in
            _columns(model, alias)]


def digest_blockers(model: type[models.Model], alias: str) -> list[str]:
    """Columns of *model* without an in-engine form on *alias* (empty:
    the engine can compute its bucket digests)."""
    if fields.key_kind(model) is None:
        return ['pk']
    return [column for column, _, kind in _columns(model, alias)
            if kind is None]


# -- SQLite

# SQLite: printf's arguments per call (SQLITE_MAX_FUNCTION_ARG is 127 on
# older builds); a longer row is several printf calls joined by ||.
_PRINTF_ARGS = 120
# Kinds SQLite holds as text of a fixed shape.
_SHAPED = ('datetime', 'date', 'time', 'uuid')


def _sqlite_format(column: str, kind: str) -> tuple[str, list[str]]:
    """(printf format, its arguments) rendering *column* as the module
    docstring says; the first character is always the storage class."""
    mark = f'typeof({column})'
    if kind in ('int', 'bool'):
        return '%.1s%d,', [mark, column]
    if kind == 'text':
        # %Q stops at a NUL: the byte length, counted past it, makes a
        # truncated value disagree with every PostgreSQL text.
        return '%.1s%d:%Q,', [mark, f'length(CAST({column} AS BLOB))',
                              column]
    if kind in _SHAPED:
        # PostgreSQL's text of these never holds a ',': the first one
        # ends the value on both sides (and the length guards a NUL).
        return '%.1s%d:%s,', [mark, f'length(CAST({column} AS BLOB))',
                              column]
    if kind == 'binary':
        return '%.1s%s,', [mark, f'hex({column})']
    if kind == 'json':
        # Only the storage class here; the value goes to the bucket's
        # JSON array (see the module docstring).
        return '%.1s', [mark]
    raise ValueError(kind)


def _sqlite_form(column: str, kind: str) -> str:
    """SQL expression: one column's text on SQLite (tests)."""
    fmt, args = _sqlite_format(column, kind)
    return f"printf('{fmt}', {', '.join(args)})"


def sqlite_row_text(model: type[models.Model], alias: str) -> str:
    """SQL expression: one row's text on SQLite (every column; a JSON
    column contributes its storage class only)."""
    calls: list[str] = []
    fmt = ''
    args: list[str] = []
    for column, kind in digest_columns(model, alias):
        piece, piece_args = _sqlite_format(column, kind)
        if len(args) + len(piece_args) > _PRINTF_ARGS:
            calls.append(f"printf('{fmt}', {', '.join(args)})")
            fmt, args = '', []
        fmt += piece
        args += piece_args
    calls.append(f"printf('{fmt}', {', '.join(args)})")
    return ' || '.join(calls)


def json_columns(model: type[models.Model], alias: str) -> list[str]:
    """Quoted JSON columns of *model*, in row order."""
    return [column for column, kind in digest_columns(model, alias)
            if kind == 'json']


def sqlite_bucket_digests(alias: str, model: type[models.Model],
                          bounds: list,
                          on_rows: Callable[[int], None] | None = None
                          ) -> Digests:
    """(rows, digest) per bucket: bucket i holds keys in
    [bounds[i-1], bounds[i]). Needs *alias*'s read snapshot."""
    return as_digests(sqlite_bucket_sums(alias, model, bounds, (0, 1),
                                         on_rows))


def sqlite_bucket_sums(alias: str, model: type[models.Model], bounds: list,
                       part: tuple[int, int],
                       on_rows: Callable[[int], None] | None = None
                       ) -> Sums:
    """(rows, hash sum) per bucket of the rows in slice part[0] of
    part[1] equal slices of the table's rowids, read in rowid order.
    Needs *alias*'s read snapshot."""
    from anthias_rollback.normalize import jsonb_text

    connection = connections[alias]
    quote = connection.ops.quote_name
    key = quote(model._meta.pk.column)
    text = sqlite_row_text(model, alias)
    json = json_columns(model, alias)
    table = quote(model._meta.db_table)
    # NULL and a value that is not text (its row text marks it already)
    # go in as '', as PostgreSQL's side renders NULL "".
    cases = ''.join(f", CASE typeof({column}) WHEN 'text' THEN {column} "
                    f"ELSE '' END" for column in json)
    sql = f'SELECT {key}, CAST({text} AS BLOB){cases} FROM {table}'
    bucket_of = _bucket_finder(bounds)
    md5 = hashlib.md5
    sums = new_sums(bounds)
    done = 0
    connection.ensure_connection()
    with connection.wrap_database_errors:
        cursor = connection.connection.cursor()
        try:
            where, params = _rowid_slice(cursor, model, table, *part)
            cursor.execute(sql + where, params)
            while rows := cursor.fetchmany(SQLITE_CHUNK_ROWS):
                for key_value, row_text, *values in rows:
                    if json:
                        row_text += b'[' + ', '.join(map(
                            jsonb_text, values)).encode(
                            'utf-8', 'surrogatepass') + b']'
                    bucket = sums[bucket_of(key_value)]
                    bucket[0] += 1
                    bucket[1] += int.from_bytes(
                        md5(row_text, usedforsecurity=False).digest()[:8],
                        'big') >> 4
                done += len(rows)
                if on_rows is not None:
                    on_rows(done)
                faults.checkpoint('compare:digest-chunk')
        finally:
            cursor.close()
    return sums


def _rowid_slice(cursor: sqlite3.Cursor, model: type[models.Model],
                 table: str, index: int, count: int) -> tuple[str, list]:
    """WHERE clause and parameters of slice *index* of *count* equal
    slices of *table*'s rowids (the whole table for one slice). A table
    whose rowid is not reachable (WITHOUT ROWID, or columns named rowid,
    _rowid_ and oid) is all in slice 0."""
    if count == 1:
        return '', []
    columns = {field.column.lower() for field in model._meta.local_fields}
    name = next((name for name in ('rowid', '_rowid_', 'oid')
                 if name not in columns), None)
    try:
        low, high = cursor.execute(
            f'SELECT min({name}), max({name}) FROM {table}').fetchone() \
            if name else (None, None)
    except sqlite3.OperationalError:   # WITHOUT ROWID
        low = high = None
    if low is None:
        return ('', []) if index == 0 else (' WHERE 0', [])
    width = high - low + 1
    start = low + width * index // count
    if index == count - 1:
        return f' WHERE {name} >= ?', [start]
    return (f' WHERE {name} >= ? AND {name} < ?',
            [start, low + width * (index + 1) // count])


def _bucket_finder(bounds: list) -> Callable[[Any], int]:
    """The bucket of a key as SQLite orders keys (numbers before text
    before blobs; text bytewise, which is Python's order of str)."""
    ranked = [_sqlite_rank(bound) for bound in bounds]
    kinds = {type(bound) for bound in bounds}
    if len(kinds) == 1 and kinds <= {str, int}:
        plain = kinds.pop()

        def find(value: Any) -> int:
            if type(value) is plain:
                return bisect.bisect_right(bounds, value)
            return bisect.bisect_right(ranked, _sqlite_rank(value))
        return find
    return lambda value: bisect.bisect_right(ranked, _sqlite_rank(value))


def _sqlite_rank(value: Any) -> tuple[int, Any]:
    if value is None:
        return 0, 0
    if isinstance(value, int | float):
        return 1, value
    if isinstance(value, str):
        return 2, value
    return 3, bytes(value)


# -- PostgreSQL

def _postgres_form(column: str, kind: str, null: bool) -> str:
    """SQL expression: *column*'s text on PostgreSQL, what SQLite's
    printf prints for the same value (_sqlite_format). *null*: the
    column may hold NULL (a NOT NULL column holding one after all makes
    the form NULL, and postgres_row_text then prints '!')."""
    when_null = f'WHEN {column} IS NULL THEN ' if null else ''

    def nullable(text: str, if_null: str) -> str:
        return f"CASE {when_null}'{if_null}' ELSE {text} END" if null \
            else text

    if kind == 'int':
        return nullable(f"'i' || {column} || ','", 'n0,')
    if kind == 'bool':
        return (f"CASE WHEN {column} THEN 'i1,' WHEN NOT {column} "
                f"THEN 'i0,' ELSE 'n0,' END")
    if kind == 'text':
        # As %Q: quotes doubled, backslashes kept (quote_literal would
        # double those too).
        return nullable(f"'t' || octet_length({column}) || ':''' || "
                        f"replace({column}, '''', '''''') || ''','",
                        'n0:NULL,')
    if kind == 'json':
        return f"CASE WHEN {column} IS NULL THEN 'n' ELSE 't' END"
    if kind == 'binary':
        return nullable(f"'b' || upper(encode({column}, 'hex')) || ','",
                        'n,')
    if kind == 'datetime':
        # Django's text is isoformat, a zero fraction omitted; PostgreSQL
        # prints the same for years 1 to 9999 (DateStyle ISO: set in
        # postgres_bucket_digests) but for a fraction's trailing zeros.
        # Other values (BC, infinity) print '!': they mismatch.
        text = f"({column} AT TIME ZONE 'UTC')::text"
        return (f"CASE {when_null and when_null + repr('n0:,') + ' '}"
                f"WHEN {column} < '0001-01-01 00:00:00+00' OR {column} >= "
                f"'10000-01-01 00:00:00+00' THEN '!' "
                f"WHEN date_trunc('second', {column}) = {column} "
                f"THEN 't19:' || {text} || ',' "
                f"ELSE 't26:' || rpad({text}, 26, '0') || ',' END")
    if kind == 'time':
        # As datetime; 24:00:00, which Python cannot hold, prints '!'.
        text = f'{column}::text'
        return (f"CASE {when_null and when_null + repr('n0:,') + ' '}"
                f"WHEN {column} = '24:00:00' THEN '!' "
                f"WHEN length({text}) = 8 THEN 't8:' || {text} || ',' "
                f"ELSE 't15:' || rpad({text}, 15, '0') || ',' END")
    if kind == 'date':
        # The label is fixed: a longer text (BC, a year past 9999) then
        # disagrees with SQLite's true length.
        return nullable(f"'t10:' || {column} || ','", 'n0:,')
    if kind == 'uuid':
        return nullable(f"'t32:' || replace({column}::text, '-', '') || ','",
                        'n0:,')
    raise ValueError(kind)


# PostgreSQL: arguments per function call (FUNC_MAX_ARGS is 100).
_CONCAT_ARGS = 90


def postgres_row_text(model: type[models.Model], alias: str) -> str:
    """SQL expression: one row's text on PostgreSQL (never NULL)."""
    null = {plan.sql: plan.field.null for plan in _plans(model, alias)}
    # NULL: a NOT NULL column holds one after all; SQLite never
    # prints '!'.
    forms = [f"coalesce({_postgres_form(column, kind, null[column])}, '!')"
             for column, kind in digest_columns(model, alias)]
    # One concat() per row: a chain of || copies the growing text once
    # per column.
    calls = [f"concat({', '.join(forms[i:i + _CONCAT_ARGS])})"
             for i in range(0, len(forms), _CONCAT_ARGS)]
    return calls[0] if len(calls) == 1 else f"concat({', '.join(calls)})"


def postgres_json_text(model: type[models.Model], alias: str
                       ) -> str | None:
    """SQL expression: a row's JSON values as jsonb text, ', ' between
    them, SQL NULL as "" (SQLite's side reads NULL as '', and the row
    text tells NULL from the text ''); None without JSON columns."""
    values = [f"coalesce({column}::text, '\"\"')"
              for column in json_columns(model, alias)]
    if not values:
        return None
    return values[0] if len(values) == 1 else \
        f"concat_ws(', ', {', '.join(values)})"


def _plans(model: type[models.Model], alias: str) -> list:
    # Imported here: normalize imports the engines package.
    from anthias_rollback.normalize import plan_columns

    return list(plan_columns(model, alias, fast=False))


def postgres_bucket_digests(alias: str, model: type[models.Model],
                            bounds: list,
                            on_rows: Callable[[int], None] | None = None
                            ) -> Digests:
    """(rows, digest) per bucket, hashed and summed in the server: one
    statement per POSTGRES_BATCH_BLOCKS heap blocks (a TID range scan,
    PostgreSQL 14+; before, one statement for the table), each row put
    in its bucket by width_bucket (_bucket_tree for a text key). Needs
    *alias*'s read snapshot."""
    from anthias_rollback.engines import postgresql as engine

    connection = connections[alias]
    quote = connection.ops.quote_name
    key = quote(model._meta.pk.column)
    kind = fields.key_kind(model)
    table = quote(model._meta.db_table)
    # PostgreSQL: COLLATE "C" compares bytes, as ~<~ and the streams do;
    # width_bucket wants the operand of the array's element type.
    ordered, array = {'text': (f'{key}::text COLLATE "C"', 'text[]'),
                      'uuid': (key, 'uuid[]')}.get(
        kind or '', (f'{key}::bigint', 'bigint[]'))
    text = postgres_row_text(model, alias)
    json = postgres_json_text(model, alias)
    if json is not None:
        text = f"concat({text}, '[', {json}, ']')"
    params: list = []
    if kind == 'text':
        bucket = _bucket_tree(ordered, list(bounds), params)
    else:
        bucket = f'width_bucket({ordered}, %s::{array})' if bounds else '0'
        params = [list(bounds)] if bounds else []
    # md5's first 60 bits as a bigint (15 hex digits); sum() of bigint
    # is an exact numeric.
    sql = (f'SELECT {bucket} AS b, count(*), '
           f"sum(('x' || left(md5({text}), 15))::bit(60)::bigint) "
           f'FROM {table}{{where}} GROUP BY b')
    with connection.cursor() as cursor:
        # LOCAL: until the end of this snapshot's transaction. The
        # datetime and date forms read ISO text (psycopg's style too); no
        # parallel workers: the SQLite side uses the other cores.
        cursor.execute("SET LOCAL DateStyle = 'ISO'")
        cursor.execute('SET LOCAL max_parallel_workers_per_gather = 0')
        # A hash table of the buckets: the planner, guessing a group per
        # row, would sort every row on disk instead (1.6 s against 1.0 s
        # for 86,000 rows). Put back after the last statement.
        cursor.execute("SELECT current_setting('enable_sort'), "
                       "set_config('enable_sort', 'off', true)")
        enable_sort = cursor.fetchone()[0]
        # After the snapshot: a row it sees is in a block counted here,
        # and the last range is open above anyway.
        cursor.execute("SELECT pg_relation_size(%s::regclass) / "
                       "current_setting('block_size')::bigint", [table])
        blocks = cursor.fetchone()[0]
    step = POSTGRES_BATCH_BLOCKS if connection.pg_version >= 140000 \
        else max(blocks, 1)
    starts = list(range(0, max(blocks, 1), step))
    sums = new_sums(bounds)
    done = 0
    for n, first in enumerate(starts):
        clauses = ([f"ctid >= '({first},0)'::tid"] if first else []) + (
            [f"ctid < '({starts[n + 1]},0)'::tid"]
            if n + 1 < len(starts) else [])
        where = f' WHERE {" AND ".join(clauses)}' if clauses else ''
        # The engine's named cursor, as every other read of a side.
        for chunk in engine.fetch_chunks(alias, sql.format(where=where),
                                         params):
            for index, rows, total in chunk:
                sums[index][0] += rows
                sums[index][1] += int(total)
                done += rows
        if on_rows is not None:
            on_rows(done)
        faults.checkpoint('compare:digest-chunk')
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('enable_sort', %s, true)",
                       [enable_sort])
    return as_digests(sums)


def _bucket_tree(column: str, bounds: list, params: list) -> str:
    """SQL: how many of the sorted *bounds* are <= *column* (what
    width_bucket returns), as a balanced tree of CASEs, its bounds
    appended to *params*: about log2(len(bounds)) comparisons a row.
    width_bucket walks an array of a variable-width type (text) from its
    start: 2.2 s per 172,000 rows with 3,905 bounds, against 0.12 s with
    64."""
    def node(low: int, high: int) -> str:
        if low == high:
            return str(low)
        middle = (low + high) // 2
        params.append(bounds[middle])
        return (f'CASE WHEN {column} < %s THEN {node(low, middle)} '
                f'ELSE {node(middle + 1, high)} END')
    return node(0, len(bounds))


# -- several processes on one side

# SQLite: at most this many processes hash one side's buckets (a
# Raspberry Pi has 4 cores).
SQLITE_MAX_WORKERS = 4


def digest_workers(alias: str) -> int:
    """How many processes may share *alias*'s bucket digests, each in
    its own read transaction (engine_bucket_digests' *part*). SQLite
    hashes in the client, so up to one per core; PostgreSQL hashes in
    the server (1). An in-memory SQLite database is not shared with
    another process (1)."""
    connection = connections[alias]
    if connection.vendor != 'sqlite' or connection.is_in_memory_db():
        return 1
    return max(1, min(os.cpu_count() or 1, SQLITE_MAX_WORKERS))


class SnapshotWatch:
    """Whether a write was committed to a SQLite file since this watch
    was made: PRAGMA data_version on a connection of its own changes
    when another connection, of any process, commits. Made before a
    read transaction starts and asked after the last of several others
    started, "unchanged" proves they all see the same snapshot."""

    def __init__(self, alias: str):
        self._db = sqlite3.connect(connections[alias].settings_dict['NAME'],
                                   isolation_level=None)
        self._db.execute('PRAGMA query_only = ON')
        self._first = self._version()

    def _version(self) -> int:
        return self._db.execute('PRAGMA data_version').fetchone()[0]

    def unchanged(self) -> bool:
        return self._version() == self._first

    def close(self) -> None:
        self._db.close()


def snapshot_watch(alias: str) -> SnapshotWatch | None:
    """A SnapshotWatch on *alias* if its digests may be split among
    processes (digest_workers > 1), else None. Make it before the
    reader's snapshot starts."""
    if digest_workers(alias) < 2:
        return None
    return SnapshotWatch(alias)


def engine_bucket_sums(alias: str, model: type[models.Model],
                       bounds: list, part: tuple[int, int],
                       on_rows: Callable[[int], None] | None = None
                       ) -> Sums:
    """The rows of slice part[0] of part[1] summed per bucket in the
    engine (only where digest_workers > 1, that is on SQLite); add the
    slices' sums (add_sums), then as_digests."""
    assert connections[alias].vendor == 'sqlite'
    return sqlite_bucket_sums(alias, model, bounds, part, on_rows)
