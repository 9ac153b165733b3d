"""The copy: every planned model from one alias into another, from one
source snapshot into one target transaction (engines do the engine parts:
COPY or executemany, truncation, indexes, sequences)."""
import gc
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from django.apps import apps
from django.db import DatabaseError, connections, models
from django.db.migrations.recorder import MigrationRecorder

from anthias_rollback import conf, engines, schema
from anthias_rollback.events import (
    BATCH,
    MODEL_DONE,
    MODEL_START,
    PHASE_START,
    Progress,
    emit,
)
from anthias_rollback.exceptions import PreflightError, TransferError
from anthias_rollback.faults import checkpoint
from anthias_rollback.models_graph import plan_models
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.transfer import exclusions
from anthias_rollback.transfer.results import (
    DEFAULT_BATCH_SIZE,
    MAX_PROBLEMS,
    ModelTransfer,
    SourceProblem,
    TransferResult,
)
from anthias_rollback.transfer.values import Converter, ModelSpec

MIGRATIONS_LABEL = 'migrations.Migration'
# Converted batches the reader thread may hold ready for a SQLite target
# (memory: this many batches plus one on each side; a batch of 5,000
# asset rows is about 6 MB of Python objects). 2 overlap the reads and
# the writes as well as 4 did (1M rows: build 18.6 s against 19.3 s).
READ_AHEAD_BATCHES = 2
# How often a blocked reader or a closing consumer checks the other side.
_PUT_POLL_SECONDS = 0.5


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


def not_copied_lines() -> tuple[str, ...]:
    """One line per installed unmanaged model: its table belongs to
    whatever made it (SQL of the app's own, another system), so a copy
    neither empties nor fills it. Proxies share their concrete model's
    table and need no line."""
    lines = []
    for model in apps.get_models():
        meta = model._meta
        if not meta.managed and not meta.proxy and not meta.swapped:
            lines.append(f'not copied: unmanaged {meta.label} '
                         f'(table {meta.db_table})')
    return tuple(sorted(lines))


def migrate_created_labels() -> set[str]:
    """Models whose rows `migrate` itself creates (lower-case labels)."""
    labels = conf.get_list_setting('ANTHIAS_ROLLBACK_MIGRATE_CREATED')
    return {label.lower() for label in labels} | {MIGRATIONS_LABEL.lower()}


def source_snapshot(alias: str):
    """One read transaction on *alias* for the block: every model is read
    from the same snapshot (engines' read_snapshot)."""
    return engines.for_alias(alias).read_snapshot(alias)


def source_batches(alias: str, spec: ModelSpec, batch_size: int,
                   sql: str | None = None) -> Iterator[list[tuple]]:
    return engines.for_alias(alias).fetch_chunks(
        alias, sql or spec.select_sql(alias), chunk_rows=batch_size)


