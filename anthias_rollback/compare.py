"""Prove two aliases hold the same data, and find exactly where they don't.

Each side is read by a forked reader process (SideReader) in one
read-only snapshot, in primary-key order, as canonical rows (see
normalize.py), so the two sides use two cores.

Checksum mode (the default): random keys from the left side split the
key space into buckets of about BUCKET_ROWS rows; each reader hashes its
rows bucket by bucket and sends only (row count, checksum) per bucket.
Buckets that agree are identical; the key ranges of the others are read
again on both sides and merged row by row, which names the exact keys
and fields. The checksums use digest forms, cheaper per value than the
exact forms and equal whenever the exact ones are (a false mismatch only
costs a re-read). `deep=True`, and primary keys without byte-ordered
ranges, merge both whole tables row by row instead (merge_streams):
segment by segment, equal segments confirmed at once, mismatching ones
bisected by checksum down to the differing rows.

Key order: keys are compared in Python (code points = UTF-8 bytes), so
each engine must return that order and select ranges in it: SQLite
`COLLATE BINARY` (memcmp), PostgreSQL `~<~` / `~>=~` (memcmp, served by
Django's `*_like` text_pattern_ops index), never the database's locale
collation. Each chunk's keys are checked to be strictly increasing; a
disagreement raises CompareError instead of reporting false differences.
Key lists (`IN (...)`, only for --sample-size) are at most KEY_BATCH
long, under SQLite's variable limit. Memory holds one chunk per side,
one bucket or segment, and one checksum per bucket, whatever the table
size (plus the lists of differing keys, which the report must carry).
"""
import contextlib
import copy
import hashlib
import io
import itertools
import multiprocessing
import pickle
import queue
import random
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from django.db import DatabaseError, Error, connections, models
from django.db.utils import load_backend

from anthias_rollback import faults, models_graph, schema
from anthias_rollback.exceptions import (
    CompareError,
    DeadlineError,
    RollbackError,
    SchemaMismatchError,
)
from anthias_rollback.normalize import (
    ColumnPlan,
    normalize_chunk,
    plan_columns,
    value_field,
)
from anthias_rollback.report import describe_alias, first_line

CHUNK_ROWS = 5000
SEGMENT_ROWS = 4000
# Below this many rows on both sides a bisected segment is compared row
# by row: cheaper than two more checksums.
LEAF_ROWS = 16
SAMPLE_LIMIT = 1_000_000
# Checksum mode hashes buckets of about this many rows on each side and
# re-reads only mismatching buckets exactly: small enough that a changed
# row costs little to locate, large enough to hash per bucket, not per
# row. Past MAX_BUCKETS buckets grow instead (memory stays flat).
BUCKET_ROWS = 256
MAX_BUCKETS = 65536
# Keys per `IN (...)`: under SQLite's variable limit (999 on old builds).
KEY_BATCH = 500

TEXT_TYPES = {'CharField', 'TextField', 'SlugField', 'EmailField',
              'URLField', 'FilePathField'}
INT_TYPES = {'AutoField', 'BigAutoField', 'SmallAutoField', 'IntegerField',
             'BigIntegerField', 'SmallIntegerField', 'PositiveIntegerField',
             'PositiveBigIntegerField', 'PositiveSmallIntegerField'}


@dataclass(frozen=True)
class CompareEvent:
    """Progress: kind is 'model_start', 'batch' or 'model_done'."""
    kind: str
    label: str
    done: int = 0
    total: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelComparison:
    label: str
    table: str
    left_rows: int
    right_rows: int
    compared: int          # keys examined, of both sides, each once
    identical: int
    missing_keys: tuple    # on the left, not on the right
    extra_keys: tuple      # on the right, not on the left
    changed: tuple         # ((pk, (field names...)), ...)
    complete: bool
    seconds: float
    sampled: int = 0
    sample_differences: int = 0
    rechecked: int = 0     # rows re-read exactly (checksum mode)

    @property
    def differences(self) -> int:
        return (len(self.missing_keys) + len(self.extra_keys)
                + len(self.changed))

    @property
    def integrity(self) -> float:
        """identical / max(rows) in percent (100 for two empty tables)."""
        rows = max(self.left_rows, self.right_rows)
        return 100.0 if rows == 0 else 100.0 * self.identical / rows

    @property
    def ok(self) -> bool:
        return self.complete and self.differences == 0 \
            and self.left_rows == self.right_rows

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['changed'] = [{'pk': pk, 'fields': list(names)}
                           for pk, names in self.changed]
        data['missing_keys'] = list(self.missing_keys)
        data['extra_keys'] = list(self.extra_keys)
        data.update(integrity=round(self.integrity, 4), ok=self.ok,
                    differences=self.differences)
        return data


