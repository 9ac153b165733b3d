"""What the copy returns: result, plan and problem types (frozen)."""
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BATCH_SIZE = 5000
# Problems kept in full (the count is always exact); enough to fix a
# legacy database in one go without an unbounded message.
MAX_PROBLEMS = 1000
# Rough rate for the --dry-run estimate (rows/s, 2-core ARM-class board).
ESTIMATE_ROWS_PER_SECOND = 60_000


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
    # Of *seconds*, finding which of the target's rows `migrate` made
    # (beyond_migrate: a scratch migrate unless a schema template exists).
    migrate_check_seconds: float = 0.0


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
    # One line per installed model whose rows are never copied:
    # 'not copied: unmanaged app.Model (table t)'.
    not_copied: tuple[str, ...] = field(default_factory=tuple)
