"""The forward move (`migrate_to_postgres`): checks, schema, then the
copy or the repair under the operation lock; and its dry-run plan."""
from pathlib import Path

from django.db import connections

from anthias_rollback import schema
from anthias_rollback.events import PHASE_START, Progress, emit
from anthias_rollback.exceptions import PreflightError, TransferError
from anthias_rollback.locking import operation_lock
from anthias_rollback.report import describe_alias
from anthias_rollback.transfer.copy import (
    check_source,
    migrate_created_labels,
    model_rows,
    not_copied_lines,
    preflight_source,
    source_snapshot,
    transfer_data,
    transfer_models,
)
from anthias_rollback.transfer.repair import repair_data
from anthias_rollback.transfer.results import (
    DEFAULT_BATCH_SIZE,
    ESTIMATE_ROWS_PER_SECOND,
    MigrationReport,
    PlannedModel,
    SourceProblem,
    TransferPlan,
)


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
            batch_size=batch_size, exclude=exclude, progress=progress),
            not_copied=not_copied_lines())
    with operation_lock(data_dir, 'migrate_to_postgres'):
        emit(progress, PHASE_START, 'creating the schema (migrate)')
        migrated = tuple(schema.ensure_schema(target_alias))
        schema.check_same_migrations(source_alias, target_alias)
        if repair:
            repaired = repair_data(source_alias, target_alias,
                                   batch_size=batch_size, exclude=exclude,
                                   progress=progress)
            return MigrationReport(repair=repaired, migrated=migrated,
                                   not_copied=not_copied_lines())
        result = transfer_data(source_alias, target_alias,
                               batch_size=batch_size, replace=replace,
                               exclude=exclude, progress=progress)
        return MigrationReport(transfer=result, migrated=migrated,
                               not_copied=not_copied_lines())


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
    schema.check_same_migrations(source_alias, target_alias, pending)
    model_list = transfer_models(exclude)
    skip = migrate_created_labels()
    existing_tables = set(connections[target_alias].introspection
                          .table_names())
    planned = []
    with source_snapshot(source_alias):
        for model in model_list:
            table = model._meta.db_table
            source_rows = model_rows(source_alias, model)
            target_rows = (model_rows(target_alias, model)
                           if table in existing_tables else 0)
            truncate = bool(target_rows) and (
                replace or model._meta.label_lower in skip)
            planned.append(PlannedModel(model._meta.label, table,
                                        source_rows, target_rows, truncate))
    problems: tuple[SourceProblem, ...] = ()
    count = 0
    try:
        preflight_source(source_alias, target_alias, exclude=exclude,
                         batch_size=batch_size, progress=progress)
    except PreflightError as err:
        problems = tuple(err.problems)
        count = err.problem_count
    rows = sum(p.source_rows for p in planned)
    mode = 'repair' if repair else 'replace' if replace else 'copy'
    return TransferPlan(
        describe_alias(source_alias), describe_alias(target_alias), mode,
        tuple(planned), tuple(pending), problems, count,
        rows / ESTIMATE_ROWS_PER_SECOND)
