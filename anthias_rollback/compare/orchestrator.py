"""Compare models between two aliases: snapshots, readers, modes.

Checksum mode (the default): random keys from the left side split the
key space into buckets of about BUCKET_ROWS rows; each reader hashes its
rows bucket by bucket and sends only (row count, checksum) per bucket.
The engines hash them themselves (engines/digests.py) when every column
has an in-engine form on both sides; otherwise the rows are normalized
and hashed in Python (streams.bucket_digests), and a note says so.
Buckets that agree are identical; the key ranges of the others are read
again on both sides and merged row by row (algorithms.merge_streams).
`deep=True`, and primary keys without byte-ordered ranges, merge both
whole tables instead. See the package docstring for the key order.
"""
import contextlib
import multiprocessing
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from django.db import DatabaseError, connections, models

from anthias_rollback import engines, events, fields, models_graph, schema
from anthias_rollback.compare import streams
from anthias_rollback.compare.algorithms import (
    Tally,
    merge_streams,
    mismatched_ranges,
)
from anthias_rollback.compare.readers import LocalReader, Reader, SideReader
from anthias_rollback.compare.results import (
    AtRiskReport,
    CompareReport,
    ModelComparison,
)
from anthias_rollback.engines.sqlite_file import sqlite_file_problem
from anthias_rollback.exceptions import (
    CompareError,
    DeadlineError,
    SchemaMismatchError,
)
from anthias_rollback.normalize import key_width, plan_columns
from anthias_rollback.report import describe_alias, first_line

SAMPLE_LIMIT = 1_000_000
# Checksum mode hashes buckets of about this many rows on each side and
# re-reads only mismatching buckets exactly: small enough that a changed
# row costs little to locate, large enough to hash per bucket, not per
# row. Past MAX_BUCKETS buckets grow instead (memory stays flat).
BUCKET_ROWS = 256
MAX_BUCKETS = 65536


def resolve_models(models: Iterable | None) -> list[type[models.Model]]:
    """Model classes from classes or `app.Model` labels (None: all)."""
    if models is None:
        return list(models_graph.plan_models().models)
    resolved = []
    for item in models:
        if isinstance(item, str):
            try:
                item = models_graph.get_model(item)
            except LookupError:
                raise CompareError(f'unknown model {item!r}') from None
        resolved.append(item)
    return resolved


def check_schema(left_alias: str, right_alias: str,
                 model_list: list[type[models.Model]]) -> list[str]:
    """Both aliases answer, carry the same migrations and every model's
    table and columns. Raises DatabaseUnavailableError or
    SchemaMismatchError; returns notes (extra columns on one side)."""
    only_left, only_right = schema.diff_migrations(left_alias, right_alias)
    if only_left or only_right:
        parts = []
        for alias, names in ((left_alias, only_left),
                             (right_alias, only_right)):
            if names:
                shown = ', '.join(names[:5])
                more = f' (+{len(names) - 5} more)' if len(names) > 5 else ''
                parts.append(f'applied only on {describe_alias(alias)}: '
                             f'{shown}{more}')
        raise SchemaMismatchError(
            'migration state differs; ' + '; '.join(parts)
            + '; run `manage.py migrate --database <alias>` on the side '
            'that is behind')
    notes = []
    columns = {alias: _table_columns(alias)
               for alias in (left_alias, right_alias)}
    for model in model_list:
        table = model._meta.db_table
        # This table's own columns: a multi-table child's parent fields
        # live in the parent's table.
        wanted = {f.column for f in model._meta.local_concrete_fields}
        found = {}
        for alias in (left_alias, right_alias):
            if table not in columns[alias]:
                raise SchemaMismatchError(
                    f'{model._meta.label}: table {table} is missing on '
                    f'{describe_alias(alias)}')
            found[alias] = columns[alias][table]
            lacking = sorted(wanted - found[alias])
            if lacking:
                raise SchemaMismatchError(
                    f'{model._meta.label}: {describe_alias(alias)} lacks '
                    f'column(s) {", ".join(lacking)} of table {table}')
        if found[left_alias] != found[right_alias]:
            notes.append(
                f'{model._meta.label}: columns outside the model differ '
                f'({", ".join(sorted(found[left_alias] ^ found[right_alias]))}'
                '); not compared')
    return notes


def _table_columns(alias: str) -> dict[str, set[str]]:
    connection = connections[alias]
    result = {}
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            description = connection.introspection.get_table_description(
                cursor, table)
            result[table] = {c.name for c in description}
    return result