@dataclass(frozen=True)
class CompareReport:
    left_alias: str
    right_alias: str
    left_description: str
    right_description: str
    deep: bool
    sample_size: int
    models: tuple[ModelComparison, ...]
    not_compared: tuple[str, ...]
    complete: bool
    stopped_reason: str
    notes: tuple[str, ...]
    seconds: float

    @property
    def left_rows(self) -> int:
        return sum(m.left_rows for m in self.models)

    @property
    def right_rows(self) -> int:
        return sum(m.right_rows for m in self.models)

    @property
    def identical(self) -> int:
        return sum(m.identical for m in self.models)

    @property
    def differences(self) -> int:
        return sum(m.differences for m in self.models)

    @property
    def integrity(self) -> float:
        rows = sum(max(m.left_rows, m.right_rows) for m in self.models)
        return 100.0 if rows == 0 else 100.0 * self.identical / rows

    @property
    def min_model_integrity(self) -> float:
        return min((m.integrity for m in self.models), default=100.0)

    @property
    def ok(self) -> bool:
        return self.complete and all(m.ok for m in self.models)

    def at_risk_keys(self) -> dict[str, tuple]:
        """Right-side keys missing on the left or differing from it."""
        return {m.label: tuple(m.extra_keys)
                + tuple(pk for pk, _ in m.changed)
                for m in self.models if m.extra_keys or m.changed}

    def to_dict(self) -> dict[str, Any]:
        return {
            'left': self.left_description,
            'right': self.right_description,
            'mode': 'deep' if self.deep else 'checksum',
            'sample_size': self.sample_size,
            'complete': self.complete,
            'stopped_reason': self.stopped_reason,
            'ok': self.ok,
            'integrity': round(self.integrity, 4),
            'left_rows': self.left_rows,
            'right_rows': self.right_rows,
            'identical': self.identical,
            'differences': self.differences,
            'seconds': round(self.seconds, 3),
            'notes': list(self.notes),
            'not_compared': list(self.not_compared),
            'models': [m.to_dict() for m in self.models],
        }


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


# ---------------------------------------------------------------- snapshots

@contextmanager
def postgres_read_snapshot(alias: str, deadline: float | None
                           ) -> Iterator[None]:
    """One REPEATABLE READ READ ONLY transaction on a PostgreSQL alias."""
    connection = connections[alias]
    connection.set_autocommit(False)
    try:
        with connection.wrap_database_errors, \
                connection.connection.cursor() as cursor:
            # Must be the transaction's first statement.
            cursor.execute('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ '
                           'READ ONLY')
            if deadline is not None:
                # PostgreSQL: a sort before the first row must not outlive
                # --timeout; cancelled statements end as DeadlineError.
                ms = max(1, int((deadline - time.monotonic()) * 1000))
                cursor.execute(f'SET LOCAL statement_timeout = {ms}')
        yield
    finally:
        try:
            connection.rollback()
            connection.set_autocommit(True)
        except Error:  # incl. InterfaceError: the session is gone
            connection.close()


@contextmanager
def sqlite_read_snapshot(alias: str, deadline: float | None
                         ) -> Iterator[None]:
    """One deferred read transaction on a SQLite alias, query_only on."""
    connection = connections[alias]
    raw = connection.connection
    wrap = connection.wrap_database_errors
    # SQLite: a DEFERRED transaction takes no write lock (Django's atomic()
    # would BEGIN IMMEDIATE here); its first read pins the WAL snapshot.
    with wrap:
        raw.execute('PRAGMA query_only = ON')
        raw.execute('BEGIN DEFERRED')
    if deadline is not None:
        raw.set_progress_handler(
            lambda: int(time.monotonic() > deadline), 100_000)
    try:
        yield
    finally:
        raw.set_progress_handler(None, 0)
        with wrap:
            try:
                raw.execute('ROLLBACK')
            finally:
                raw.execute('PRAGMA query_only = OFF')


@contextmanager
def read_snapshot(alias: str, deadline: float | None = None
                  ) -> Iterator[None]:
    """Read *alias* in one consistent, read-only snapshot.

    Inside a caller's atomic block, that transaction is the snapshot.
    """
    connection = connections[alias]
    connection.ensure_connection()
    if connection.in_atomic_block:
        yield
        return
    if connection.vendor == 'postgresql':
        with postgres_read_snapshot(alias, deadline):
            yield
    elif connection.vendor == 'sqlite':
        with sqlite_read_snapshot(alias, deadline):
            yield
    else:
        raise CompareError(f'{describe_alias(alias)}: engine '
                           f'{connection.vendor} is not supported')


# ------------------------------------------------------------------ reading

