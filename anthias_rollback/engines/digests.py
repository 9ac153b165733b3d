"""Bucket digests computed inside each engine (checksum mode).

Each column gets an SQL expression that renders its stored value as text,
the same text on both engines for equal canonical values (normalize.py):
integers and booleans as digits, datetimes, dates and times in Python's
isoformat shape, UUIDs as 32 hex digits, binaries as lowercase hex, each
followed by ','; text and JSON as `<bytes>:<text>`; NULL as '~'. Every
form is self-delimiting, so a row's concatenation is injective. SQLite
renders a value whose storage class is not the expected one as '!',
which PostgreSQL never prints: that bucket mismatches and goes to the
exact comparison, so a rendering difference costs time, never
correctness. Only a false match would be wrong, so each form must be
injective on values the canonical forms tell apart.

A bucket's digest is md5 of its rows' texts concatenated in bytewise key
order: PostgreSQL computes it in the server (string_agg ... ORDER BY);
SQLite concatenates in C (group_concat over a key-ordered subquery) and
Python hashes the result once per bucket. Columns without a form here
(decimal, float, duration, IP address, a custom JSON decoder, datetimes
stored in a non-UTC zone) keep the whole model on the Python digests.

JSON is PostgreSQL's jsonb text on both sides. SQLite keeps JSON as
written (json.dumps order, unicode escapes) and cannot reorder keys in SQL
(json_each per row measured slower than Python), so for a model with
JSON columns SQLite returns each row's text in pieces around them and
Python puts each JSON value in jsonb's shape (normalize.jsonb_text, C
parser and encoder) between them: one call per JSON value, the rest
stays in C. PostgreSQL needs no Python at all.
"""
import hashlib
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

def _sqlite_form(column: str, kind: str) -> str:
    def typed(storage: str, then: str) -> str:
        return (f"CASE typeof({column}) WHEN '{storage}' THEN {then} "
                f"WHEN 'null' THEN '~' ELSE '!' END")

    if kind == 'int':
        return typed('integer', f"{column} || ','")
    if kind == 'bool':
        return typed('integer', f"CASE {column} WHEN 1 THEN '1,' "
                                f"WHEN 0 THEN '0,' ELSE '!' END")
    if kind == 'text':
        return typed('text', f"length(CAST({column} AS BLOB)) || ':' "
                             f'|| {column}')
    if kind == 'binary':
        return typed('blob', f"lower(hex({column})) || ','")

    def shaped(lengths: dict[int, str], dot: int) -> str:
        # Django writes isoformat() text: a zero fraction is omitted.
        cases = ' '.join(
            f"WHEN {n} THEN {column} || '{suffix},'" if n != dot + 6 else
            f"WHEN {n} THEN CASE substr({column}, {dot}, 1) WHEN '.' "
            f"THEN {column} || ',' ELSE '!' END"
            for n, suffix in lengths.items())
        return typed('text', f"CASE length({column}) {cases} ELSE '!' END")

    def fixed(length: int) -> str:
        return typed('text', f"CASE length({column}) WHEN {length} THEN "
                             f"{column} || ',' ELSE '!' END")

    if kind == 'datetime':
        return shaped({19: '.000000', 26: ''}, 20)
    if kind == 'time':
        return shaped({8: '.000000', 15: ''}, 9)
    if kind == 'date':
        return fixed(10)
    if kind == 'uuid':
        return fixed(32)
    raise ValueError(kind)


def sqlite_row_pieces(model: type[models.Model], alias: str
                      ) -> list[str]:
    """SQL select expressions: one row's text on SQLite, split around
    its JSON columns (odd positions: a JSON column as stored)."""
    pieces: list[str] = []
    run: list[str] = []
    for column, kind in digest_columns(model, alias):
        if kind == 'json':
            pieces += [' || '.join(run) or "''", column]
            run = []
        else:
            run.append(_sqlite_form(column, kind))
    return [*pieces, ' || '.join(run) or "''"]


def _jsonb_piece(value: Any) -> str:
    # As PostgreSQL's form below: <bytes>:<jsonb text>, NULL '~'.
    from anthias_rollback.normalize import jsonb_text

    if value is None:
        return '~'
    if type(value) is not str:
        return '!'   # not Django's JSON text: compared exactly
    text = jsonb_text(value)
    return f'{len(text.encode())}:{text}'


def sqlite_row_text(model: type[models.Model], alias: str) -> str:
    """SQL expression: one row's text on SQLite (no JSON columns)."""
    pieces = sqlite_row_pieces(model, alias)
    assert len(pieces) == 1   # JSON needs sqlite_row_pieces
    return pieces[0]