def _compare_by_buckets(model: type[models.Model], tally: Tally,
                        left: Reader, right: Reader, rows: int,
                        sample_size: int, deadline: float | None,
                        on_rows: Callable[[int], None],
                        notes: list[str] | None = None) -> bool:
    """Checksum mode: bucket checksums on both sides at once, exact
    comparison of mismatching buckets only, then the sample by key.
    False if *deadline* stopped it."""
    buckets = min(MAX_BUCKETS, rows // BUCKET_ROWS)
    bounds = left.key_sample(model, buckets - 1) if buckets > 1 else []
    # Both sides hash the same way or not at all: an engine digest never
    # equals a Python one. A mismatch only sends a bucket to the exact
    # comparison below, so an engine's rendering quirk costs time only.
    blockers = sorted(set(left.digest_blockers(model))
                      | set(right.digest_blockers(model)))
    if blockers and notes is not None:
        notes.append(f'{model._meta.label}: bucket checksums computed in '
                     f'Python (no in-engine form for '
                     f'{", ".join(blockers)})')
    left.start_digests(model, bounds, report=True, in_engine=not blockers)
    right.start_digests(model, bounds, in_engine=not blockers)
    left_digests = left.finish_digests(on_rows)
    right_digests = right.finish_digests()
    equal_rows, ranges = mismatched_ranges(bounds, left_digests,
                                           right_digests)
    tally.identical += equal_rows
    for low, high in ranges:
        before = tally.compared
        if not merge_streams(tally, left.stream(model, low, high),
                             right.stream(model, low, high), deep=False,
                             deadline=deadline):
            return False
        tally.rechecked += tally.compared - before
    sampled = left.key_sample(model, sample_size)
    batch_size = streams.KEY_BATCH
    for start in range(0, len(sampled), batch_size):
        if deadline is not None and time.monotonic() > deadline:
            return False
        batch = sampled[start:start + batch_size]
        _, left_rows = left.rows_for_keys(model, batch)
        right_keys, right_rows = right.rows_for_keys(model, batch)
        others = dict(zip(right_keys, right_rows))
        for row in left_rows:
            tally.sampled += 1
            other = others.get(row[0])
            if other is None or tally.changed_fields(row, other):
                tally.sample_differences += 1
    return True


def compare_model(model: type[models.Model], left_alias: str,
                  right_alias: str, *, deep: bool = False,
                  sample_size: int = 0, deadline: float | None = None,
                  progress: events.Progress = None,
                  rng: random.Random | None = None,
                  left_reader: Reader | None = None,
                  right_reader: Reader | None = None,
                  notes: list[str] | None = None
                  ) -> ModelComparison:
    """Compare one model; both aliases must already be in their snapshots
    (or be read by a SideReader).

    Checksum mode (not *deep*) hashes key-range buckets on both sides and
    compares only mismatching buckets row by row; *deep*, and primary
    keys without byte-ordered ranges, merge both whole tables. Stops at
    *deadline* (time.monotonic()) with complete=False. Appends to
    *notes* when checksums had to be computed in Python. Raises
    CompareError when reading fails.
    """
    started = time.monotonic()
    label = model._meta.label
    left = left_reader or LocalReader(left_alias)
    right = right_reader or LocalReader(right_alias)
    left_rows = left.count(model)
    right_rows = right.count(model)
    by_buckets = not deep and fields.key_kind(model) is not None
    sample = None
    if sample_size and not by_buckets:
        sample = set((rng or random.Random()).sample(
            range(left_rows), min(sample_size, left_rows)))
    names = [p.field.name for p in plan_columns(model, left_alias)]
    if key_width(model) > 1:
        # A composite key is one column of tuples in the streams.
        names[:key_width(model)] = ['pk']
    tally = Tally(names, sample)
    events.emit(progress, events.MODEL_START, label, total=left_rows)

    def on_rows(done: int) -> None:
        events.emit(progress, events.BATCH, label, rows=done,
                    total=left_rows, seconds=time.monotonic() - started)

    try:
        if by_buckets:
            complete = _compare_by_buckets(
                model, tally, left, right, max(left_rows, right_rows),
                min(sample_size, left_rows), deadline, on_rows, notes)
            tally.left_seen = left_rows
        else:
            complete = merge_streams(
                tally, left.stream(model), right.stream(model), deep=deep,
                deadline=deadline, on_batch=lambda: on_rows(tally.left_seen))
    except DatabaseError as err:
        if deadline is not None and time.monotonic() > deadline:
            complete = False  # the statement timeout / interrupt fired
        else:
            raise CompareError(f'{label}: reading failed: '
                               f'{first_line(err)}') from None
    seconds = time.monotonic() - started
    events.emit(progress, events.MODEL_DONE, label, rows=tally.left_seen,
                total=left_rows, seconds=seconds)
    return ModelComparison(
        label=label, table=model._meta.db_table, left_rows=left_rows,
        right_rows=right_rows, compared=tally.compared,
        identical=tally.identical, missing_keys=tuple(tally.missing),
        extra_keys=tuple(tally.extra), changed=tuple(tally.changed),
        complete=complete, seconds=seconds, sampled=tally.sampled,
        sample_differences=tally.sample_differences,
        rechecked=tally.rechecked)


def compare_aliases(left_alias: str, right_alias: str, *,
                    models: Iterable | None = None, deep: bool = False,
                    sample_size: int = 0, timeout: float | None = None,
                    progress: events.Progress = None,
                    seed: int | None = None,
                    parallel: bool | None = None) -> CompareReport:
    """Compare every model's rows between two aliases.

    Reads both aliases, writes neither: each is read in one snapshot
    (the engine's read_snapshot: SQLite, one deferred read transaction
    with query_only; PostgreSQL, REPEATABLE READ READ ONLY), rolled back
    at the end. *left* is the reference (SQLite, a backup); keys only
    there are `missing_keys`, keys only on *right* are `extra_keys`. With
    *timeout* (seconds) it stops cleanly and returns complete=False.
    *parallel* (default: yes where fork exists) reads each side that is
    not inside an atomic block in a forked process holding that side's
    snapshot. Raises DatabaseUnavailableError, SchemaMismatchError,
    CompareError, ConfigError (an unsupported engine).
    """
    started = time.monotonic()
    if sample_size < 0:
        raise CompareError(f'sample size must be >= 0, not {sample_size}')
    if timeout is not None and timeout <= 0:
        raise CompareError(f'timeout must be > 0 seconds, not {timeout}')
    deadline = None if timeout is None else started + timeout
    model_list = resolve_models(models)
    notes = check_schema(left_alias, right_alias, model_list)
    rng = random.Random(seed)
    results: list[ModelComparison] = []
    stopped = ''
    if parallel is None:
        parallel = 'fork' in multiprocessing.get_all_start_methods()
    try:
        with contextlib.ExitStack() as stack:
            readers = {}
            for alias in (left_alias, right_alias):
                if parallel and not connections[alias].in_atomic_block:
                    readers[alias] = SideReader(alias, deadline)
                    stack.callback(readers[alias].close)
                else:
                    stack.enter_context(engines.for_alias(alias)
                                        .read_snapshot(alias, deadline))
            for model in model_list:
                if deadline is not None and time.monotonic() > deadline:
                    break
                result = compare_model(
                    model, left_alias, right_alias, deep=deep,
                    sample_size=min(sample_size, SAMPLE_LIMIT),
                    deadline=deadline, progress=progress, rng=rng,
                    left_reader=readers.get(left_alias),
                    right_reader=readers.get(right_alias), notes=notes)
                if sample_size > result.left_rows and sample_size:
                    notes.append(
                        f'{result.label}: sample size {sample_size} is more '
                        f'than its {result.left_rows} rows; sampled all')
                results.append(result)
                if not result.complete:
                    break
    except DatabaseError as err:
        if deadline is not None and time.monotonic() > deadline:
            stopped = f'timeout after {timeout:g}s'
        else:
            raise CompareError(f'comparing {left_alias} and {right_alias} '
                               f'failed: {first_line(err)}') from None
    done = {r.label for r in results if r.complete}
    not_compared = tuple(m._meta.label for m in model_list
                         if m._meta.label not in done)
    if not_compared and not stopped:
        stopped = f'timeout after {timeout:g}s'
    return CompareReport(
        left_alias=left_alias, right_alias=right_alias,
        left_description=describe_alias(left_alias),
        right_description=describe_alias(right_alias), deep=deep,
        sample_size=sample_size, models=tuple(results),
        not_compared=not_compared, complete=not not_compared,
        stopped_reason=stopped, notes=tuple(notes),
        seconds=time.monotonic() - started)


def find_at_risk_keys(reference_alias: str, live_alias: str, *,
                      models: Iterable | None = None,
                      timeout: float | None = None,
                      progress: events.Progress = None) -> AtRiskReport:
    """What rolling *live_alias* back to *reference_alias* (e.g. a
    backup) would touch: live keys missing from the reference or
    differing from it, and counts of reference keys the live side lacks,
    per model label (CompareReport.at_risk_keys).

    Checksum mode (the fast path); reads only. Raises DeadlineError when
    *timeout* runs out (a partial key list would be unsafe to act on),
    plus whatever compare_aliases raises.
    """
    report = compare_aliases(reference_alias, live_alias, models=models,
                             timeout=timeout, progress=progress)
    if not report.complete:
        raise DeadlineError(
            f'at-risk rows not fully computed: {report.stopped_reason}; '
            f'not compared: {", ".join(report.not_compared)}')
    return report.at_risk_keys()


def check_sqlite_file(path: Path) -> None:
    """CompareError unless *path* is an existing SQLite database file.

    Checked before an alias is opened on it: sqlite3 would silently
    create an empty database at a mistyped path.
    """
    problem = sqlite_file_problem(Path(path))
    if problem is not None:
        raise CompareError(problem)
