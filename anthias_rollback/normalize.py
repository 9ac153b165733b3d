"""Engine-neutral values: what a column's type makes of a database value.

A value read from either engine goes through the backend's and the
converters of the field of its stored values (fields.stored_field: the
field itself for Django's own classes, else a Django field of the same
column type, so a custom class's from_db_value never runs), then through
one canonical form per field type. Decimals skip Django's converters
(fields.stored_decimal). Canonical values are only None, bool, int,
float and str, so equal rows give equal tuples and equal `repr()`s on any
engine, and a checksum over them means the same thing on both sides.

The conversion is column-wise on whole chunks: a Python-level call per
value is the cost that matters at 1,000,000 rows.
"""
import datetime as dt
import decimal
import json
import json.encoder
import json.scanner
import math
import operator
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections, models

from anthias_rollback import engines
from anthias_rollback.fields import (
    key_fields,
    stored_decimal,
    stored_field,
    value_field,
)

Canonical = Callable[[Any], Any]

_UTC = dt.UTC
_MICROSECOND = dt.timedelta(microseconds=1)


# Key order and whitespace are storage details (SQLite keeps the text as
# written, PostgreSQL jsonb reorders keys): sort and compact. One encoder
# instance: json.dumps() would build one per value.
_encoder = json.JSONEncoder(sort_keys=True, ensure_ascii=False,
                            separators=(',', ':'))
_encode_json = _encoder.encode
# The C encoder behind json.dumps, built once (json builds it per call);
# same arguments as `_encoder`, checked against it in the tests.
# (not in typeshed; None without the C speedups)
_c_make_encoder = getattr(json.encoder, 'c_make_encoder', None)
_c_encode = _c_make_encoder(
    None, _encoder.default, json.encoder.encode_basestring, None, ':', ',',
    True, False, True) if _c_make_encoder else None


def _dumps(value: Any) -> str:
    if _c_encode is None or isinstance(value, str):
        return _encode_json(value)
    return ''.join(_c_encode(value, 0))
_decode_json = json.JSONDecoder().decode
_scan_json = json.scanner.make_scanner(
    json.JSONDecoder())  # type: ignore[arg-type]  # typeshed: the context


def _loads(text: str) -> Any:
    # json.loads() without its per-call checks: the C scanner, and the
    # full decoder only for text with surrounding whitespace.
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return _decode_json(text)
    if end != len(text):
        return _decode_json(text)
    return value


def canonical_json(value: Any) -> str:
    return _encode_json(value)


_WIDE_DECIMALS = decimal.Context(prec=2000)


def canonical_decimal(value: Any) -> str:
    # Scale is a storage detail: PostgreSQL numeric(12,4) returns 1.5000,
    # SQLite's REAL-backed column 1.5 before Django quantizes it.
    if not isinstance(value, decimal.Decimal):
        value = decimal.Decimal(str(value))
    if not value.is_finite():
        return str(value)
    if value.is_zero():
        return '0'
    # Not the default context: its 28 digits would round a
    # DecimalField(max_digits=30) and hide a change in the last ones.
    return format(value.normalize(_WIDE_DECIMALS), 'f')


def canonical_datetime(value: Any) -> str:
    # Aware values are compared as UTC instants: PostgreSQL returns them in
    # the session time zone, Django's SQLite converter in the connection's.
    if value.tzinfo is not None:
        value = value.astimezone(_UTC).replace(tzinfo=None)
    return value.isoformat(sep=' ', timespec='microseconds')


def canonical_time(value: Any) -> str:
    return value.isoformat(timespec='microseconds')


def canonical_date(value: Any) -> str:
    return value.isoformat()


def canonical_duration(value: Any) -> int:
    return value // _MICROSECOND


def canonical_binary(value: Any) -> str:
    # psycopg2 returns memoryview, sqlite3 bytes.
    return bytes(value).hex()