class _ReaderFailed:
    """What the read-ahead thread hands over when reading failed."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_READ_DONE = object()


def _read_ahead(batches: Iterator[list[tuple]],
                convert: Callable[[list[tuple]], list],
                label: str) -> Iterator[list]:
    """Converted *batches*, read and converted in a second thread up to
    READ_AHEAD_BATCHES ahead of the caller (who inserts them): psycopg2
    and sqlite3 release the GIL while their engines work, so fetching,
    converting and SQLite's inserting overlap on two cores.

    *batches* must be made in the calling thread (Django connections are
    per thread; fetch_chunks takes the raw connection when called). A
    failure in the reader is re-raised here; closing this generator (or
    a failure of the caller) stops the reader and waits for it, so the
    source connection is idle again when this returns.
    """
    pipe: queue.Queue = queue.Queue(maxsize=READ_AHEAD_BATCHES)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                pipe.put(item, timeout=_PUT_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        outcome: object = _READ_DONE
        try:
            for batch in batches:
                if not put(convert(batch)):
                    break
        except BaseException as err:  # noqa: BLE001 re-raised by consumer
            outcome = _ReaderFailed(err)
        finally:
            # Close the source cursor in this thread, before the caller
            # may use the connection again.
            try:
                close = getattr(batches, 'close', None)
                if close is not None:
                    close()
            except BaseException as err:  # noqa: BLE001 as above
                if outcome is _READ_DONE:
                    outcome = _ReaderFailed(err)
        put(outcome)

    worker = threading.Thread(target=read, name=f'read-{label}',
                              daemon=True)
    worker.start()
    try:
        while True:
            item = pipe.get()
            if item is _READ_DONE:
                return
            if isinstance(item, _ReaderFailed):
                raise item.error
            yield item
    finally:
        stop.set()
        # Unblock a reader waiting on a full queue, then wait for it.
        while worker.is_alive():
            try:
                pipe.get(timeout=_PUT_POLL_SECONDS)
            except queue.Empty:
                pass
        worker.join()


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during a copy: every batch allocates
    thousands of row tuples, each counting towards the next collection,
    which then walks the batches still queued (profiled: 9 % of a
    100,000-row reverse copy's CPU). Rows hold no cycles; reference
    counting frees them. Restored on exit, also after a failure."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def model_rows(alias: str, model: type[models.Model]) -> int:
    return model._base_manager.using(alias).count()


def raise_problems(problems: list, count: int, target: str) -> None:
    if not count:
        return
    shown = '; '.join(str(p) for p in problems[:20])
    more = f' (and {count - 20} more)' if count > 20 else ''
    err = PreflightError(f'{count} source value(s) would be rejected by '
                         f'{target}; nothing was written: {shown}{more}')
    err.problems = list(problems)
    err.problem_count = count
    raise err


def _foreign_key_problems(alias: str, specs: list[ModelSpec]
                          ) -> list[SourceProblem]:
    by_table = {s.table: s for s in specs}
    found = []
    for table, pk, column, parent in engines.for_alias(
            alias).foreign_key_problems(alias, list(by_table)):
        spec = by_table[table]
        name = next((f.name for f in spec.fields if f.column == column),
                    column)
        found.append(SourceProblem(spec.label, pk, name,
                                   f'points to a missing row in {parent}'))
    return found


def wrap_database_error(err: DatabaseError, source: str, target: str,
                        label: str | None) -> TransferError:
    where = f' while copying {label}' if label else ''
    return TransferError(f'copy from {describe_alias(source)} to '
                         f'{describe_alias(target)} failed{where}: '
                         f'{first_line(err)}; the target is unchanged')


# ------------------------------------------------------------------ checks

def preflight_source(source_alias: str, target_alias: str, *,
                     exclude: list[str] | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     progress: Progress = None) -> list[SourceProblem]:
    """Scan every row of *source_alias* for values *target_alias*'s
    engine would reject, and orphaned foreign keys (SQLite
    `PRAGMA foreign_key_check`). Nothing is read from the target.

    Reads only, in one snapshot. Returns [] when clean; raises
    PreflightError listing every problem (model, pk, field, reason).
    """
    specs = [ModelSpec.of(m) for m in transfer_models(exclude)]
    problems: list[SourceProblem] = []
    counter = [0]
    try:
        with source_snapshot(source_alias):
            fk = _foreign_key_problems(source_alias, specs)
            problems.extend(fk[:MAX_PROBLEMS])
            counter[0] += len(fk)
            for spec in specs:
                emit(progress, MODEL_START, spec.label)
                converter = Converter(spec, source_alias, None, problems,
                                      counter, check_alias=target_alias)
                rows = 0
                for batch in source_batches(source_alias, spec,
                                            batch_size):
                    converter.convert(batch)
                    rows += len(batch)
                emit(progress, MODEL_DONE, spec.label, rows=rows)
    except DatabaseError as err:
        raise TransferError(f'cannot read {describe_alias(source_alias)}: '
                            f'{first_line(err)}') from None
    raise_problems(problems, counter[0],
                   f'a {connections[target_alias].display_name} target')
    return []


def check_source(alias: str) -> None:
    """The source answers and, for SQLite, is an existing, readable
    database file (Django would silently create a missing one)."""
    problem = engines.for_alias(alias).source_problem(alias)
    if problem:
        raise TransferError(problem)
    schema.check_connection(alias)


def target_data_rows(alias: str, model_list: list[type[models.Model]]
                     ) -> dict[str, int]:
    """Rows per model on *alias*, leaving out rows `migrate` made."""
    skip = migrate_created_labels()
    counts = {}
    for model in model_list:
        if model._meta.label_lower in skip:
            continue
        rows = model_rows(alias, model)
        if rows:
            counts[model._meta.label] = rows
    return counts


def beyond_migrate(occupied: dict[str, int],
                   model_list: list[type[models.Model]]) -> dict[str, int]:
    """The entries of *occupied* (rows per model label on a target) that
    are more than this code's migrations make in an empty database.

    Third-party data migrations fill tables (a CMS's root page, default
    groups, a settings row): after the runbook's `migrate --database
    postgres` those rows are all PostgreSQL holds, and the copy replaces
    them. What migrate makes is measured, not listed: the migrations run
    on a scratch SQLite file in an isolated child (schema_build), and a
    table holding no more rows than that there counts as migrate's. Run
    only when the target holds rows (the first move's usual case)."""
    import tempfile
    from pathlib import Path

    from anthias_rollback import schema_build
    from anthias_rollback.engines import sqlite_file

    with tempfile.TemporaryDirectory(prefix='anthias-scratch-') as tmp:
        scratch = Path(tmp) / 'scratch.db'
        schema_build.migrate_file(scratch, timeout=600.0)
        conn = sqlite_file.sqlite_open_readonly(scratch, 5.0)
        try:
            made = sqlite_file.sqlite_table_counts(conn)
        finally:
            conn.close()
    tables = {m._meta.label: m._meta.db_table for m in model_list}
    return {label: rows for label, rows in occupied.items()
            if rows > made.get(tables.get(label, ''), 0)}


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
    specs = [ModelSpec.of(m) for m in model_list]
    target = engines.for_alias(target_alias)
    started = time.perf_counter()
    done: list[ModelTransfer] = []
    problems: list[SourceProblem] = []
    counter = [0]
    current: list[str | None] = [None]
    try:
        with _cyclic_gc_paused(), source_snapshot(source_alias), \
                target.bulk_load(target_alias):
            emit(progress, PHASE_START, 'checking the target')
            occupied = target_data_rows(target_alias, model_list)
            checking = 0.0
            if occupied and not replace:
                checking = time.perf_counter()
                occupied = beyond_migrate(occupied, model_list)
                checking = time.perf_counter() - checking
            if occupied and not replace:
                listed = ', '.join(f'{k} ({v} rows)'
                                   for k, v in occupied.items())
                raise TransferError(
                    f'{describe_alias(target_alias)} already holds data: '
                    f'{listed} (more rows than `migrate` makes); use '
                    '--replace to overwrite it or --repair to make it '
                    'equal to the source')
            fk = _foreign_key_problems(source_alias, specs)
            if fk:
                raise_problems(fk, len(fk), describe_alias(target_alias))
            tables = [s.table for s in specs]
            exclusions.empty_copied_tables(source_alias, target_alias,
                                           tables)
            indexes = target.drop_secondary_indexes(target_alias, tables)
            for spec in specs:
                current[0] = spec.label
                done.append(_copy_model(
                    spec, source_alias, target_alias, batch_size, problems,
                    counter, progress))
            current[0] = None
            raise_problems(problems, counter[0],
                           describe_alias(target_alias))
            emit(progress, PHASE_START, 'building indexes')
            target.create_indexes(target_alias, indexes)
            finish_target(source_alias, target_alias, model_list)
            checkpoint('transfer_before_commit')
    except DatabaseError as err:
        raise wrap_database_error(err, source_alias, target_alias,
                                  current[0]) from None
    return TransferResult(
        describe_alias(source_alias), describe_alias(target_alias),
        tuple(done), tuple(s.table for s in specs),
        sum(m.rows for m in done), time.perf_counter() - started,
        checking)


def finish_target(source_alias: str, target_alias: str,
                  model_list: list[type[models.Model]]) -> None:
    """Sequences and constraints, still inside the target transaction
    (PostgreSQL: sequences past the loaded ids; SQLite: sqlite_sequence
    raised to the source's, then a foreign-key check)."""
    orphans = engines.for_alias(target_alias).finish_load(
        source_alias, target_alias, model_list)
    if orphans:
        shown = '; '.join(f'{t} pk={pk!r} {c} -> {p}'
                          for t, pk, c, p in orphans[:20])
        raise TransferError(f'{len(orphans)} copied row(s) point to '
                            f'missing rows: {shown}; the target is '
                            f'unchanged')


def _copy_model(spec: ModelSpec, source_alias: str, target_alias: str,
                batch_size: int, problems: list, counter: list,
                progress: Progress) -> ModelTransfer:
    started = time.perf_counter()
    total = model_rows(source_alias, spec.model)
    emit(progress, MODEL_START, spec.label, total=total)
    converter = Converter(spec, source_alias, target_alias, problems,
                          counter)
    target = engines.for_alias(target_alias)
    batches = source_batches(source_alias, spec, batch_size,
                             converter.select_sql(source_alias))
    converted: Iterator[list]
    if target.ROWS_AS_COPY_TEXT:
        # COPY runs in a thread of its own (postgres_copy_rows): reading
        # and converting stay in this one.
        converted = (converter.convert(batch) for batch in batches)
    else:
        converted = _read_ahead(batches, converter.convert, spec.label)
    copied = [0]

    def converted_batches() -> Iterator[list]:
        # Progress and checkpoints in this thread, once a batch is in.
        for rows in converted:
            copied[0] += len(rows)
            yield rows
            emit(progress, BATCH, spec.label, rows=copied[0], total=total,
                 seconds=time.perf_counter() - started)
            checkpoint('transfer_batch')

    try:
        target.write_rows(target_alias, spec.table, list(spec.columns),
                          converted_batches())
    finally:
        # Stop (and wait for) a reader still running after a failure.
        converted.close()  # type: ignore[attr-defined]  # a generator
        batches.close()  # type: ignore[attr-defined]  # a generator
    seconds = time.perf_counter() - started
    emit(progress, MODEL_DONE, spec.label, rows=copied[0], total=total,
         seconds=seconds)
    return ModelTransfer(spec.label, spec.table, copied[0], seconds)
