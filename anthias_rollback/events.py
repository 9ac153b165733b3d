"""One progress vocabulary for every long operation.

Core functions take an optional `progress` callable and give it
`ProgressEvent`s; commands render them (`management.render`).
One type, one set of kinds: the rollback's per-model line once went
missing because the copy said 'model_done' and the command listened for
'model-done'.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PHASE_START = 'phase-start'
PHASE_DONE = 'phase-done'
MODEL_START = 'model-start'
BATCH = 'batch'
MODEL_DONE = 'model-done'
WARNING = 'warning'
KINDS = (PHASE_START, PHASE_DONE, MODEL_START, BATCH, MODEL_DONE, WARNING)


@dataclass(frozen=True)
class ProgressEvent:
    """What progress callables receive.

    kind    one of KINDS
    name    the phase or step (phase-*), the model label (model-*, batch)
    rows    rows done so far in this model
    total   rows in this model, when known
    seconds time spent in this phase or model
    status  phase-done only: a phases.PhaseStatus
    detail  phase-done detail, or the warning's text
    group   what the phase belongs to ('setup'/'loop' in a drill, or the
            inner run's name when a drill forwards its rollback's events)
    """
    kind: str
    name: str = ''
    rows: int = 0
    total: int | None = None
    seconds: float = 0.0
    status: str = ''
    detail: str = ''
    group: str = ''

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f'unknown progress event kind {self.kind!r}')


Progress = Callable[[ProgressEvent], None] | None


def emit(progress: Progress, kind: str, name: str = '', **fields: Any
         ) -> None:
    """Send one event to *progress* if there is one."""
    if progress is not None:
        progress(ProgressEvent(kind, name, **fields))