def canonical_uuid(value: Any) -> str:
    # SQLite stores char(32) hex, PostgreSQL a uuid: compare the hex.
    if isinstance(value, uuid.UUID):
        return value.hex
    return uuid.UUID(str(value)).hex


def canonical_float(value: Any) -> Any:
    value = float(value)
    return 'NaN' if math.isnan(value) else value  # NaN != NaN


def canonical_text(value: Any) -> Any:
    return value if isinstance(value, (str, int)) else str(value)


# Internal types whose converted values are already canonical (int, bool,
# str) map to None: no per-value call at all.
_CANONICAL_BY_TYPE: dict[str, Canonical | None] = {
    'AutoField': None, 'BigAutoField': None, 'SmallAutoField': None,
    'IntegerField': None, 'BigIntegerField': None,
    'SmallIntegerField': None, 'PositiveIntegerField': None,
    'PositiveBigIntegerField': None, 'PositiveSmallIntegerField': None,
    'BooleanField': None, 'NullBooleanField': None,
    'CharField': None, 'TextField': None, 'SlugField': None,
    'EmailField': None, 'URLField': None, 'FilePathField': None,
    'FileField': canonical_text, 'ImageField': canonical_text,
    'GenericIPAddressField': canonical_text,
    'IPAddressField': canonical_text,
    'JSONField': canonical_json,
    'DecimalField': canonical_decimal,
    'DateTimeField': canonical_datetime,
    'DateField': canonical_date,
    'TimeField': canonical_time,
    'DurationField': canonical_duration,
    'BinaryField': canonical_binary,
    'UUIDField': canonical_uuid,
    'FloatField': canonical_float,
}


def canonical_for(field: models.Field) -> Canonical | None:
    """Canonical form of *field*'s converted values (None: as is)."""
    internal = value_field(field).get_internal_type()
    return _CANONICAL_BY_TYPE.get(internal, canonical_text)


@dataclass(frozen=True)
class ColumnPlan:
    """How to read and normalize one concrete field on one alias.

    `sql` is the select expression; `fast` (when set) turns the whole raw
    column into canonical values at once and is used instead of the
    field's converters. Fast paths exist only where they give exactly
    what the converters + canonical form give (tests/test_compare.py
    checks this on both engines for every kitchen-sink field).
    """
    field: models.Field
    column: str
    sql: str
    expression: Any
    converters: tuple[Callable, ...]
    canonical: Canonical | None
    fast: Callable[[Sequence[Any]], list] | None = None


# Column forms: the engine modules' `fast_column(plan, alias, quoted)`
# picks a select expression per field and builds its fast path from
# these, so the engine-specific choices live behind engines.for_alias.

def slow_values(plan: 'ColumnPlan', alias: str) -> Callable[[Any], Any]:
    """The field's own conversion of one raw value (fast-path fallback)."""
    def convert(value: Any) -> Any:
        for converter in plan.converters:
            value = converter(value, plan.expression, connections[alias])
        if value is None or plan.canonical is None:
            return value
        return plan.canonical(value)
    return convert


def json_column(slow: Callable[[Any], Any]) -> Callable[[Sequence], list]:
    # As JSONField.from_db_value (json.loads, text kept if not JSON),
    # then the canonical text; values already decoded take the slow path.
    def fast(values: Sequence[Any]) -> list:
        out: list[str | None] = []
        for value in values:
            if value is None:
                out.append(None)
            elif isinstance(value, str):
                try:
                    out.append(_dumps(_loads(value)))
                except ValueError:
                    out.append(_encode_json(value))
            else:
                out.append(slow(value))
        return out
    return fast


