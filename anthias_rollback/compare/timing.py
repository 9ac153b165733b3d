"""Time representative queries on two aliases: is the new side slower?

Median of PERF_REPEAT runs per query and side, reads only, outside any
explicit transaction. A query is *slow* above a caller's limit on either
side, *degraded* when the right side takes DEGRADED_RATIO times as long.
"""
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from django.db import DatabaseError, models

from anthias_rollback import events
from anthias_rollback.compare.orchestrator import resolve_models
from anthias_rollback.exceptions import CompareError
from anthias_rollback.report import first_line

DEGRADED_RATIO = 3.0
# Sub-millisecond queries are dominated by the round trip that an
# in-process SQLite never pays; a ratio there says nothing about the data.
DEGRADED_FLOOR_MS = 1.0
PERF_REPEAT = 3


@dataclass(frozen=True)
class QueryTiming:
    label: str
    query: str
    left_ms: float
    right_ms: float
    ratio: float          # right / left
    slow: bool            # above max_query_ms on either side
    degraded: bool        # ratio above DEGRADED_RATIO


@dataclass(frozen=True)
class PerformanceReport:
    left_alias: str
    right_alias: str
    max_query_ms: float | None
    timings: tuple[QueryTiming, ...]

    @property
    def slow(self) -> tuple[QueryTiming, ...]:
        return tuple(t for t in self.timings if t.slow)

    @property
    def degraded(self) -> tuple[QueryTiming, ...]:
        return tuple(t for t in self.timings if t.degraded)

    @property
    def ok(self) -> bool:
        return not self.slow

    def to_dict(self) -> dict[str, Any]:
        return {'max_query_ms': self.max_query_ms, 'ok': self.ok,
                'degraded_ratio': DEGRADED_RATIO,
                'timings': [asdict(t) for t in self.timings]}


def _time_query(run: Callable[[str], Any], alias: str) -> float:
    times = []
    for _ in range(PERF_REPEAT):
        started = time.perf_counter()
        run(alias)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def _indexed_field(model: type[models.Model]) -> models.Field | None:
    # This model's own table's (a multi-table child's parent fields are
    # timed with the parent).
    for f in model._meta.local_concrete_fields:
        if f.primary_key:
            continue
        if f.db_index or f.unique or f.is_relation:
            return f
    return None


def _representative_queries(model: type[models.Model], left_alias: str
                            ) -> list[tuple[str, Callable[[str], Any]]]:
    manager = model._base_manager
    queries = [('count', lambda a: manager.using(a).count())]
    first = manager.using(left_alias).order_by('pk').first()
    if first is not None:
        pk = first.pk
        queries.append(('pk lookup',
                        lambda a: list(manager.using(a).filter(pk=pk))))
        indexed = _indexed_field(model)
        if indexed is not None:
            value = getattr(first, indexed.attname)
            lookup = ({f'{indexed.attname}__isnull': True} if value is None
                      else {indexed.attname: value})
            queries.append((f'filter {indexed.name}', lambda a: list(
                manager.using(a).filter(**lookup)[:100])))
    queries.append(('order by pk desc limit 20', lambda a: list(
        manager.using(a).order_by('-pk')[:20])))
    return queries


def measure_query_performance(left_alias: str, right_alias: str, *,
                              models: Iterable | None = None,
                              max_query_ms: float | None = None,
                              progress: events.Progress = None
                              ) -> PerformanceReport:
    """Time representative queries per model on both aliases (median of
    three): count, pk lookup, filter on an indexed field, ORDER BY pk
    LIMIT. Reads only, outside any explicit transaction. Raises
    CompareError if a query fails or a model label is unknown."""
    if max_query_ms is not None and max_query_ms <= 0:
        raise CompareError(f'max query time must be > 0 ms, not '
                           f'{max_query_ms}')
    timings = []
    for model in resolve_models(models):
        label = model._meta.label
        events.emit(progress, events.MODEL_START, label)
        try:
            for name, run in _representative_queries(model, left_alias):
                left_ms = _time_query(run, left_alias)
                right_ms = _time_query(run, right_alias)
                ratio = right_ms / left_ms if left_ms > 0 else 0.0
                slow = max_query_ms is not None and max(
                    left_ms, right_ms) > max_query_ms
                degraded = (ratio > DEGRADED_RATIO
                            and right_ms >= DEGRADED_FLOOR_MS)
                timings.append(QueryTiming(label, name, round(left_ms, 3),
                                           round(right_ms, 3),
                                           round(ratio, 2), slow, degraded))
        except DatabaseError as err:
            raise CompareError(f'{label}: performance query failed: '
                               f'{first_line(err)}') from None
    return PerformanceReport(left_alias, right_alias, max_query_ms,
                             tuple(timings))