def postgres_order_by(column: str, pk: models.Field) -> str:
    # PostgreSQL: ~<~ sorts text bytewise whatever the database locale.
    if value_field(pk).get_internal_type() in TEXT_TYPES:
        return f'{column} USING ~<~'
    return column


def sqlite_order_by(column: str, pk: models.Field) -> str:
    # SQLite: BINARY is memcmp; explicit in case the column has another.
    if value_field(pk).get_internal_type() in TEXT_TYPES:
        return f'{column} COLLATE BINARY'
    return column


_cursor_names = iter(range(1, 1 << 62))


def postgres_fetch_chunks(alias: str, sql: str, params: Sequence = ()
                          ) -> Iterator[list[tuple]]:
    # PostgreSQL: a named (server-side) cursor streams; a plain one would
    # pull the whole table into client memory on execute(). The raw
    # connection is taken here: the generator runs in a prefetch thread,
    # where `connections` (thread-local) has no open connection.
    connection = connections[alias]
    raw, wrap = connection.connection, connection.wrap_database_errors
    name = f'anthias_compare_{next(_cursor_names)}'

    def chunks() -> Iterator[list[tuple]]:
        cursor = raw.cursor(name=name, withhold=False)
        cursor.itersize = CHUNK_ROWS
        try:
            with wrap:
                # psycopg2 interpolates (and needs %% doubled) only when
                # given parameters.
                cursor.execute(sql, params or None)
                while rows := cursor.fetchmany(CHUNK_ROWS):
                    yield rows
        finally:
            # Closing fails in an aborted transaction; the rollback ends
            # it.
            with contextlib.suppress(Exception):
                cursor.close()
    return chunks()