def padded_text_column(full: int, mark: tuple[int, str],
                       slow: Callable[[Any], Any]
                       ) -> Callable[[Sequence], list]:
    """SQLite text already in canonical shape (`...SS.ffffff`, *full*
    long) or without the fraction; anything else takes the slow path.
    *mark* is a (position, character) that must match too."""
    short = full - 7
    pos, char = mark

    def pad(v: Any) -> Any:
        if type(v) is str and len(v) == short and v[pos:pos + 1] == char:
            return v + '.000000'
        return slow(v)

    def fast(values: Sequence[Any]) -> list:
        return [v if v is None or (type(v) is str and len(v) == full
                                   and v[short] == '.' and v[pos] == char)
                else pad(v) for v in values]
    return fast


def date_column(slow: Callable[[Any], Any]) -> Callable[[Sequence], list]:
    def fast(values: Sequence[Any]) -> list:
        return [v if v is None or (type(v) is str and len(v) == 10
                                   and v[4] == '-') else slow(v)
                for v in values]
    return fast


def identity(values: Sequence[Any]) -> list:
    return values if isinstance(values, list) else list(values)


# ------------------------------------------------------------ digest forms
#
# Checksum mode compares bucket digests first and re-reads mismatching
# buckets through the exact forms above. A digest form may differ from
# the exact one, if equal digest forms still imply equal exact values:
# then a false mismatch costs a re-read and a false match cannot happen.
# They are chosen so that each engine does the least work per value:
# SQLite datetimes stay the text Django wrote (PostgreSQL prints that
# shape), PostgreSQL JSON stays jsonb text (SQLite's is put in that
# shape: keys by length then bytes, ", " and ": ", no \u escapes).

def _jsonb_key(pair: tuple[str, Any]) -> tuple[int, bytes]:
    raw = pair[0].encode('utf-8', 'surrogatepass')
    return len(raw), raw


# jsonb's key order of each tuple of keys seen: a JSON column repeats few
# key sets, so an object costs a lookup, not a sort by a Python key.
_KEY_ORDERS: dict[tuple[str, ...], tuple[int, ...]] = {}
_KEY_ORDERS_MAX = 4096
_first = operator.itemgetter(0)


def _jsonb_object(pairs: list[tuple[str, Any]]) -> dict:
    if len(pairs) < 2:
        return dict(pairs)
    keys = tuple(map(_first, pairs))
    order = _KEY_ORDERS.get(keys)
    if order is None:
        # Stable: of duplicate keys dict() keeps the last, as jsonb does.
        order = tuple(sorted(range(len(pairs)),
                             key=lambda i: _jsonb_key(pairs[i])))
        if len(_KEY_ORDERS) >= _KEY_ORDERS_MAX:
            _KEY_ORDERS.clear()
        _KEY_ORDERS[keys] = order
    return dict(map(pairs.__getitem__, order))


_scan_jsonb = json.scanner.make_scanner(
    json.JSONDecoder(  # type: ignore[arg-type]  # typeshed: the context
        object_pairs_hook=_jsonb_object))
_c_encode_jsonb = _c_make_encoder(
    None, _encoder.default, json.encoder.encode_basestring, None, ': ',
    ', ', False, False, True) if _c_make_encoder else None
_encode_jsonb = json.JSONEncoder(ensure_ascii=False).encode


def _jsonb_value(text: str) -> Any:
    # What jsonb_text prints: objects' keys already in jsonb's order;
    # text that is not JSON stays the string Django reads.
    try:
        value, end = _scan_jsonb(text, 0)
        if end != len(text):
            value = json.JSONDecoder(
                object_pairs_hook=_jsonb_object).decode(text)
    except (StopIteration, ValueError):
        value = text
    return value


def jsonb_text(text: str) -> str:
    """JSON text as PostgreSQL prints the same value stored as jsonb
    (text that is not JSON: as Django reads it, a string)."""
    value = _jsonb_value(text)
    if _c_encode_jsonb is None or isinstance(value, str):
        return _encode_jsonb(value)
    return ''.join(_c_encode_jsonb(value, 0))


