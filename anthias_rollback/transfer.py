"""Stream every row of every model from one alias into another.

The same engine runs both ways: SQLite -> PostgreSQL (`migrate_to_postgres`)
and PostgreSQL -> a fresh SQLite file (the zero-loss rollback). Values go
through the model fields (the source backend's and field's converters,
then the field's `get_db_prep_value` for the target), so JSON, tz-aware
datetimes, durations, UUIDs, Decimals and binary land exactly.

One consistent snapshot of the source (one read transaction), one
transaction on the target: if anything fails the target is as before.
No model is saved through `Model.save()`, so no signal fires.
"""
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import import_module
from io import StringIO
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.db import DatabaseError, connections, models, transaction
from django.db.migrations.recorder import MigrationRecorder

from anthias_rollback import conf, engines, schema
from anthias_rollback.engines import postgresql as pg
from anthias_rollback.engines import sqlite as lite
from anthias_rollback.engines.rows import (
    compile_row_converter,
    sqlite_json_columns,
)
from anthias_rollback.exceptions import (
    PreflightError,
    SchemaMismatchError,
    TransferError,
)
from anthias_rollback.faults import checkpoint
from anthias_rollback.locking import operation_lock
from anthias_rollback.models_graph import plan_models
from anthias_rollback.report import describe_alias, first_line

DEFAULT_BATCH_SIZE = 5000
# Problems kept in full (the count is always exact); enough to fix a
# legacy database in one go without an unbounded message.
MAX_PROBLEMS = 1000
# Rough rate for the --dry-run estimate (rows/s, 2-core ARM-class board).
ESTIMATE_ROWS_PER_SECOND = 60_000
MIGRATIONS_LABEL = 'migrations.Migration'

Progress = Callable[['TransferEvent'], None] | None


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class TransferEvent:
    """What progress callables receive."""
    kind: str  # 'phase' | 'model_start' | 'batch' | 'model_done'
    label: str
    rows: int = 0              # rows done so far in this model
    total: int | None = None   # rows in this model (source snapshot)
    seconds: float = 0.0


@dataclass(frozen=True)
class SourceProblem:
    """A source value the target would reject."""
    model: str
    pk: Any
    field: str
    reason: str

    def __str__(self) -> str:
        return f'{self.model} pk={self.pk!r} field {self.field}: ' \
               f'{self.reason}'


@dataclass(frozen=True)
class ModelTransfer:
    label: str
    table: str
    rows: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class TransferResult:
    source: str   # describe_alias() of each side
    target: str
    models: tuple[ModelTransfer, ...]
    truncated: tuple[str, ...]   # target tables emptied first
    rows: int
    seconds: float


@dataclass(frozen=True)
class ModelRepair:
    label: str
    inserted: int
    updated: int
    deleted: int


@dataclass(frozen=True)
class RepairResult:
    source: str
    target: str
    models: tuple[ModelRepair, ...]
    seconds: float

    @property
    def changed(self) -> int:
        return sum(m.inserted + m.updated + m.deleted for m in self.models)


@dataclass(frozen=True)
class PlannedModel:
    label: str
    table: str
    source_rows: int
    target_rows: int
    truncate: bool   # target rows that would be deleted first


@dataclass(frozen=True)
class TransferPlan:
    source: str
    target: str
    mode: str                      # 'copy' | 'replace' | 'repair'
    models: tuple[PlannedModel, ...]
    pending_migrations: tuple[str, ...]   # `migrate` would apply these
    problems: tuple[SourceProblem, ...]
    problem_count: int
    estimated_seconds: float


@dataclass(frozen=True)
class MigrationReport:
    """Outcome of `migrate_to_postgres`: a plan (dry run), a transfer or
    a repair; the others are None."""
    plan: TransferPlan | None = None
    transfer: TransferResult | None = None
    repair: RepairResult | None = None
    migrated: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------ model specs

def migration_model() -> type[models.Model]:
    """Django's model of `django_migrations` (not in the app registry)."""
    return MigrationRecorder.Migration