def sqlite_fetch_chunks(alias: str, sql: str, params: Sequence = ()
                        ) -> Iterator[list[tuple]]:
    connection = connections[alias]
    raw, wrap = connection.connection, connection.wrap_database_errors

    def chunks() -> Iterator[list[tuple]]:
        cursor = raw.cursor()
        try:
            with wrap:
                cursor.execute(sql, params)
                while rows := cursor.fetchmany(CHUNK_ROWS):
                    yield rows
        finally:
            cursor.close()
    return chunks()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(chunks: Iterator, depth: int = 2) -> Iterator:
    """Run *chunks* in a thread, *depth* items ahead of the consumer.

    sqlite3 and psycopg2 release the GIL while the engine works, so the
    next chunk is read while this one is normalized (measured: -25% at
    100,000 assets on 2 cores). The queue bounds memory.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    break
            else:
                put(done)
        except BaseException as err:  # noqa: BLE001 handed to the consumer
            put(_Failure(err))
        finally:
            chunks.close()

    thread = threading.Thread(target=work, daemon=True,
                              name='anthias-compare-prefetch')
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def select_ordered_sql(model: type[models.Model], alias: str,
                       plans: tuple[ColumnPlan, ...], where: str = '') -> str:
    connection = connections[alias]
    quote = connection.ops.quote_name
    columns = ', '.join(p.sql for p in plans)
    pk_column = quote(model._meta.pk.column)
    if connection.vendor == 'postgresql':
        order = postgres_order_by(pk_column, model._meta.pk)
    else:
        order = sqlite_order_by(pk_column, model._meta.pk)
    where = f' WHERE {where}' if where else ''
    return (f'SELECT {columns} FROM {quote(model._meta.db_table)}{where} '
            f'ORDER BY {order}')


def key_kind(model: type[models.Model]) -> str | None:
    """'text', 'int' or 'uuid': primary keys both engines can select by
    range in bytewise order (None: only whole-table streams)."""
    internal = value_field(model._meta.pk).get_internal_type()
    if internal in TEXT_TYPES:
        return 'text'
    if internal in INT_TYPES:
        return 'int'
    if internal == 'UUIDField':
        return 'uuid'
    return None


def key_range_sql(model: type[models.Model], alias: str, low: Any,
                  high: Any) -> tuple[str, list]:
    """WHERE clause and parameters for canonical keys in [low, high)
    (None: unbounded), in the bytewise order the streams use."""
    connection = connections[alias]
    column = connection.ops.quote_name(model._meta.pk.column)
    kind = key_kind(model)
    ge, lt, mark = '>=', '<', '?'
    if connection.vendor == 'postgresql':
        mark = '%s::uuid' if kind == 'uuid' else '%s'
        if kind == 'text':
            # The ~>=~ family compares bytes, like ORDER BY ... USING ~<~,
            # and is served by Django's *_like index.
            ge, lt = '~>=~', '~<~'
    elif kind == 'text':
        column = f'{column} COLLATE BINARY'
    clauses, params = [], []
    for bound, op in ((low, ge), (high, lt)):
        if bound is not None:
            clauses.append(f'{column} {op} {mark}')
            params.append(bound)
    return ' AND '.join(clauses), params


def key_in_sql(model: type[models.Model], alias: str, keys: list
               ) -> tuple[str, list]:
    """WHERE clause and parameters for canonical keys in *keys* (at most
    KEY_BATCH of them: under SQLite's variable limit)."""
    connection = connections[alias]
    column = connection.ops.quote_name(model._meta.pk.column)
    if connection.vendor == 'postgresql':
        cast = '::uuid[]' if key_kind(model) == 'uuid' else ''
        return f'{column} = ANY(%s{cast})', [list(keys)]
    return f'{column} IN ({", ".join("?" * len(keys))})', list(keys)


def stream_canonical_columns(model: type[models.Model], alias: str, *,
                             fast: bool = True, digest: bool = False,
                             where: tuple[str, list] = ('', [])
                             ) -> Iterator[list[list]]:
    """Chunks of canonical rows as columns (pk first), in bytewise pk
    order, optionally restricted by a (WHERE clause, params) pair
    (*digest*: digest forms, see normalize.py)."""
    connection = connections[alias]
    plans = plan_columns(model, alias, fast=fast, digest=digest)
    clause, params = where
    sql = select_ordered_sql(model, alias, plans, clause)
    if connection.vendor == 'postgresql':
        chunks = prefetch(postgres_fetch_chunks(alias, sql, params))
    else:
        chunks = prefetch(sqlite_fetch_chunks(alias, sql, params))
    previous = None
    for raw in chunks:
        columns = normalize_chunk(raw, plans, alias)
        keys = columns[0]
        first = keys[0]
        if (previous is not None and not previous < first) or not all(
                a < b for a, b in itertools.pairwise(keys)):
            raise CompareError(
                f'{model._meta.label}: {describe_alias(alias)} does not '
                f'return primary keys in bytewise order (custom collation '
                f'on {model._meta.pk.column}?); cannot compare safely')
        previous = keys[-1]
        yield columns


def stream_canonical_rows(model: type[models.Model], alias: str,
                          fast: bool = True, low: Any = None,
                          high: Any = None
                          ) -> Iterator[tuple[list, list[tuple]]]:
    """(keys, rows) chunks of canonical rows in bytewise pk order, keys
    in [low, high) when given (*fast*=False: every value through the
    field converters)."""
    where = key_range_sql(model, alias, low, high) \
        if low is not None or high is not None else ('', [])
    for columns in stream_canonical_columns(model, alias, fast=fast,
                                            where=where):
        yield columns[0], list(zip(*columns))


def key_sample(model: type[models.Model], alias: str, size: int) -> list:
    """Canonical keys of *size* random rows, in bytewise order.

    Bucket bounds need no particular keys, only the same ones on both
    sides: random ones cost one scan in the engine (0.3 s for 1,000,000
    assets on SQLite) where every n-th key in order cost a pass through
    Python.
    """
    if size <= 0:
        return []
    connection = connections[alias]
    quote = connection.ops.quote_name
    plans = plan_columns(model, alias)[:1]
    sql = (f'SELECT {plans[0].sql} FROM {quote(model._meta.db_table)} '
           f'ORDER BY random() LIMIT {int(size)}')
    with connection.cursor() as cursor:
        cursor.execute(sql)
        rows = cursor.fetchall()
    return sorted(normalize_chunk(rows, plans, alias)[0])


def bucket_digests(model: type[models.Model], alias: str, bounds: list,
                   on_rows: Callable[[int], None] | None = None
                   ) -> list[tuple[int, bytes]]:
    """(row count, checksum) of the canonical rows in each bucket:
    bucket i holds keys in [bounds[i-1], bounds[i]), the first and last
    open-ended. One ordered pass; memory holds one chunk and one bucket.
    """
    digests: list[tuple[int, bytes]] = []
    pending: list[list] | None = None
    done = 0

    def close() -> None:
        nonlocal pending
        if pending is None or not pending[0]:
            digests.append((0, b''))
        else:
            digests.append((len(pending[0]), checksum_rows(pending)))
        pending = None

    for columns in stream_canonical_columns(model, alias, digest=True):
        keys = columns[0]
        if pending is None:
            pending = [[] for _ in columns]
        pos = 0
        while pos < len(keys):
            index = len(digests)
            end = (len(keys) if index == len(bounds)
                   else bisect_left(keys, bounds[index], pos))
            for target, column in zip(pending, columns):
                target += column[pos:end]
            pos = end
            if pos < len(keys):
                close()
                pending = [[] for _ in columns]
        done += len(keys)
        if on_rows is not None:
            on_rows(done)
        faults.checkpoint('compare:digest-chunk')
    close()
    while len(digests) <= len(bounds):
        digests.append((0, b''))
    return digests


def rows_for_keys(model: type[models.Model], alias: str, keys: list
                  ) -> tuple[list, list[tuple]]:
    """(keys, rows) of the canonical rows whose keys are in *keys*."""
    found_keys: list = []
    found_rows: list[tuple] = []
    for start in range(0, len(keys), KEY_BATCH):
        where = key_in_sql(model, alias, keys[start:start + KEY_BATCH])
        for columns in stream_canonical_columns(model, alias, where=where):
            found_keys += columns[0]
            found_rows += zip(*columns)
    return found_keys, found_rows


# --------------------------------------------------------------- comparing

def checksum_rows(rows: list[tuple]) -> bytes:
    """Engine-neutral checksum of canonical rows.

    Canonical values are None/bool/int/float/str, which pickle encodes by
    value and type alone once memoizing is off (`fast`; with the memo a
    string object repeated on one side only would change the bytes).
    5x faster than repr() (measured: 4,000 asset rows, 3.5 ms vs 18 ms).
    """
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=4)
    pickler.fast = True
    pickler.dump(rows)
    return hashlib.blake2b(buffer.getbuffer(), digest_size=16).digest()