def without_zero_fraction(slow: Callable[[Any], Any]) -> Callable:
    # Python's isoformat() (what Django writes to SQLite) omits a zero
    # fraction; the exact form always has six digits.
    def convert(value: Any) -> Any:
        text = slow(value)
        return text.removesuffix('.000000') if type(text) is str else text
    return convert


def text_or(convert: Callable[[Any], Any]) -> Callable[[Sequence], list]:
    def fast(values: Sequence[Any]) -> list:
        return [v if v is None or type(v) is str else convert(v)
                for v in values]
    return fast


def all_through(convert: Callable[[Any], Any]
                ) -> Callable[[Sequence], list]:
    def fast(values: Sequence[Any]) -> list:
        return [None if v is None else convert(v) for v in values]
    return fast


def json_digest_column(slow: Callable[[Any], Any]
                       ) -> Callable[[Sequence], list]:
    def fast(values: Sequence[Any]) -> list:
        return [None if v is None else jsonb_text(v) if type(v) is str
                else slow(v) for v in values]
    return fast


def _stored_decimal_canonical(places: int) -> Canonical:
    def canonical(value: Any) -> str:
        return canonical_decimal(stored_decimal(value, places))
    return canonical


def key_width(model: type[models.Model]) -> int:
    """How many of plan_columns' first columns make the key."""
    return len(key_fields(model))


def plan_columns(model: type[models.Model], alias: str, fast: bool = True,
                 digest: bool = False) -> tuple[ColumnPlan, ...]:
    """Concrete columns of *model*'s table, the key's first (several for
    a composite key: key_width), each through the field of its stored
    values (fields.stored_field), with *alias*'s converters
    (and engine fast paths unless *fast* is False; with *digest*, the
    digest forms where they differ from the exact ones)."""
    connection = connections[alias]
    engine = engines.for_alias(alias) if fast else None
    quote = connection.ops.quote_name
    meta = model._meta
    keys = key_fields(model)
    # The key's columns first; then this table's own columns only (a
    # multi-table child's parent fields live in the parent's table).
    fields = [stored_field(f) for f in (*keys, *(
        f for f in meta.local_concrete_fields if f not in keys))]
    plans = []
    for field in fields:
        col = field.get_col(meta.db_table)
        # As SQLCompiler.get_converters: backend converters, then field's.
        converters = (connection.ops.get_db_converters(col)
                      + col.get_db_converters(connection))
        canonical = canonical_for(field)
        typed = value_field(field)
        if typed.get_internal_type() == 'DecimalField':
            # The stored number, not Django's 15-digit reading of
            # SQLite's REAL (fields.stored_decimal).
            converters = []
            canonical = _stored_decimal_canonical(typed.decimal_places)
        plan = ColumnPlan(field, field.column, quote(field.column), col,
                          tuple(converters), canonical)
        if engine is not None and not field.primary_key:
            sql, fast_path = engine.fast_column(plan, alias, plan.sql,
                                                digest=digest)
            if fast_path is not None:
                plan = ColumnPlan(field, field.column, sql, col,
                                  tuple(converters), plan.canonical,
                                  fast_path)
        plans.append(plan)
    return tuple(plans)


def normalize_chunk(rows: Sequence[tuple], plans: Sequence[ColumnPlan],
                    alias: str) -> list[list[Any]]:
    """Raw rows -> canonical columns (a list per column, same order)."""
    if not rows:
        return [[] for _ in plans]
    connection = connections[alias]
    columns = []
    for plan, column in zip(plans, zip(*rows)):
        if plan.fast is not None:
            columns.append(plan.fast(column))
            continue
        values: Sequence[Any] = column
        for converter in plan.converters:
            expr = plan.expression
            values = [converter(v, expr, connection) for v in values]
        canonical = plan.canonical
        if canonical is not None:
            values = [None if v is None else canonical(v) for v in values]
        columns.append(values if isinstance(values, list) else list(values))
    return columns