def transfer_models(exclude: list[str] | None = None
                    ) -> list[type[models.Model]]:
    """Models to copy, FK targets first, `django_migrations` included."""
    found = list(plan_models(exclude).models)
    excluded = set(exclude or []) | set(
        conf.get_list_setting('ANTHIAS_ROLLBACK_EXCLUDE'))
    if 'migrations' not in excluded and MIGRATIONS_LABEL not in excluded:
        found.insert(0, migration_model())
    return found


def migrate_created_labels() -> set[str]:
    """Models whose rows `migrate` itself creates (lower-case labels)."""
    labels = conf.get_list_setting('ANTHIAS_ROLLBACK_MIGRATE_CREATED')
    return {label.lower() for label in labels} | {MIGRATIONS_LABEL.lower()}


class _Problem(Exception):
    """A value the target would reject (raised inside converters)."""


def _integer_ranges(vendor: str) -> dict[str, tuple[int, int]]:
    ops = import_module(f'django.db.backends.{vendor}.operations')
    return ops.DatabaseOperations.integer_field_ranges


def _value_field(field: models.Field) -> models.Field:
    """The field that decides a column's type (FK -> its target)."""
    while field.is_relation and getattr(field, 'target_field', None):
        field = field.target_field
    return field


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
    internal = _value_field(field).get_internal_type()
    if internal == 'JSONField' and connection.vendor == 'sqlite':
        decoder = getattr(_value_field(field), 'decoder', None)

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
            raise _Problem(f'value {str(raw)[:60]!r} cannot be read as '
                           f'{internal}')
        return value
    return read


def _checker(field: models.Field, target_vendor: str
             ) -> Callable[[Any], None] | None:
    """Raise _Problem for a Python value the target engine would reject.

    Only PostgreSQL is strict: SQLite stores any of these as given.
    """
    if target_vendor != 'postgresql':
        return None
    typed = _value_field(field)
    internal = typed.get_internal_type()
    ranges = _integer_ranges(target_vendor)
    if internal in ranges:
        low, high = ranges[internal]

        def check_int(value: Any) -> None:
            if value is not None and not low <= value <= high:
                raise _Problem(f'integer {value} out of range for '
                               f'{internal} ({low}..{high})')
        return check_int
    if internal == 'JSONField':
        encoder = getattr(typed, 'encoder', None)

        def check_json(value: Any) -> None:
            if value is None:
                return
            try:
                text = json.dumps(value, cls=encoder, allow_nan=False)
            except ValueError:
                raise _Problem('JSON holds NaN or Infinity, which '
                               'PostgreSQL jsonb rejects') from None
            if '\\u0000' in text:
                raise _Problem('JSON holds a NUL character (\\u0000), '
                               'which PostgreSQL jsonb rejects')
        return check_json
    max_length = getattr(typed, 'max_length', None)
    if internal in ('BinaryField',):
        return None

    def check_text(value: Any) -> None:
        if isinstance(value, str):
            if '\x00' in value:
                raise _Problem('text holds a NUL byte, which PostgreSQL '
                               'rejects')
            if max_length and len(value) > max_length:
                raise _Problem(f'{len(value)} characters, longer than '
                               f'max_length {max_length}')
    return check_text


def _writer(field: models.Field, alias: str) -> Callable[[Any], Any]:
    """Python value -> what the target column takes (COPY text on
    PostgreSQL, a DB-API parameter on SQLite), via get_db_prep_value."""
    connection = connections[alias]
    prep = field.get_db_prep_value
    if connection.vendor == 'postgresql':
        text = pg.postgres_text
        escape = pg.postgres_escape
        internal = _value_field(field).get_internal_type()
        # Fields whose get_db_prep_value returns str/int/bool unchanged
        # on PostgreSQL skip the call (measured: a third of the time).
        simple = internal in _PG_IDENTITY_TYPES

        def write_pg(value: Any) -> str:
            if value is None:
                return '\\N'
            if simple:
                kind = type(value)
                if kind is str:
                    return escape(value)
                if kind is int:
                    return str(value)
                if kind is bool:
                    return 't' if value else 'f'
            return text(prep(value, connection, prepared=False))
        return write_pg

    def write_param(value: Any) -> Any:
        if value is None:
            return None
        return prep(value, connection, prepared=False)
    return write_param


