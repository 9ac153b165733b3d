"""Stream every row of every model from one alias into another.

The same engine runs both ways: SQLite -> PostgreSQL (`migrate_to_postgres`)
and PostgreSQL -> a fresh SQLite file (the zero-loss rollback). Values go
through the model fields (the source backend's and field's converters,
then the field's `get_db_prep_value` for the target), so JSON, tz-aware
datetimes, durations, UUIDs, Decimals and binary land exactly.

One consistent snapshot of the source (one read transaction), one
transaction on the target: if anything fails the target is as before.
No model is saved through `Model.save()`, so no signal fires.

Rooms: `values` (the per-value pipeline), `copy` (transfer_data and its
checks), `repair` (key-by-key reconciliation), `forward` (the
migrate_to_postgres workflow and its dry-run plan), `results`.
"""
from anthias_rollback.transfer.copy import (
    MIGRATIONS_LABEL,
    check_source,
    migrate_created_labels,
    migration_model,
    model_rows,
    preflight_source,
    source_snapshot,
    target_data_rows,
    transfer_data,
    transfer_models,
)
from anthias_rollback.transfer.forward import (
    migrate_to_postgres,
    plan_transfer,
)
from anthias_rollback.transfer.repair import repair_data
from anthias_rollback.transfer.results import (
    DEFAULT_BATCH_SIZE,
    MigrationReport,
    ModelRepair,
    ModelTransfer,
    PlannedModel,
    RepairResult,
    SourceProblem,
    TransferPlan,
    TransferResult,
)

__all__ = [
    'DEFAULT_BATCH_SIZE', 'MIGRATIONS_LABEL', 'MigrationReport',
    'ModelRepair', 'ModelTransfer', 'PlannedModel', 'RepairResult',
    'SourceProblem', 'TransferPlan', 'TransferResult', 'check_source',
    'migrate_created_labels', 'migrate_to_postgres', 'migration_model',
    'model_rows', 'plan_transfer', 'preflight_source', 'repair_data',
    'source_snapshot', 'target_data_rows', 'transfer_data',
    'transfer_models',
]