def sqlite_bucket_digests(alias: str, model: type[models.Model],
                          bounds: list,
                          on_rows: Callable[[int], None] | None = None
                          ) -> Digests:
    """(rows, md5) per bucket: bucket i holds keys in
    [bounds[i-1], bounds[i]). One statement per bucket over the key
    index; the concatenation is done in C, the hashing once per bucket.
    Needs *alias*'s read snapshot."""
    from anthias_rollback.engines import sqlite as engine

    connection = connections[alias]
    quote = connection.ops.quote_name
    key = quote(model._meta.pk.column)
    kind = fields.key_kind(model)
    order = engine.byte_order(key, kind == 'text')
    pieces = sqlite_row_pieces(model, alias)
    table = quote(model._meta.db_table)
    if len(pieces) == 1:
        sql = (f'SELECT count(*), CAST(group_concat(t, \'\') AS BLOB) '
               f'FROM (SELECT {pieces[0]} AS t FROM {table}{{where}} '
               f'ORDER BY {order})')
    else:
        sql = (f'SELECT {", ".join(pieces)} FROM {table}{{where}} '
               f'ORDER BY {order}')
    digests: Digests = []
    done = 0
    connection.ensure_connection()
    raw = connection.connection
    with connection.wrap_database_errors:
        cursor = raw.cursor()
        try:
            for index in range(len(bounds) + 1):
                low = bounds[index - 1] if index else None
                high = bounds[index] if index < len(bounds) else None
                clause, params = engine.key_range_clause(key, kind, low,
                                                         high)
                where = f' WHERE {clause}' if clause else ''
                cursor.execute(sql.format(where=where), params)
                if len(pieces) == 1:
                    rows, text = cursor.fetchone()
                else:
                    found = cursor.fetchall()
                    rows, text = len(found), _join_pieces(found)
                digests.append(_digest(rows, text))
                done += rows
                if index % SQLITE_REPORT_EVERY == 0 \
                        or index == len(bounds):
                    if on_rows is not None:
                        on_rows(done)
                    faults.checkpoint('compare:digest-chunk')
        finally:
            cursor.close()
    return digests


def _join_pieces(found: list[tuple]) -> bytes:
    """Rows of (text, JSON, text, ...) pieces as one bucket text."""
    parts: list[str] = []
    append = parts.append
    for row in found:
        for index, piece in enumerate(row):
            append(_jsonb_piece(piece) if index % 2 else piece)
    return ''.join(parts).encode('utf-8', 'surrogatepass')


def _digest(rows: int, text: Any) -> tuple[int, bytes]:
    if not rows:
        return 0, b''
    return rows, hashlib.md5(text, usedforsecurity=False).digest()


# -- PostgreSQL

def _postgres_form(column: str, kind: str) -> str:
    def coalesced(text: str) -> str:
        return f"coalesce({text}, '~')"

    if kind == 'int':
        return coalesced(f"{column}::text || ','")
    if kind == 'bool':
        return (f"CASE WHEN {column} THEN '1,' WHEN NOT {column} THEN '0,' "
                f"ELSE '~' END")
    if kind == 'text':
        return coalesced(f"octet_length({column})::text || ':' "
                         f'|| {column}::text')
    if kind == 'json':
        return coalesced(f"octet_length({column}::text)::text || ':' "
                         f'|| {column}::text')
    if kind == 'binary':
        return coalesced(f"encode({column}, 'hex') || ','")
    if kind == 'datetime':
        return coalesced(f"to_char({column} AT TIME ZONE 'UTC', "
                         f"'YYYY-MM-DD HH24:MI:SS.US') || ','")
    if kind == 'time':
        return coalesced(f"to_char({column}, 'HH24:MI:SS.US') || ','")
    if kind == 'date':
        return coalesced(f"to_char({column}, 'YYYY-MM-DD') || ','")
    if kind == 'uuid':
        return coalesced(f"replace({column}::text, '-', '') || ','")
    raise ValueError(kind)


def postgres_row_text(model: type[models.Model], alias: str) -> str:
    """SQL expression: one row's text on PostgreSQL."""
    return ' || '.join(_postgres_form(column, kind)
                       for column, kind in digest_columns(model, alias))


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
    sql = (f"SELECT width_bucket({ordered}, %s::{array}) AS b, count(*), "
           f"decode(md5(string_agg({postgres_row_text(model, alias)}, '' "
           f"ORDER BY {ordered})), 'hex') "
           f'FROM {quote(model._meta.db_table)}{{where}} GROUP BY b')
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
