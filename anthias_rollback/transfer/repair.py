"""Repair: make a target equal to its source key by key (insert the
missing, rewrite the differing, delete the extra), in one transaction."""
import time
from collections.abc import Callable
from typing import Any

from django.db import DatabaseError, connections, models

from anthias_rollback import engines
from anthias_rollback.events import MODEL_DONE, MODEL_START, Progress, emit
from anthias_rollback.report import describe_alias
from anthias_rollback.transfer.copy import (
    finish_target,
    raise_problems,
    source_batches,
    source_snapshot,
    transfer_models,
    wrap_database_error,
)
from anthias_rollback.transfer.results import (
    DEFAULT_BATCH_SIZE,
    ModelRepair,
    RepairResult,
    SourceProblem,
)
from anthias_rollback.transfer.values import Converter, ModelSpec


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
    specs = [ModelSpec.of(m) for m in model_list]
    target = engines.for_alias(target_alias)
    started = time.perf_counter()
    problems: list[SourceProblem] = []
    counter = [0]
    done: list[ModelRepair] = []
    current: list[str | None] = [None]
    try:
        with source_snapshot(source_alias), \
                target.bulk_load(target_alias):
            for spec in specs:
                current[0] = spec.label
                emit(progress, MODEL_START, spec.label)
                done.append(_repair_model(spec, source_alias, target_alias,
                                          batch_size, problems, counter))
                emit(progress, MODEL_DONE, spec.label)
            current[0] = None
            raise_problems(problems, counter[0],
                           describe_alias(target_alias))
            finish_target(source_alias, target_alias, model_list)
    except DatabaseError as err:
        raise wrap_database_error(err, source_alias, target_alias,
                                  current[0]) from None
    return RepairResult(describe_alias(source_alias),
                        describe_alias(target_alias), tuple(done),
                        time.perf_counter() - started)


def _repair_model(spec: ModelSpec, source_alias: str, target_alias: str,
                  batch_size: int, problems: list, counter: list
                  ) -> ModelRepair:
    # Both sides read as Python values, so 1 == True-ish quirks of one
    # engine do not count as differences.
    existing = {}
    reader = Converter(spec, target_alias, None, [], [0],
                       check_alias=target_alias)
    for batch in source_batches(target_alias, spec, batch_size):
        for row in reader.convert(batch):
            existing[_row_key(spec, row)] = row
    source = Converter(spec, source_alias, None, problems, counter,
                       check_alias=target_alias)
    writers = [_param_writer(f, target_alias) for f in spec.fields]
    to_insert, changed = [], []
    for batch in source_batches(source_alias, spec, batch_size):
        for row in source.convert(batch):
            old = existing.pop(_row_key(spec, row), None)
            if old is None:
                to_insert.append(row)
            elif not _rows_equal(old, row):
                changed.append(row)
    # Every key column's value (several for a composite key).
    cursor_delete = [[old[i] for i in spec.key_indexes]
                     for old in existing.values()]
    cursor_delete += [[row[i] for i in spec.key_indexes] for row in changed]
    key_fields = [spec.fields[i] for i in spec.key_indexes]
    key_writers = [_param_writer(f, target_alias) for f in key_fields]
    quote = connections[target_alias].ops.quote_name
    one = ('%s' if len(key_fields) == 1
           else f'({", ".join(["%s"] * len(key_fields))})')
    column = (quote(key_fields[0].column) if len(key_fields) == 1
              else f'({", ".join(quote(f.column) for f in key_fields)})')
    # Under SQLite's variable limit (999 on old builds).
    per_statement = 500 // len(key_fields)
    with connections[target_alias].cursor() as cursor:
        for start in range(0, len(cursor_delete), per_statement):
            group = cursor_delete[start:start + per_statement]
            params = [w(v) for key in group
                      for w, v in zip(key_writers, key)]
            cursor.execute(f'DELETE FROM {quote(spec.table)} WHERE '
                           f'{column} IN ({", ".join([one] * len(group))})',
                           params)
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


def _row_key(spec: ModelSpec, row: list) -> Any:
    """*row*'s key, comparable across engines (a tuple when composite)."""
    if len(spec.key_indexes) == 1:
        return _key(row[spec.key_indexes[0]])
    return tuple(_key(row[i]) for i in spec.key_indexes)


def _key(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def _rows_equal(left: list, right: list) -> bool:
    return all(_key(a) == _key(b) for a, b in zip(left, right))