_PG_IDENTITY_TYPES = {
    'CharField', 'TextField', 'SlugField', 'EmailField', 'URLField',
    'BooleanField', 'NullBooleanField', 'IntegerField', 'BigIntegerField',
    'SmallIntegerField', 'PositiveIntegerField', 'PositiveBigIntegerField',
    'PositiveSmallIntegerField', 'AutoField', 'BigAutoField',
    'SmallAutoField',
}


_SQLITE_PARSED_TYPES = {'date', 'time', 'datetime', 'timestamp'}


@dataclass(frozen=True)
class _ModelSpec:
    model: type[models.Model]
    label: str
    table: str
    fields: tuple[models.Field, ...]
    columns: tuple[str, ...]
    pk_index: int

    @classmethod
    def of(cls, model: type[models.Model]) -> '_ModelSpec':
        meta = model._meta
        # Local fields only: a multi-table child's parent fields live in
        # the parent's table.
        fields = tuple(meta.local_concrete_fields)
        pk_index = next(i for i, f in enumerate(fields)
                        if f.column == meta.pk.column)
        return cls(model, meta.label, meta.db_table, fields,
                   tuple(f.column for f in fields), pk_index)

    def select_sql(self, alias: str) -> str:
        connection = connections[alias]
        quote = connection.ops.quote_name
        columns = []
        for fld in self.fields:
            column = quote(fld.column)
            # SQLite: Django's driver-level converters (by declared type)
            # turn an unparsable date into None before any field sees it;
            # an expression has no declared type, so the text comes through
            # and the field's converter can fail loudly.
            if (connection.vendor == 'sqlite'
                    and fld.db_type(connection) in _SQLITE_PARSED_TYPES):
                column = f'CAST({column} AS TEXT)'
            columns.append(column)
        if connection.vendor == 'sqlite':
            # SQLite: json_valid() per JSON column, appended after the
            # fields (zip() in the generic path ignores them); the fast
            # path trusts text SQLite's C parser accepted.
            columns += [f'json_valid({quote(self.fields[i].column)})'
                        for i in sqlite_json_columns(self.fields)]
        return f'SELECT {", ".join(columns)} FROM {quote(self.table)}'


class _Converter:
    """Converts source rows of one model for one target, collecting the
    values the target would reject instead of stopping at the first."""

    def __init__(self, spec: _ModelSpec, source_alias: str,
                 target_alias: str | None, target_vendor: str,
                 problems: list, counter: list) -> None:
        self.spec = spec
        self.problems = problems
        self.counter = counter
        self.steps = []
        for fld in spec.fields:
            read = _reader(spec.model, fld, source_alias)
            check = _checker(fld, target_vendor)
            write = (_writer(fld, target_alias) if target_alias
                     else None)
            self.steps.append((read, check, write))
        self.funcs = [self._compose(*s) for s in self.steps]
        self.joined = target_vendor == 'postgresql' and bool(target_alias)
        self.row = (compile_row_converter(list(spec.fields), self.funcs,
                                          source_alias, target_alias)
                    if target_alias else None)

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

    def _convert_slowly(self, rows: list[tuple]) -> list[list]:
        done = []
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
        if isinstance(err, _Problem):
            reason = str(err)
        else:
            kind = _value_field(fld).get_internal_type()
            reason = (f'value {str(value)[:60]!r} cannot be read as '
                      f'{kind}: {first_line(err)}')
        self.counter[0] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(SourceProblem(
                self.spec.label, row[self.spec.pk_index], fld.name, reason))


# --------------------------------------------------------------- snapshots

def source_snapshot(alias: str):
    """One read transaction on *alias* for the block: every model is read
    from the same snapshot (engines' read_snapshot)."""
    return engines.for_alias(alias).read_snapshot(alias)


def _source_batches(alias: str, spec: _ModelSpec, batch_size: int
                    ) -> Iterator[list[tuple]]:
    return engines.for_alias(alias).fetch_chunks(
        alias, spec.select_sql(alias), chunk_rows=batch_size)


def _count(alias: str, model: type[models.Model]) -> int:
    return model._base_manager.using(alias).count()


def _emit(progress: Progress, kind: str, label: str, **kwargs: Any) -> None:
    if progress is not None:
        progress(TransferEvent(kind, label, **kwargs))


