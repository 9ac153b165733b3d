"""The value pipeline of a copy: source column -> Python value (the
source backend's and the field's converters, strict) -> checked against
the target engine -> the target's form (get_db_prep_value, then COPY text
or a DB-API parameter). Rows with a bad value are recorded, not copied.

The fields are those of the stored values (fields.stored_field): a custom
field class moves as its column type's Django class would, so what is
copied is what the column holds, never what the class makes of it.
"""
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import connections, models

from anthias_rollback import engines, fields
from anthias_rollback.engines import ValueRejected
from anthias_rollback.engines.rows import (
    compile_row_converter,
    postgres_key_sorted_from,
    postgres_text_columns,
    postgres_text_parser,
)
from anthias_rollback.fields import (  # the key API, public here too
    is_composite_key,
    key_columns,
    key_fields,
    stored_field,
)
from anthias_rollback.report import first_line
from anthias_rollback.transfer.results import MAX_PROBLEMS, SourceProblem

__all__ = ['Converter', 'ModelSpec', 'is_composite_key', 'key_columns',
           'key_fields', 'stored_field']


def _reader(model: type[models.Model], field: models.Field,
            alias: str) -> Callable[[Any], Any] | None:
    """Source column value -> Python value, as the ORM would convert it
    (backend converters, then the field's from_db_value), but strict:
    Django turns an unparsable datetime into None and bad JSON text into
    a str, which would silently change the data; here they raise."""
    connection = connections[alias]
    expression = field.get_col(model._meta.db_table)
    converters = (connection.ops.get_db_converters(expression)
                  + expression.get_db_converters(connection))
    internal = fields.internal_type(field)
    if internal == 'DecimalField':
        # The stored number, not Django's 15-digit reading of SQLite's
        # REAL (see fields.stored_decimal).
        places = fields.value_field(field).decimal_places

        def read_decimal(value: Any) -> Any:
            if value is None:
                return None
            return fields.stored_decimal(value, places)
        return read_decimal
    if internal == 'JSONField' and engines.for_alias(alias).JSON_AS_TEXT:
        decoder = getattr(fields.value_field(field), 'decoder', None)

        def read_json(value: Any) -> Any:
            if isinstance(value, str):
                json.loads(value, cls=decoder)   # raises if malformed
            for converter in converters:
                value = converter(value, expression, connection)
            return value
        return read_json
    if not converters:
        return None

    def read(value: Any) -> Any:
        if value is None:
            return None
        raw = value
        for converter in converters:
            value = converter(value, expression, connection)
        if value is None:
            raise ValueRejected(f'value {str(raw)[:60]!r} cannot be read as '
                           f'{internal}')
        return value
    return read


@dataclass(frozen=True)
class ModelSpec:
    model: type[models.Model]
    label: str
    table: str
    fields: tuple[models.Field, ...]
    columns: tuple[str, ...]
    pk_index: int
    # Every key column's index in *fields*, in key order (one for an
    # ordinary key; pk_index is the first).
    key_indexes: tuple[int, ...] = ()

    def key_of(self, row: tuple | list) -> Any:
        """*row*'s key: the value, or the tuple for a composite key."""
        if len(self.key_indexes) == 1:
            return row[self.key_indexes[0]]
        return tuple(row[i] for i in self.key_indexes)

    @classmethod
    def of(cls, model: type[models.Model]) -> 'ModelSpec':
        meta = model._meta
        # Local fields only: a multi-table child's parent fields live in
        # the parent's table. Each through the field of its stored values
        # (a custom class's Python values may not round-trip).
        fields = tuple(stored_field(f) for f in meta.local_concrete_fields)
        columns = tuple(f.column for f in fields)
        key_indexes = tuple(columns.index(c) for c in key_columns(model))
        return cls(model, meta.label, meta.db_table, fields, columns,
                   key_indexes[0], key_indexes)

    def select_sql(self, alias: str) -> str:
        return engines.for_alias(alias).select_sql(alias, self.table,
                                                   self.fields)


