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

A bucket's digest is md5 of its rows' texts concatenated in bytewise key
order, then, for a model with JSON columns, '[', its JSON values row by
row in PostgreSQL's jsonb text, ', ' between them, and ']' (a row text
never starts with '['; the row text holds each JSON column's storage
class, so SQL NULL, rendered "", differs from the text ''). PostgreSQL
computes it in the server (string_agg ... ORDER BY). SQLite runs one
statement per bucket over the key index: the row texts concatenated in
C, the JSON texts joined by RS in C; Python only puts each JSON value in
jsonb's shape (normalize.jsonb_array_text: SQLite keeps JSON as
written, in json.dumps' key order with unicode escapes) and hashes once
per bucket. Columns without a form here (decimal, float, duration, IP
address, a custom JSON decoder, datetimes stored in a non-UTC zone) keep
the whole model on the Python digests.

A SQLite side may split its buckets among processes
(compare/readers.py), each in its own read transaction: digest_workers
says how many, and snapshot_watch proves that no write was committed
between the reader's snapshot and the last worker's, else one process
computes every bucket.
"""
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
# PostgreSQL: buckets per statement (a batch is sorted in work_mem).
POSTGRES_BATCH = 64
# PostgreSQL: work_mem while hashing (a batch's sort: about 6 MB at
# 370 bytes a row).
POSTGRES_WORK_MEM = '32MB'
# Progress is reported every this many SQLite buckets.
SQLITE_REPORT_EVERY = 32

Digests = list[tuple[int, bytes]]


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
                          on_rows: Callable[[int], None] | None = None,
                          part: tuple[int, int] | None = None) -> Digests:
    """(rows, md5) per bucket: bucket i holds keys in
    [bounds[i-1], bounds[i]). One statement per bucket over the key
    index; the row texts are concatenated in C, the JSON values put in
    jsonb's shape in Python (normalize.jsonb_array_text), the hashing is
    once per bucket. *part*: only buckets first..last-1 (None: all).
    Needs *alias*'s read snapshot."""
    from anthias_rollback.engines import sqlite as engine
    from anthias_rollback.normalize import jsonb_array_text

    connection = connections[alias]
    quote = connection.ops.quote_name
    key = quote(model._meta.pk.column)
    kind = fields.key_kind(model)
    order = engine.byte_order(key, kind == 'text')
    text = sqlite_row_text(model, alias)
    json = json_columns(model, alias)
    table = quote(model._meta.db_table)
    # One statement per bucket, all of it in C but the JSON: the row
    # texts concatenated, each JSON column's texts joined by RS (U+001E),
    # which valid JSON never holds raw; a value holding one makes the
    # pieces outnumber the rows and the bucket is read value by value.
    # NULL and a value that is not text (its row text marks it already)
    # go in as ''.
    cases = [f"CASE typeof({column}) WHEN 'text' THEN {column} ELSE '' "
             f'END' for column in json]
    selected = ''.join(f', {case} AS j{i}'
                       for i, case in enumerate(cases))
    lists = ''.join(f', group_concat(j{i}, char(30))'
                    for i in range(len(json)))
    sql = (f'SELECT count(*), CAST(group_concat(t, \'\') AS BLOB){lists} '
           f'FROM (SELECT {text} AS t{selected} FROM {table}{{where}} '
           f'ORDER BY {order})')
    # The same values a row at a time (a bucket whose JSON holds an RS).
    by_row = (f'SELECT {", ".join(cases)} FROM {table}{{where}} '
              f'ORDER BY {order}')
    first, last = part or (0, len(bounds) + 1)
    digests: Digests = []
    done = 0
    connection.ensure_connection()
    raw = connection.connection
    with connection.wrap_database_errors:
        cursor = raw.cursor()
        try:
            for index in range(first, last):
                low = bounds[index - 1] if index else None
                high = bounds[index] if index < len(bounds) else None
                clause, params = engine.key_range_clause(key, kind, low,
                                                         high)
                where = f' WHERE {clause}' if clause else ''
                cursor.execute(sql.format(where=where), params)
                rows, texts, *joined = cursor.fetchone()
                if rows and json:
                    values = _json_values(joined, rows)
                    if values is None:
                        values = [value for row in cursor.execute(
                            by_row.format(where=where), params)
                            for value in row]
                    digests.append(_digest(rows, texts, jsonb_array_text(
                        values).encode('utf-8', 'surrogatepass')))
                else:
                    digests.append(_digest(rows, texts))
                done += rows
                if (index - first) % SQLITE_REPORT_EVERY == 0 \
                        or index == last - 1:
                    if on_rows is not None:
                        on_rows(done)
                    faults.checkpoint('compare:digest-chunk')
        finally:
            cursor.close()
    return digests