def _raise_problems(problems: list, count: int, target: str) -> None:
    if not count:
        return
    shown = '; '.join(str(p) for p in problems[:20])
    more = f' (and {count - 20} more)' if count > 20 else ''
    err = PreflightError(f'{count} source value(s) would be rejected by '
                         f'{target}; nothing was written: {shown}{more}')
    err.problems = list(problems)
    err.problem_count = count
    raise err


def _foreign_key_problems(alias: str, specs: list[_ModelSpec]
                          ) -> list[SourceProblem]:
    if connections[alias].vendor != 'sqlite':
        return []   # PostgreSQL enforces its foreign keys itself
    by_table = {s.table: s for s in specs}
    found = []
    for table, pk, column, parent in lite.sqlite_foreign_key_problems(
            alias, list(by_table)):
        spec = by_table[table]
        name = next((f.name for f in spec.fields if f.column == column),
                    column)
        found.append(SourceProblem(spec.label, pk, name,
                                   f'points to a missing row in {parent}'))
    return found


def _wrap_database_error(err: DatabaseError, source: str, target: str,
                         label: str | None) -> TransferError:
    where = f' while copying {label}' if label else ''
    return TransferError(f'copy from {describe_alias(source)} to '
                         f'{describe_alias(target)} failed{where}: '
                         f'{first_line(err)}; the target is unchanged')


# ------------------------------------------------------------------ checks