class Converter:
    """Converts source rows of one model for one target, collecting the
    values the target would reject instead of stopping at the first."""

    def __init__(self, spec: ModelSpec, source_alias: str,
                 target_alias: str | None, problems: list, counter: list,
                 check_alias: str | None = None) -> None:
        """Read from *source_alias*; write for *target_alias* (None: only
        read and check); check against *check_alias*'s engine (default:
        the target's; None with no target: no checks)."""
        self.spec = spec
        self.problems = problems
        self.counter = counter
        self.steps = []
        check_alias = check_alias or target_alias
        checker = (engines.for_alias(check_alias).value_checker
                   if check_alias else None)
        writer = (engines.for_alias(target_alias).value_writer
                  if target_alias else None)
        for fld in spec.fields:
            read = _reader(spec.model, fld, source_alias)
            check = checker(fld, check_alias) \
                if checker and check_alias else None
            write = writer(fld, target_alias) \
                if writer and target_alias else None
            self.steps.append((read, check, write))
        self.funcs = [self._compose(*s) for s in self.steps]
        self.joined = bool(target_alias and engines.for_alias(
            target_alias).ROWS_AS_COPY_TEXT)
        # Columns read as the source's text (PostgreSQL -> SQLite dates);
        # their generic path parses that text as the driver would have.
        self.as_text = (postgres_text_columns(list(spec.fields),
                                              source_alias, target_alias)
                        if target_alias else {})
        for i, internal in self.as_text.items():
            self.funcs[i] = self._parsed_first(
                postgres_text_parser(internal, source_alias), self.funcs[i])
        self.row = (compile_row_converter(list(spec.fields), self.funcs,
                                          source_alias, target_alias,
                                          self.as_text)
                    if target_alias else None)
        # The whole-table read of a copy: in the target's key order where
        # that makes the target's inserts cheaper.
        self.sorted_from = (postgres_key_sorted_from(
            spec.model, source_alias, target_alias) if target_alias else '')

    def select_sql(self, alias: str) -> str:
        """The SELECT a copy reads: the model's, with the as_text columns
        cast to text, from sorted_from if there is one."""
        if not self.as_text and not self.sorted_from:
            return self.spec.select_sql(alias)
        quote = connections[alias].ops.quote_name
        columns = ', '.join(
            f'{quote(fld.column)}::text' if i in self.as_text
            else quote(fld.column) for i, fld in enumerate(self.spec.fields))
        source = self.sorted_from or quote(self.spec.table)
        return f'SELECT {columns} FROM {source}'

    @staticmethod
    def _parsed_first(parse: Callable[[Any], Any],
                      func: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def convert(value: Any) -> Any:
            return func(parse(value))
        return convert

    @staticmethod
    def _compose(read, check, write) -> Callable[[Any], Any]:
        if read is None and check is None and write is None:
            return lambda value: value
        if read is None and check is None:
            return write
        if check is None and write is None:
            return read

        def convert(value: Any) -> Any:
            if read is not None:
                value = read(value)
            if check is not None:
                check(value)
            if write is not None:
                value = write(value)
            return value
        return convert

    def convert(self, rows: list[tuple]) -> list:
        """Converted rows (COPY text lines for PostgreSQL, parameter
        tuples for SQLite, lists when only checking); rows with a bad
        value are left out and recorded."""
        try:
            if self.row is not None:
                return list(map(self.row, rows))
            funcs = self.funcs
            return [[f(v) for f, v in zip(funcs, row)] for row in rows]
        except Exception:  # noqa: BLE001 re-done value by value below
            return self._convert_slowly(rows)

    def _convert_slowly(self, rows: list[tuple]) -> list:
        done: list = []
        for row in rows:
            values, bad = [], False
            for fld, func, value in zip(self.spec.fields, self.funcs, row):
                try:
                    values.append(func(value))
                except Exception as err:  # noqa: BLE001 reported
                    bad = True
                    self.record(row, fld, value, err)
            if not bad:
                done.append('\t'.join(values) if self.joined else
                            tuple(values) if self.row else values)
        return done

    def record(self, row: tuple, fld: models.Field, value: Any,
               err: Exception) -> None:
        if isinstance(err, ValueRejected):
            reason = str(err)
        else:
            kind = fields.internal_type(fld)
            reason = (f'value {str(value)[:60]!r} cannot be read as '
                      f'{kind}: {first_line(err)}')
        self.counter[0] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(SourceProblem(
                self.spec.label, self.spec.key_of(row), fld.name, reason))