def _json_values(joined: list[str], rows: int) -> list[str] | None:
    """A bucket's JSON texts, row by row, from each JSON column's texts
    joined by RS; None if a text held an RS."""
    columns = [text.split('\x1e') for text in joined]
    if any(len(column) != rows for column in columns):
        return None
    if len(columns) == 1:
        return columns[0]
    return [value for row in zip(*columns) for value in row]


def _digest(rows: int, *texts: Any) -> tuple[int, bytes]:
    if not rows:
        return 0, b''
    digest = hashlib.md5(usedforsecurity=False)
    for text in texts:
        digest.update(text)
    return rows, digest.digest()


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
    """(rows, md5) per bucket, hashed in the server: one statement per
    POSTGRES_BATCH buckets (a key range), grouped by width_bucket over
    the batch's inner bounds. Needs *alias*'s read snapshot."""
    from anthias_rollback.engines import postgresql as engine

    connection = connections[alias]
    quote = connection.ops.quote_name
    key = quote(model._meta.pk.column)
    kind = fields.key_kind(model)
    # PostgreSQL: COLLATE "C" compares bytes, as ~<~ and the streams do;
    # width_bucket wants the operand of the array's element type.
    ordered, array = {'text': (f'{key}::text COLLATE "C"', 'text[]'),
                      'uuid': (key, 'uuid[]')}.get(
        kind or '', (f'{key}::bigint', 'bigint[]'))
    text = (f"string_agg({postgres_row_text(model, alias)}, '' "
            f'ORDER BY {ordered})')
    json = postgres_json_text(model, alias)
    if json is not None:
        # The bytes SQLite's side hashes: the row texts, then '[', the
        # JSON values, ']' (no row text starts with '[').
        text += (f" || '[' || string_agg({json}, ', ' ORDER BY {ordered})"
                 f" || ']'")
    sql = (f"SELECT width_bucket({ordered}, %s::{array}) AS b, count(*), "
           f"decode(md5({text}), 'hex') "
           f'FROM {quote(model._meta.db_table)}{{where}} GROUP BY b')
    with connection.cursor() as cursor:
        # LOCAL: until the end of this snapshot's transaction. The
        # datetime and date forms read ISO text (psycopg's style too); a
        # batch's sort (some MB) stays in memory; no parallel workers:
        # the SQLite side uses the other cores.
        cursor.execute("SET LOCAL DateStyle = 'ISO'")
        cursor.execute(f"SET LOCAL work_mem = '{POSTGRES_WORK_MEM}'")
        cursor.execute('SET LOCAL max_parallel_workers_per_gather = 0')
    total = len(bounds) + 1
    digests: Digests = []
    done = 0
    for first in range(0, total, POSTGRES_BATCH):
        last = min(first + POSTGRES_BATCH, total)  # exclusive
        low = bounds[first - 1] if first else None
        high = bounds[last - 1] if last - 1 < len(bounds) else None
        clause, params = engine.key_range_clause(key, kind, low, high)
        where = f' WHERE {clause}' if clause else ''
        inner = list(bounds[first:last - 1])
        # The engine's named cursor, as every other read of a side.
        found = {b: (rows, bytes(md5)) for chunk in engine.fetch_chunks(
            alias, sql.format(where=where), [inner, *params])
            for b, rows, md5 in chunk}
        for offset in range(last - first):
            digests.append(found.get(offset, (0, b'')))
            done += digests[-1][0]
        if on_rows is not None:
            on_rows(done)
        faults.checkpoint('compare:digest-chunk')
    return digests


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


def engine_bucket_digests(alias: str, model: type[models.Model],
                          bounds: list, part: tuple[int, int],
                          on_rows: Callable[[int], None] | None = None
                          ) -> Digests:
    """Buckets part[0]..part[1]-1 of *bounds* hashed in the engine
    (only where digest_workers > 1, that is on SQLite)."""
    assert connections[alias].vendor == 'sqlite'
    return sqlite_bucket_digests(alias, model, bounds, on_rows, part)