def preflight_source(source_alias: str, target_vendor: str, *,
                     exclude: list[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     progress: Progress = None) -> list[SourceProblem]:
    """Scan every row of *source_alias* for values an engine of
    *target_vendor* ('postgresql' or 'sqlite') would reject, and orphaned
    foreign keys (SQLite `PRAGMA foreign_key_check`).

    Reads only, in one snapshot. Returns [] when clean; raises
    PreflightError listing every problem (model, pk, field, reason).
    """
    specs = [_ModelSpec.of(m) for m in transfer_models(exclude)]
    problems: list[SourceProblem] = []
    counter = [0]
    try:
        with source_snapshot(source_alias):
            fk = _foreign_key_problems(source_alias, specs)
            problems.extend(fk[:MAX_PROBLEMS])
            counter[0] += len(fk)
            for spec in specs:
                _emit(progress, 'model_start', spec.label)
                converter = _Converter(spec, source_alias, None,
                                       target_vendor, problems, counter)
                rows = 0
                for batch in _source_batches(source_alias, spec,
                                             batch_size):
                    converter.convert(batch)
                    rows += len(batch)
                _emit(progress, 'model_done', spec.label, rows=rows)
    except DatabaseError as err:
        raise TransferError(f'cannot read {describe_alias(source_alias)}: '
                            f'{first_line(err)}') from None
    _raise_problems(problems, counter[0], f'a {target_vendor} target')
    return []


def check_source(alias: str) -> None:
    """The source answers and, for SQLite, is an existing, readable
    database file (Django would silently create a missing one)."""
    connection = connections[alias]
    if connection.vendor == 'sqlite':
        problem = lite.sqlite_file_problem(
            Path(connection.settings_dict['NAME']))
        if problem:
            raise TransferError(f'source {alias}: {problem}')
        try:
            with connection.cursor() as cursor:
                cursor.execute('SELECT count(*) FROM sqlite_master')
        except DatabaseError as err:
            connection.close()
            raise TransferError(f'cannot read {describe_alias(alias)}: '
                                f'{first_line(err)}') from None
        return
    schema.check_connection(alias)


def target_data_rows(alias: str, model_list: list[type[models.Model]]
                     ) -> dict[str, int]:
    """Rows per model on *alias*, leaving out rows `migrate` made."""
    skip = migrate_created_labels()
    counts = {}
    for model in model_list:
        if model._meta.label_lower in skip:
            continue
        rows = _count(alias, model)
        if rows:
            counts[model._meta.label] = rows
    return counts


# ---------------------------------------------------------------- transfer

def transfer_data(source_alias: str, target_alias: str, *,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  replace: bool = False,
                  exclude: list[str] | None = None,
                  progress: Progress = None) -> TransferResult:
    """Copy every planned model from *source_alias* to *target_alias*.

    Reads one snapshot of the source; writes in one transaction on the
    target, which is emptied first (rows `migrate` made always; any other
    rows only with *replace*, else TransferError). PostgreSQL targets get
    COPY FREEZE, indexes built after the load and sequences reset; SQLite
    targets get bulk-load pragmas, a foreign-key check and sqlite_sequence
    raised to PostgreSQL's sequences. Raises PreflightError (every value
    the target would reject), TransferError (anything else); in both
    cases the target is unchanged.
    """
    if batch_size < 1:
        raise TransferError('batch size must be at least 1')
    model_list = transfer_models(exclude)
    specs = [_ModelSpec.of(m) for m in model_list]
    target_vendor = connections[target_alias].vendor
    started = time.perf_counter()
    done: list[ModelTransfer] = []
    problems: list[SourceProblem] = []
    counter = [0]
    current = [None]
    try:
        with source_snapshot(source_alias), \
                _target_transaction(target_alias):
            _emit(progress, 'phase', 'checking the target')
            occupied = target_data_rows(target_alias, model_list)
            if occupied and not replace:
                listed = ', '.join(f'{k} ({v} rows)'
                                   for k, v in occupied.items())
                raise TransferError(
                    f'{describe_alias(target_alias)} already holds data: '
                    f'{listed}; use --replace to overwrite it or --repair '
                    f'to make it equal to the source')
            fk = _foreign_key_problems(source_alias, specs)
            if fk:
                _raise_problems(fk, len(fk), describe_alias(target_alias))
            tables = [s.table for s in specs]
            _truncate(target_alias, tables)
            indexes = _drop_indexes(target_alias, tables)
            for spec in specs:
                current[0] = spec.label
                done.append(_copy_model(
                    spec, source_alias, target_alias, target_vendor,
                    batch_size, problems, counter, progress))
            current[0] = None
            _raise_problems(problems, counter[0],
                            describe_alias(target_alias))
            _emit(progress, 'phase', 'building indexes')
            _create_indexes(target_alias, indexes)
            _finish_target(source_alias, target_alias, model_list)
            checkpoint('transfer_before_commit')
    except DatabaseError as err:
        raise _wrap_database_error(err, source_alias, target_alias,
                                   current[0]) from None
    return TransferResult(
        describe_alias(source_alias), describe_alias(target_alias),
        tuple(done), tuple(s.table for s in specs),
        sum(m.rows for m in done), time.perf_counter() - started)


@contextmanager
def _target_transaction(alias: str) -> Iterator[None]:
    connection = connections[alias]
    if connection.vendor == 'sqlite':
        with lite.sqlite_bulk_load_pragmas(alias), \
                transaction.atomic(using=alias):
            yield
        return
    with transaction.atomic(using=alias):
        pg.postgres_bulk_load_settings(alias)
        yield


def _truncate(alias: str, tables: list[str]) -> None:
    if connections[alias].vendor == 'postgresql':
        pg.postgres_truncate(alias, tables)
    else:
        lite.sqlite_truncate(alias, tables)


def _drop_indexes(alias: str, tables: list[str]) -> list[str]:
    if connections[alias].vendor == 'postgresql':
        return pg.postgres_drop_secondary_indexes(alias, tables)
    return lite.sqlite_drop_secondary_indexes(alias, tables)


def _create_indexes(alias: str, definitions: list[str]) -> None:
    if connections[alias].vendor == 'postgresql':
        pg.postgres_create_indexes(alias, definitions)
    else:
        lite.sqlite_create_indexes(alias, definitions)


def _finish_target(source_alias: str, target_alias: str,
                   model_list: list[type[models.Model]]) -> None:
    """Sequences and constraints, still inside the target transaction."""
    target = connections[target_alias]
    if target.vendor == 'postgresql':
        pg.postgres_reset_sequences(target_alias, model_list)
        return
    if connections[source_alias].vendor == 'postgresql':
        sync_sqlite_sequences_from_postgres(source_alias, target_alias,
                                            model_list)
    orphans = lite.sqlite_foreign_key_problems(
        target_alias, [m._meta.db_table for m in model_list])
    if orphans:
        shown = '; '.join(f'{t} pk={pk!r} {c} -> {p}'
                          for t, pk, c, p in orphans[:20])
        raise TransferError(f'{len(orphans)} copied row(s) point to '
                            f'missing rows: {shown}; the target is '
                            f'unchanged')


def _copy_model(spec: _ModelSpec, source_alias: str, target_alias: str,
                target_vendor: str, batch_size: int, problems: list,
                counter: list, progress: Progress) -> ModelTransfer:
    started = time.perf_counter()
    total = _count(source_alias, spec.model)
    _emit(progress, 'model_start', spec.label, total=total)
    converter = _Converter(spec, source_alias, target_alias, target_vendor,
                           problems, counter)
    copied = [0]

    def converted_batches() -> Iterator[list[list]]:
        for batch in _source_batches(source_alias, spec, batch_size):
            rows = converter.convert(batch)
            copied[0] += len(rows)
            yield rows
            _emit(progress, 'batch', spec.label, rows=copied[0],
                  total=total, seconds=time.perf_counter() - started)
            checkpoint('transfer_batch')

    if target_vendor == 'postgresql':
        def chunks() -> Iterator[bytes]:
            for rows in converted_batches():
                if rows:
                    yield ('\n'.join(rows) + '\n').encode('utf-8')
        # COPY FREEZE: the tables were truncated in this transaction, so
        # PostgreSQL may write the rows already frozen (no hint-bit or
        # vacuum rewrite later).
        pg.postgres_copy_rows(target_alias, spec.table, list(spec.columns),
                              chunks(), freeze=_can_freeze(target_alias))
    else:
        for rows in converted_batches():
            if rows:
                lite.sqlite_insert_rows(target_alias, spec.table,
                                        list(spec.columns), rows)
    seconds = time.perf_counter() - started
    _emit(progress, 'model_done', spec.label, rows=copied[0], total=total,
          seconds=seconds)
    return ModelTransfer(spec.label, spec.table, copied[0], seconds)


def _can_freeze(alias: str) -> bool:
    # PostgreSQL: FREEZE needs the truncation in the current
    # subtransaction; inside a caller's savepoint (tests) it may not be.
    return not connections[alias].savepoint_ids


def sync_sqlite_sequences_from_postgres(
        source_alias: str, target_alias: str,
        model_list: list[type[models.Model]] | None = None) -> None:
    """After a PostgreSQL -> SQLite copy: raise sqlite_sequence of every
    table with an auto-increment key to at least the PostgreSQL
    sequence's last value, so no id PostgreSQL ever handed out is reused
    after a rollback. Reads *source_alias*, writes *target_alias* (call
    inside the target transaction to keep it atomic)."""
    if model_list is None:
        model_list = transfer_models()
    keyed = []
    for model in model_list:
        pk = model._meta.pk
        if pk.get_internal_type() in ('AutoField', 'BigAutoField',
                                      'SmallAutoField'):
            keyed.append((model._meta.db_table, pk.column))
    values = pg.postgres_sequence_values(source_alias, keyed)
    lite.sqlite_sync_sequences(target_alias, values)


# ------------------------------------------------------------------ repair

def repair_data(source_alias: str, target_alias: str, *,
                batch_size: int = DEFAULT_BATCH_SIZE,
                exclude: list[str] | None = None,
                progress: Progress = None) -> RepairResult:
    """Make *target_alias* equal to *source_alias* key by key: insert
    missing rows, rewrite differing ones, delete extra ones; in one target
    transaction, from one source snapshot.

    A differing row is deleted and re-inserted rather than updated, so
    unique columns swapped between rows (content types with other ids)
    never collide mid-way. Holds the target's rows of one model in
    memory. Raises PreflightError / TransferError; target unchanged then.
    """
    model_list = transfer_models(exclude)
    specs = [_ModelSpec.of(m) for m in model_list]
    target_vendor = connections[target_alias].vendor
    started = time.perf_counter()
    problems: list[SourceProblem] = []
    counter = [0]
    done: list[ModelRepair] = []
    current = [None]
    try:
        with source_snapshot(source_alias), \
                _target_transaction(target_alias):
            for spec in specs:
                current[0] = spec.label
                _emit(progress, 'model_start', spec.label)
                done.append(_repair_model(spec, source_alias, target_alias,
                                          target_vendor, batch_size,
                                          problems, counter))
                _emit(progress, 'model_done', spec.label)
            current[0] = None
            _raise_problems(problems, counter[0],
                            describe_alias(target_alias))
            _finish_target(source_alias, target_alias, model_list)
    except DatabaseError as err:
        raise _wrap_database_error(err, source_alias, target_alias,
                                   current[0]) from None
    return RepairResult(describe_alias(source_alias),
                        describe_alias(target_alias), tuple(done),
                        time.perf_counter() - started)


def _repair_model(spec: _ModelSpec, source_alias: str, target_alias: str,
                  target_vendor: str, batch_size: int, problems: list,
                  counter: list) -> ModelRepair:
    # Both sides read as Python values, so 1 == True-ish quirks of one
    # engine do not count as differences.
    existing = {}
    reader = _Converter(spec, target_alias, None, target_vendor, [], [0])
    for batch in _source_batches(target_alias, spec, batch_size):
        for row in reader.convert(batch):
            existing[_key(row[spec.pk_index])] = row
    source = _Converter(spec, source_alias, None, target_vendor, problems,
                        counter)
    writers = [_param_writer(f, target_alias) for f in spec.fields]
    to_insert, changed = [], []
    for batch in _source_batches(source_alias, spec, batch_size):
        for row in source.convert(batch):
            old = existing.pop(_key(row[spec.pk_index]), None)
            if old is None:
                to_insert.append(row)
            elif not _rows_equal(old, row):
                changed.append(row)
    cursor_delete = [old[spec.pk_index] for old in existing.values()]
    cursor_delete += [row[spec.pk_index] for row in changed]
    pk_field = spec.fields[spec.pk_index]
    quote = connections[target_alias].ops.quote_name
    with connections[target_alias].cursor() as cursor:
        pk_writer = _param_writer(pk_field, target_alias)
        for start in range(0, len(cursor_delete), 500):
            keys = [pk_writer(k) for k in cursor_delete[start:start + 500]]
            marks = ', '.join(['%s'] * len(keys))
            cursor.execute(f'DELETE FROM {quote(spec.table)} WHERE '
                           f'{quote(pk_field.column)} IN ({marks})', keys)
        rows = to_insert + changed
        columns = ', '.join(quote(c) for c in spec.columns)
        marks = ', '.join(['%s'] * len(spec.columns))
        for start in range(0, len(rows), batch_size):
            cursor.executemany(
                f'INSERT INTO {quote(spec.table)} ({columns}) '
                f'VALUES ({marks})',
                [[w(v) for w, v in zip(writers, row)]
                 for row in rows[start:start + batch_size]])
    return ModelRepair(spec.label, len(to_insert), len(changed),
                       len(existing))


def _param_writer(fld: models.Field, alias: str) -> Callable[[Any], Any]:
    connection = connections[alias]

    def write(value: Any) -> Any:
        if value is None:
            return None
        return fld.get_db_prep_value(value, connection, prepared=False)
    return write


def _key(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def _rows_equal(left: list, right: list) -> bool:
    return all(_key(a) == _key(b) for a, b in zip(left, right))


# ----------------------------------------------------- migrate_to_postgres

def migrate_to_postgres(source_alias: str, target_alias: str, *,
                        data_dir: Path,
                        replace: bool = False, repair: bool = False,
                        dry_run: bool = False,
                        batch_size: int = DEFAULT_BATCH_SIZE,
                        exclude: list[str] | None = None,
                        progress: Progress = None) -> MigrationReport:
    """The forward move: check both sides, create the schema on the
    target (`migrate`), refuse differing migrations, then copy (or with
    *repair*, reconcile) under the operation lock in *data_dir*.

    *dry_run* only reads: returns the plan (models, row counts, what would
    be truncated, rough time, every preflight problem). Raises
    DatabaseUnavailableError, SchemaMismatchError, LockHeldError,
    PreflightError, TransferError; nothing changed on the target then.
    """
    if replace and repair:
        raise TransferError('--replace and --repair exclude each other')
    check_source(source_alias)
    schema.check_connection(target_alias)
    if dry_run:
        return MigrationReport(plan=plan_transfer(
            source_alias, target_alias, replace=replace, repair=repair,
            batch_size=batch_size, exclude=exclude, progress=progress))
    with operation_lock(data_dir, 'migrate_to_postgres'):
        _emit(progress, 'phase', 'creating the schema (migrate)')
        migrated = tuple(ensure_schema(target_alias))
        check_same_migrations(source_alias, target_alias)
        if repair:
            result = repair_data(source_alias, target_alias,
                                 batch_size=batch_size, exclude=exclude,
                                 progress=progress)
            return MigrationReport(repair=result, migrated=migrated)
        result = transfer_data(source_alias, target_alias,
                               batch_size=batch_size, replace=replace,
                               exclude=exclude, progress=progress)
        return MigrationReport(transfer=result, migrated=migrated)


def ensure_schema(alias: str) -> list[str]:
    """Apply pending migrations on *alias*; return their labels.

    Raises SchemaMismatchError naming the alias when `migrate` fails (no
    permission to create tables, disk full on the server...).
    """
    pending = schema.pending_migrations(alias)
    if not pending:
        return []
    try:
        call_command('migrate', database=alias, interactive=False,
                     verbosity=0, stdout=StringIO(), stderr=StringIO())
    except DatabaseError as err:
        connections[alias].close()
        raise SchemaMismatchError(
            f'cannot create the schema on {describe_alias(alias)}: '
            f'{first_line(err)}') from None
    return pending


def check_same_migrations(source_alias: str, target_alias: str,
                          pending_on_target: list[str] | None = None
                          ) -> None:
    """SchemaMismatchError listing migrations applied on one side only
    (*pending_on_target* counts as applied there: a dry run's view)."""
    only_source, only_target = schema.diff_migrations(source_alias,
                                                      target_alias)
    if pending_on_target:
        only_source = [m for m in only_source
                       if m not in set(pending_on_target)]
    if only_source or only_target:
        lines = []
        if only_source:
            lines.append(f'only on {describe_alias(source_alias)}: '
                         f'{", ".join(only_source)}')
        if only_target:
            lines.append(f'only on {describe_alias(target_alias)}: '
                         f'{", ".join(only_target)}')
        raise SchemaMismatchError(
            'the two databases have different migrations applied; run '
            '`migrate` on the side that lags first. ' + '; '.join(lines))


def plan_transfer(source_alias: str, target_alias: str, *,
                  replace: bool = False, repair: bool = False,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  exclude: list[str] | None = None,
                  progress: Progress = None) -> TransferPlan:
    """What `migrate_to_postgres` would do; reads only.

    Raises DatabaseUnavailableError / SchemaMismatchError like the real
    run; preflight problems are returned in the plan, not raised.
    """
    pending = schema.pending_migrations(target_alias)
    check_same_migrations(source_alias, target_alias, pending)
    model_list = transfer_models(exclude)
    skip = migrate_created_labels()
    existing_tables = set(connections[target_alias].introspection
                          .table_names())
    planned = []
    with source_snapshot(source_alias):
        for model in model_list:
            table = model._meta.db_table
            source_rows = _count(source_alias, model)
            target_rows = (_count(target_alias, model)
                           if table in existing_tables else 0)
            truncate = bool(target_rows) and (
                replace or model._meta.label_lower in skip)
            planned.append(PlannedModel(model._meta.label, table,
                                        source_rows, target_rows, truncate))
    problems: tuple[SourceProblem, ...] = ()
    count = 0
    try:
        preflight_source(source_alias,
                         connections[target_alias].vendor,
                         exclude=exclude, batch_size=batch_size,
                         progress=progress)
    except PreflightError as err:
        problems = tuple(err.problems)
        count = err.problem_count
    rows = sum(p.source_rows for p in planned)
    mode = 'repair' if repair else 'replace' if replace else 'copy'
    return TransferPlan(
        describe_alias(source_alias), describe_alias(target_alias), mode,
        tuple(planned), tuple(pending), problems, count,
        rows / ESTIMATE_ROWS_PER_SECOND)


__all__ = [
    'MigrationReport', 'ModelRepair',
    'ModelTransfer', 'PlannedModel', 'RepairResult', 'SourceProblem',
    'TransferEvent', 'TransferPlan', 'TransferResult', 'check_source',
    'migrate_to_postgres', 'plan_transfer', 'preflight_source',
    'repair_data', 'sync_sqlite_sequences_from_postgres',
    'transfer_data', 'transfer_models',
]