class _Tally:
    """Mutable counters for one model while it is compared."""

    def __init__(self, names: list[str], sample: set[int] | None):
        self.names = names
        self.identical = 0
        self.missing: list = []
        self.extra: list = []
        self.changed: list = []
        self.left_seen = 0
        self.sample = sample
        self.sampled = 0
        self.sample_differences = 0
        self.rechecked = 0

    @property
    def compared(self) -> int:
        """Keys examined so far (both sides' keys, each once)."""
        return (self.identical + len(self.changed) + len(self.missing)
                + len(self.extra))

    def changed_fields(self, left: tuple, right: tuple) -> tuple[str, ...]:
        return tuple(name for name, a, b in zip(self.names, left, right)
                     if a != b)

    def compare_rows(self, lkeys: list, lrows: list, rkeys: list,
                     rrows: list) -> None:
        """Field by field, merging the two key-sorted lists."""
        i = j = 0
        nl, nr = len(lkeys), len(rkeys)
        while i < nl or j < nr:
            if j >= nr or (i < nl and lkeys[i] < rkeys[j]):
                self.missing.append(lkeys[i])
                i += 1
            elif i >= nl or rkeys[j] < lkeys[i]:
                self.extra.append(rkeys[j])
                j += 1
            else:
                if lrows[i] == rrows[j]:
                    self.identical += 1
                else:
                    self.changed.append(
                        (lkeys[i], self.changed_fields(lrows[i], rrows[j])))
                i += 1
                j += 1

    def segment(self, lkeys: list, lrows: list, rkeys: list,
                rrows: list) -> None:
        """A whole segment: equal canonical rows, or bisect."""
        # Both sides' canonical rows are in this process: comparing them is
        # exact and cheaper than hashing both (measured: 0.1 s vs 0.9 s per
        # 100,000 asset pairs). Checksums localize what differs.
        if lkeys == rkeys and lrows == rrows:
            self.identical += len(lkeys)
            return
        self.bisect(lkeys, lrows, rkeys, rrows)

    def bisect(self, lkeys: list, lrows: list, rkeys: list,
               rrows: list) -> None:
        """Checksums over halves by key until the differing rows are few."""
        if lkeys == rkeys and checksum_rows(lrows) == checksum_rows(rrows):
            self.identical += len(lkeys)
            return
        if len(lkeys) <= LEAF_ROWS and len(rkeys) <= LEAF_ROWS:
            self.compare_rows(lkeys, lrows, rkeys, rrows)
            return
        longer = lkeys if len(lkeys) >= len(rkeys) else rkeys
        pivot = longer[len(longer) // 2]
        li, ri = bisect_left(lkeys, pivot), bisect_left(rkeys, pivot)
        self.bisect(lkeys[:li], lrows[:li], rkeys[:ri], rrows[:ri])
        self.bisect(lkeys[li:], lrows[li:], rkeys[ri:], rrows[ri:])

    def check_sample(self, lkeys: list, lrows: list, rkeys: list,
                     rrows: list) -> None:
        """Field by field on the sampled left positions of this segment."""
        start = self.left_seen
        for offset, key in enumerate(lkeys):
            if start + offset not in self.sample:
                continue
            self.sampled += 1
            j = bisect_left(rkeys, key)
            if j == len(rkeys) or rkeys[j] != key or \
                    self.changed_fields(lrows[offset], rrows[j]):
                self.sample_differences += 1


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
        wanted = {f.column for f in model._meta.concrete_fields}
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


def _count_rows(model: type[models.Model], alias: str) -> int:
    return model._base_manager.using(alias).count()


class LocalReader:
    """Reads one alias in this process; the caller holds its snapshot."""

    def __init__(self, alias: str):
        self.alias = alias
        self._digest_request: tuple | None = None

    def count(self, model: type[models.Model]) -> int:
        return _count_rows(model, self.alias)

    def stream(self, model: type[models.Model], low: Any = None,
               high: Any = None) -> Iterator:
        return stream_canonical_rows(model, self.alias, low=low, high=high)

    def key_sample(self, model: type[models.Model], size: int) -> list:
        return key_sample(model, self.alias, size)

    def start_digests(self, model: type[models.Model], bounds: list,
                      report: bool = False) -> None:
        self._digest_request = (model, bounds)

    def finish_digests(self, on_rows: Callable[[int], None] | None = None
                       ) -> list[tuple[int, bytes]]:
        model, bounds = self._digest_request
        return bucket_digests(model, self.alias, bounds, on_rows)

    def rows_for_keys(self, model: type[models.Model], keys: list
                      ) -> tuple[list, list[tuple]]:
        return rows_for_keys(model, self.alias, keys)


class SideReader:
    """One alias read by a forked child process, in the child's snapshot.

    Normalizing is pure Python, so one process per side is what uses a
    second core (measured: 1,000,000 assets, see bench/bench_validate.py).
    The child opens its own connection (the inherited one is never used
    or closed there: it shares the parent's socket or file) and holds one
    read snapshot for every model; it answers LocalReader calls sent
    through a pipe, whose buffer bounds memory. Only for aliases not
    inside an atomic block: uncommitted rows are invisible to another
    connection.
    """

    def __init__(self, alias: str, deadline: float | None):
        context = multiprocessing.get_context('fork')
        self.pipe, child = context.Pipe(duplex=True)
        settings = copy.deepcopy(connections[alias].settings_dict)
        self.process = context.Process(
            target=_side_reader_main, args=(child, alias, settings,
                                            deadline),
            daemon=True, name=f'anthias-compare-{alias}')
        self.process.start()
        child.close()
        self._receive()

    def _receive(self) -> tuple:
        try:
            message = self.pipe.recv()
        except EOFError:
            raise CompareError('the reader process stopped unexpectedly') \
                from None
        if message[0] == 'error':
            _, database_error, text = message
            raise (DatabaseError if database_error else CompareError)(text)
        return message

    def _call(self, *request: Any) -> Any:
        self.pipe.send(request)
        return self._receive()[1]

    def count(self, model: type[models.Model]) -> int:
        return self._call('count', model._meta.label)

    def stream(self, model: type[models.Model], low: Any = None,
               high: Any = None) -> Iterator:
        self.pipe.send(('stream', model._meta.label, low, high))

        def chunks() -> Iterator:
            while (message := self._receive())[0] == 'chunk':
                yield message[1], message[2]
        return prefetch(chunks())

    def key_sample(self, model: type[models.Model], size: int) -> list:
        return self._call('sample', model._meta.label, size)

    def start_digests(self, model: type[models.Model], bounds: list,
                      report: bool = False) -> None:
        """Start hashing; both sides' children work at once. Only one
        side should *report* progress: its messages wait in the pipe
        while the parent reads the other side."""
        self.pipe.send(('digests', model._meta.label, bounds, report))

    def finish_digests(self, on_rows: Callable[[int], None] | None = None
                       ) -> list[tuple[int, bytes]]:
        while (message := self._receive())[0] == 'progress':
            if on_rows is not None:
                on_rows(message[1])
        return message[1]

    def rows_for_keys(self, model: type[models.Model], keys: list
                      ) -> tuple[list, list[tuple]]:
        return self._call('rows', model._meta.label, keys)

    def close(self) -> None:
        # A reader stopped mid-stream (timeout) may be blocked on a full
        # pipe: it only reads, so ending it is safe.
        with contextlib.suppress(OSError):
            self.pipe.send(('stop', ''))
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.pipe.close()


def _serve_reader(pipe: Any, reader: LocalReader) -> None:
    while (message := pipe.recv())[0] != 'stop':
        kind, label, *args = message
        model = models_graph.get_model(label)
        if kind == 'count':
            pipe.send(('value', reader.count(model)))
        elif kind == 'stream':
            for keys, rows in reader.stream(model, *args):
                pipe.send(('chunk', keys, rows))
            pipe.send(('end',))
        elif kind == 'sample':
            pipe.send(('value', reader.key_sample(model, *args)))
        elif kind == 'digests':
            bounds, report = args
            reader.start_digests(model, bounds)
            on_rows = (lambda done: pipe.send(('progress', done))) \
                if report else None
            pipe.send(('value', reader.finish_digests(on_rows)))
        elif kind == 'rows':
            pipe.send(('value', reader.rows_for_keys(model, *args)))


def _side_reader_main(pipe: Any, alias: str, settings_dict: dict,
                      deadline: float | None) -> None:
    inherited = connections[alias]  # kept referenced: never closed here
    connections[alias] = load_backend(settings_dict['ENGINE']) \
        .DatabaseWrapper(settings_dict, alias)
    try:
        with read_snapshot(alias, deadline):
            pipe.send(('ready',))
            _serve_reader(pipe, LocalReader(alias))
    except BaseException as err:  # noqa: BLE001 reported to the parent
        with contextlib.suppress(OSError):
            pipe.send(('error', isinstance(err, Error),
                       str(err) if isinstance(err, RollbackError)
                       else first_line(err)))
    finally:
        connections[alias].close()
        del inherited


Reader = LocalReader | SideReader


def merge_streams(tally: '_Tally', left: Iterator, right: Iterator, *,
                  deep: bool, deadline: float | None,
                  on_batch: Callable[[], None] | None = None) -> bool:
    """Compare two key-ordered (keys, rows) streams segment by segment
    into *tally*; False if *deadline* stopped it first."""
    lk: list = []
    lr: list = []
    rk: list = []
    rr: list = []
    left_done = right_done = False
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                return False
            while not left_done and len(lk) < SEGMENT_ROWS:
                chunk = next(left, None)
                if chunk is None:
                    left_done = True
                else:
                    lk += chunk[0]
                    lr += chunk[1]
            while not right_done and len(rk) < SEGMENT_ROWS:
                chunk = next(right, None)
                if chunk is None:
                    right_done = True
                else:
                    rk += chunk[0]
                    rr += chunk[1]
            if not lk and not rk:
                return True
            # The segment ends where both sides are known to be complete.
            if left_done and right_done:
                nl, nr = len(lk), len(rk)
            else:
                if left_done:
                    bound = rk[-1]
                elif right_done:
                    bound = lk[-1]
                else:
                    bound = min(lk[-1], rk[-1])
                nl, nr = bisect_right(lk, bound), bisect_right(rk, bound)
            seg = (lk[:nl], lr[:nl], rk[:nr], rr[:nr])
            if deep:
                tally.compare_rows(*seg)
            else:
                tally.segment(*seg)
            if tally.sample:
                tally.check_sample(*seg)
            tally.left_seen += nl
            del lk[:nl], lr[:nl], rk[:nr], rr[:nr]
            if on_batch is not None:
                on_batch()
    finally:
        left.close()
        right.close()


def mismatched_ranges(bounds: list, left: list, right: list
                      ) -> tuple[int, list[tuple[Any, Any]]]:
    """(rows in equal buckets, key ranges [low, high) of the unequal
    ones, neighbours merged into one range)."""
    equal_rows = 0
    ranges: list[tuple[Any, Any]] = []
    for index, (a, b) in enumerate(zip(left, right, strict=True)):
        if a == b:
            equal_rows += a[0]
            continue
        low = bounds[index - 1] if index else None
        high = bounds[index] if index < len(bounds) else None
        if ranges and low is not None and ranges[-1][1] == low:
            ranges[-1] = (ranges[-1][0], high)
        else:
            ranges.append((low, high))
    return equal_rows, ranges


def _compare_by_buckets(model: type[models.Model], tally: '_Tally',
                        left: Reader, right: Reader, rows: int,
                        sample_size: int, deadline: float | None,
                        on_rows: Callable[[int], None]) -> bool:
    """Checksum mode: bucket checksums on both sides at once, exact
    comparison of mismatching buckets only, then the sample by key.
    False if *deadline* stopped it."""
    buckets = min(MAX_BUCKETS, rows // BUCKET_ROWS)
    bounds = left.key_sample(model, buckets - 1) if buckets > 1 else []
    left.start_digests(model, bounds, report=True)
    right.start_digests(model, bounds)
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
    for start in range(0, len(sampled), KEY_BATCH):
        if deadline is not None and time.monotonic() > deadline:
            return False
        batch = sampled[start:start + KEY_BATCH]
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
                  progress: Callable[[CompareEvent], None] | None = None,
                  rng: random.Random | None = None,
                  left_reader: Reader | None = None,
                  right_reader: Reader | None = None
                  ) -> ModelComparison:
    """Compare one model; both aliases must already be in their snapshots
    (or be read by a SideReader).

    Checksum mode (not *deep*) hashes key-range buckets on both sides and
    compares only mismatching buckets row by row; *deep*, and primary
    keys without byte-ordered ranges, merge both whole tables. Stops at
    *deadline* (time.monotonic()) with complete=False.
    """
    started = time.monotonic()
    label = model._meta.label
    left = left_reader or LocalReader(left_alias)
    right = right_reader or LocalReader(right_alias)
    left_rows = left.count(model)
    right_rows = right.count(model)
    by_buckets = not deep and key_kind(model) is not None
    sample = None
    if sample_size and not by_buckets:
        sample = set((rng or random.Random()).sample(
            range(left_rows), min(sample_size, left_rows)))
    names = [p.field.name for p in plan_columns(model, left_alias)]
    tally = _Tally(names, sample)
    if progress:
        progress(CompareEvent('model_start', label, 0, left_rows))

    def on_rows(done: int) -> None:
        if progress:
            progress(CompareEvent('batch', label, done, left_rows,
                                  time.monotonic() - started))

    try:
        if by_buckets:
            complete = _compare_by_buckets(
                model, tally, left, right, max(left_rows, right_rows),
                min(sample_size, left_rows), deadline, on_rows)
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
    if progress:
        progress(CompareEvent('model_done', label, tally.left_seen,
                              left_rows, seconds))
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
                    progress: Callable[[CompareEvent], None] | None = None,
                    seed: int | None = None,
                    parallel: bool | None = None) -> CompareReport:
    """Compare every model's rows between two aliases.

    Reads both aliases, writes neither: each is read in one snapshot
    (SQLite: one deferred read transaction with query_only; PostgreSQL:
    REPEATABLE READ READ ONLY), rolled back at the end. *left* is the
    reference (SQLite, a backup); keys only there are `missing_keys`,
    keys only on *right* are `extra_keys`. With *timeout* (seconds) it
    stops cleanly and returns complete=False. *parallel* (default: yes
    where fork exists) reads each side that is not inside an atomic block
    in a forked process holding that side's snapshot. Raises
    DatabaseUnavailableError, SchemaMismatchError, CompareError.
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
                    stack.enter_context(read_snapshot(alias, deadline))
            for model in model_list:
                if deadline is not None and time.monotonic() > deadline:
                    break
                result = compare_model(
                    model, left_alias, right_alias, deep=deep,
                    sample_size=min(sample_size, SAMPLE_LIMIT),
                    deadline=deadline, progress=progress, rng=rng,
                    left_reader=readers.get(left_alias),
                    right_reader=readers.get(right_alias))
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
                      progress: Callable[[CompareEvent], None] | None = None
                      ) -> dict[str, tuple]:
    """Keys of rows on *live_alias* that are missing from
    *reference_alias* (e.g. a backup) or differ from it, per model label.

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


