"""Engine-neutral values: what a Django field makes of a database value.

A value read from either engine goes through the backend's and the field's
converters (exactly what `values_list()` applies: the backend's
`get_db_converters` and the field's `from_db_value`), then through one
canonical form per field type. Canonical values are only None, bool, int,
float and str, so equal rows give equal tuples and equal `repr()`s on any
engine, and a checksum over them means the same thing on both sides.

The conversion is column-wise on whole chunks: a Python-level call per
value is the cost that matters at 1,000,000 rows.
"""
import datetime as dt
import decimal
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections, models

Canonical = Callable[[Any], Any]

_UTC = dt.timezone.utc
_MICROSECOND = dt.timedelta(microseconds=1)


def canonical_json(value: Any) -> str:
    # Key order and whitespace are storage details (SQLite keeps the text
    # as written, PostgreSQL jsonb reorders keys): sort and compact.
    return json.dumps(value, sort_keys=True, ensure_ascii=False,
                      separators=(',', ':'))


def canonical_decimal(value: Any) -> str:
    # Scale is a storage detail: PostgreSQL numeric(12,4) returns 1.5000,
    # SQLite's REAL-backed column 1.5 before Django quantizes it.
    if not isinstance(value, decimal.Decimal):
        value = decimal.Decimal(str(value))
    if not value.is_finite():
        return str(value)
    if value.is_zero():
        return '0'
    return format(value.normalize(), 'f')


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


def value_field(field: models.Field) -> models.Field:
    """The field that gives a column its values (FK -> its target)."""
    while field.is_relation:
        field = field.target_field
    return field


def canonical_for(field: models.Field) -> Canonical | None:
    """Canonical form of *field*'s converted values (None: as is)."""
    internal = value_field(field).get_internal_type()
    return _CANONICAL_BY_TYPE.get(internal, canonical_text)


@dataclass(frozen=True)
class ColumnPlan:
    """How to read and normalize one concrete field on one alias."""
    field: models.Field
    column: str
    expression: Any
    converters: tuple[Callable, ...]
    canonical: Canonical | None


def plan_columns(model: type[models.Model], alias: str
                 ) -> tuple[ColumnPlan, ...]:
    """Concrete fields of *model*, pk first, with *alias*'s converters."""
    connection = connections[alias]
    meta = model._meta
    fields = [meta.pk] + [f for f in meta.concrete_fields
                          if f is not meta.pk]
    plans = []
    for field in fields:
        col = field.get_col(meta.db_table)
        # As SQLCompiler.get_converters: backend converters, then field's.
        converters = (connection.ops.get_db_converters(col)
                      + col.get_db_converters(connection))
        plans.append(ColumnPlan(field, field.column, col, tuple(converters),
                                canonical_for(field)))
    return tuple(plans)


def normalize_chunk(rows: Sequence[tuple], plans: Sequence[ColumnPlan],
                    alias: str) -> list[list[Any]]:
    """Raw rows -> canonical columns (a list per column, same order)."""
    if not rows:
        return [[] for _ in plans]
    connection = connections[alias]
    columns = []
    for plan, column in zip(plans, zip(*rows)):
        values: Sequence[Any] = column
        for converter in plan.converters:
            expr = plan.expression
            values = [converter(v, expr, connection) for v in values]
        canonical = plan.canonical
        if canonical is not None:
            values = [None if v is None else canonical(v) for v in values]
        columns.append(values if isinstance(values, list) else list(values))
    return columns