# ------------------------------------------------------------- performance

DEGRADED_RATIO = 3.0
# Sub-millisecond queries are dominated by the round trip that an
# in-process SQLite never pays; a ratio there says nothing about the data.
DEGRADED_FLOOR_MS = 1.0
PERF_REPEAT = 3


def _time_query(run: Callable[[str], Any], alias: str) -> float:
    times = []
    for _ in range(PERF_REPEAT):
        started = time.perf_counter()
        run(alias)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def _indexed_field(model: type[models.Model]) -> models.Field | None:
    for f in model._meta.concrete_fields:
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
                              progress: Callable[[CompareEvent], None]
                              | None = None) -> PerformanceReport:
    """Time representative queries per model on both aliases (median of
    three): count, pk lookup, filter on an indexed field, ORDER BY pk
    LIMIT. Reads only, outside any explicit transaction. Raises
    CompareError if a query fails."""
    if max_query_ms is not None and max_query_ms <= 0:
        raise CompareError(f'max query time must be > 0 ms, not '
                           f'{max_query_ms}')
    timings = []
    for model in resolve_models(models):
        label = model._meta.label
        if progress:
            progress(CompareEvent('model_start', label))
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



SQLITE_HEADER = b'SQLite format 3\x00'


def check_sqlite_file(path: Path) -> None:
    """CompareError unless *path* is an existing SQLite database file.

    Checked before an alias is opened on it: sqlite3 would silently
    create an empty database at a mistyped path.
    """
    path = Path(path)
    if not path.exists():
        raise CompareError(f'SQLite file {path} does not exist')
    if not path.is_file():
        raise CompareError(f'SQLite file {path} is not a regular file')
    try:
        with path.open('rb') as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as err:
        raise CompareError(f'cannot read SQLite file {path}: '
                           f'{err.strerror}') from None
    if header != SQLITE_HEADER:
        raise CompareError(f'{path} is not a SQLite database '
                           '(no SQLite header)')
