"""PostgreSQL side of the transfer: COPY, snapshots, indexes, sequences."""
import contextlib
import datetime as dt
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.core.management.color import no_style
from django.db import Error, connections, models, transaction

from anthias_rollback.engines import ValueRejected
from anthias_rollback.engines.postgres_journal import (
    postgres_allow_copy_past_fence,
)

# How long the producer waits on a full queue before checking that the
# COPY thread is still alive (it may have died on a server error).
_PUT_POLL_SECONDS = 0.5


class CopyAborted(Exception):
    """Raised inside the COPY reader to make psycopg2 send CopyFail."""


def postgres_text(value: object) -> str:
    """One value (already adapted by its field) in COPY text format.

    COPY text: NULL is \\N; backslash, tab, newline and CR are escaped.
    """
    if value is None:
        return '\\N'
    if isinstance(value, str):
        return postgres_escape(value)
    if value is True:
        return 't'
    if value is False:
        return 'f'
    if isinstance(value, (int, Decimal, UUID)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return postgres_interval(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        # bytea hex format; the backslash itself is escaped for COPY.
        return '\\\\x' + bytes(value).hex()
    adapted = getattr(value, 'adapted', None)
    dumps = getattr(value, 'dumps', None)
    if dumps is not None:
        # psycopg2 Json/Jsonb wrapper (JSONField on PostgreSQL).
        return postgres_escape(dumps(adapted))
    addr = getattr(value, 'addr', None)
    if addr is not None:
        # psycopg2 Inet wrapper (GenericIPAddressField).
        return postgres_escape(str(addr))
    if adapted is not None:
        return postgres_text(adapted)
    return postgres_escape(str(value))


def postgres_escape(text: str) -> str:
    if '\\' in text:
        text = text.replace('\\', '\\\\')
    if '\t' in text:
        text = text.replace('\t', '\\t')
    if '\n' in text:
        text = text.replace('\n', '\\n')
    if '\r' in text:
        text = text.replace('\r', '\\r')
    return text


def postgres_interval(value: dt.timedelta) -> str:
    # Days and seconds kept apart, as Django's own interval literals do,
    # so the value reads back as the same timedelta.
    return (f'{value.days} days {value.seconds} seconds '
            f'{value.microseconds} microseconds')


@contextmanager
def read_snapshot(alias: str, deadline: float | None = None
                  ) -> Iterator[None]:
    """One REPEATABLE READ READ ONLY transaction on *alias* for the block:
    every statement sees the same snapshot. *deadline* (a
    time.monotonic() value) becomes a statement_timeout, so a sort before
    the first row cannot outlive it. Inside a caller's atomic block, that
    transaction is the snapshot."""
    connection = connections[alias]
    connection.ensure_connection()
    if connection.in_atomic_block:
        yield
        return
    connection.set_autocommit(False)
    try:
        with connection.wrap_database_errors, \
                connection.connection.cursor() as cursor:
            # Must be the transaction's first statement.
            cursor.execute('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ '
                           'READ ONLY')
            if deadline is not None:
                ms = max(1, int((deadline - time.monotonic()) * 1000))
                cursor.execute(f'SET LOCAL statement_timeout = {ms}')
        yield
    finally:
        try:
            connection.rollback()
            connection.set_autocommit(True)
        except Error:  # incl. InterfaceError: the session is gone
            connection.close()


_cursor_names = iter(range(1, 1 << 62))


def fetch_chunks(alias: str, sql: str, params: Sequence = (),
                 chunk_rows: int = 5000) -> Iterator[list[tuple]]:
    """Rows of *sql* in chunks through a named (server-side) cursor: a
    plain one would pull the whole result into memory on execute(). Needs
    an open transaction (read_snapshot). The raw connection is taken now,
    so the generator may run in another thread."""
    connection = connections[alias]
    connection.ensure_connection()
    raw, wrap = connection.connection, connection.wrap_database_errors
    name = f'anthias_read_{next(_cursor_names)}'

    def chunks() -> Iterator[list[tuple]]:
        cursor = raw.cursor(name=name, withhold=False)
        cursor.itersize = chunk_rows
        try:
            with wrap:
                # psycopg2 interpolates (and needs %% doubled) only when
                # given parameters.
                cursor.execute(sql, params or None)
                while rows := cursor.fetchmany(chunk_rows):
                    yield rows
        finally:
            # Closing fails in an aborted transaction; the rollback ends it.
            with contextlib.suppress(Exception):
                cursor.close()
    return chunks()


def byte_order(column: str, text: bool) -> str:
    """ORDER BY expression sorting *column* bytewise."""
    # PostgreSQL: ~<~ sorts text bytewise whatever the database locale.
    return f'{column} USING ~<~' if text else column


def key_range_clause(column: str, kind: str | None, low: object,
                     high: object) -> tuple[str, list]:
    """WHERE clause and parameters for keys in [low, high) (None:
    unbounded) in byte order; *kind* is fields.key_kind()."""
    mark = '%s::uuid' if kind == 'uuid' else '%s'
    # The ~>=~ family compares bytes, like ORDER BY ... USING ~<~, and is
    # served by Django's *_like index.
    ge, lt = ('~>=~', '~<~') if kind == 'text' else ('>=', '<')
    clauses, params = [], []
    for bound, op in ((low, ge), (high, lt)):
        if bound is not None:
            clauses.append(f'{column} {op} {mark}')
            params.append(bound)
    return ' AND '.join(clauses), params


def key_in_clause(column: str, kind: str | None, keys: Sequence
                  ) -> tuple[str, list]:
    """WHERE clause and parameters for keys in *keys* (one array
    parameter, whatever their number)."""
    cast = '::uuid[]' if kind == 'uuid' else ''
    return f'{column} = ANY(%s{cast})', [list(keys)]


def postgres_bulk_load_settings(alias: str) -> None:
    """Session settings for the load, local to the open transaction.

    PostgreSQL: synchronous_commit=off only risks losing the commit on a
    server crash right after it, never a torn table; Django's FKs are
    DEFERRABLE, so deferring them lets tables load in any order.
    """
    with connections[alias].cursor() as cursor:
        cursor.execute('SET LOCAL synchronous_commit = off')
        cursor.execute('SET CONSTRAINTS ALL DEFERRED')
        cursor.execute("SET LOCAL maintenance_work_mem = '128MB'")



@contextmanager
def bulk_load(alias: str) -> Iterator[None]:
    """The target transaction of a copy into *alias*, with the bulk-load
    session settings local to it."""
    with transaction.atomic(using=alias):
        postgres_bulk_load_settings(alias)
        # After a rollback the fence is up: this copy (and no stale app
        # process) may write, so that a new window can follow.
        postgres_allow_copy_past_fence(alias)
        yield


def write_rows(alias: str, table: str, columns: list[str],
               batches: Iterator[list]) -> None:
    """COPY converted rows (COPY text lines) batch by batch."""
    def chunks() -> Iterator[bytes]:
        for rows in batches:
            if rows:
                yield ('\n'.join(rows) + '\n').encode('utf-8')
    # COPY FREEZE: the tables were truncated in this transaction, so
    # PostgreSQL may write the rows already frozen (no hint-bit or vacuum
    # rewrite later). FREEZE needs the truncation in the current
    # subtransaction; inside a caller's savepoint (tests) it may not be.
    postgres_copy_rows(alias, table, columns, chunks(),
                       freeze=not connections[alias].savepoint_ids
                       and postgres_may_freeze(alias, table))


# Rows handed to write_rows are COPY text lines (see rows.py).
ROWS_AS_COPY_TEXT = True
# JSON arrives decoded (jsonb): no text of ours to parse.
JSON_AS_TEXT = False

# Fields whose get_db_prep_value returns str/int/bool unchanged on
# PostgreSQL skip the call (measured: a third of the copy's time).
_IDENTITY_TYPES = {
    'CharField', 'TextField', 'SlugField', 'EmailField', 'URLField',
    'BooleanField', 'NullBooleanField', 'IntegerField', 'BigIntegerField',
    'SmallIntegerField', 'PositiveIntegerField', 'PositiveBigIntegerField',
    'PositiveSmallIntegerField', 'AutoField', 'BigAutoField',
    'SmallAutoField',
}


def select_sql(alias: str, table: str, fields: Sequence) -> str:
    """SELECT of *fields* of *table* for the copy's reader."""
    quote = connections[alias].ops.quote_name
    return (f'SELECT {", ".join(quote(f.column) for f in fields)} '
            f'FROM {quote(table)}')


def value_checker(field: models.Field, alias: str
                  ) -> Callable[[Any], None] | None:
    """Raise ValueRejected for a Python value PostgreSQL would reject
    (SQLite accepts all of these, so a legacy file can hold them)."""
    from anthias_rollback import fields

    typed = fields.value_field(field)
    internal = typed.get_internal_type()
    ranges = fields.integer_ranges(alias)
    if internal in ranges:
        low, high = ranges[internal]

        def check_int(value: Any) -> None:
            if value is not None and not low <= value <= high:
                raise ValueRejected(f'integer {value} out of range for '
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
                raise ValueRejected('JSON holds NaN or Infinity, which '
                                    'PostgreSQL jsonb rejects') from None
            if '\\u0000' in text:
                raise ValueRejected('JSON holds a NUL character (\\u0000), '
                                    'which PostgreSQL jsonb rejects')
        return check_json
    if internal == 'DecimalField':
        digits, places = typed.max_digits, typed.decimal_places

        def check_decimal(value: Any) -> None:
            # numeric(p, s) rounds the fraction but refuses a number
            # with more than p - s digits before the point (the whole
            # COPY would fail).
            if isinstance(value, Decimal) and value.is_finite() \
                    and value and value.adjusted() >= digits - places:
                raise ValueRejected(f'{value} has more than '
                                    f'{digits - places} digits before the '
                                    f'point (numeric({digits}, {places}))')
        return check_decimal
    max_length = getattr(typed, 'max_length', None)
    if internal == 'BinaryField':
        return None

    def check_text(value: Any) -> None:
        if isinstance(value, str):
            if '\x00' in value:
                raise ValueRejected('text holds a NUL byte, which '
                                    'PostgreSQL rejects')
            if max_length and len(value) > max_length:
                raise ValueRejected(f'{len(value)} characters, longer than '
                                    f'max_length {max_length}')
    return check_text


def value_writer(field: models.Field, alias: str) -> Callable[[Any], str]:
    """Python value -> COPY text, via get_db_prep_value."""
    from anthias_rollback import fields

    connection = connections[alias]
    prep = field.get_db_prep_value
    simple = fields.internal_type(field) in _IDENTITY_TYPES

    def write(value: Any) -> str:
        if value is None:
            return '\\N'
        if simple:
            kind = type(value)
            if kind is str:
                return postgres_escape(value)
            if kind is int:
                return str(value)
            if kind is bool:
                return 't' if value else 'f'
        return postgres_text(prep(value, connection, prepared=False))
    return write


def source_problem(alias: str) -> str | None:
    """Nothing to check before connecting (the connection check says)."""
    return None


def finish_load(source_alias: str, target_alias: str,
                model_list: list[type[models.Model]]
                ) -> list[tuple[str, Any, str, str]]:
    """Inside the copy's transaction: sequences past the loaded ids.
    PostgreSQL checks the foreign keys itself (deferred to the commit),
    so there are never orphans to return."""
    postgres_reset_sequences(target_alias, model_list)
    return []


def foreign_key_problems(alias: str, tables: Iterable[str]
                         ) -> list[tuple[str, Any, str, str]]:
    """PostgreSQL enforces its foreign keys: never any."""
    return []


def probe_table(alias: str, model: type[models.Model], budget_ms: int
                ) -> None:
    """Read one row of *model* under a statement timeout."""
    table = connections[alias].ops.quote_name(model._meta.db_table)
    with connections[alias].cursor() as cursor:
        cursor.execute('BEGIN READ ONLY')
        try:
            cursor.execute(f'SET LOCAL statement_timeout = {budget_ms}')
            cursor.execute(f'SELECT 1 FROM {table} LIMIT 1')
        finally:
            cursor.execute('ROLLBACK')



# libpq/server texts that mean "the server is not there or not serving"
# (a rollback may then fall back to a backup); anything else - a bad
# password, a missing database or role, an invalid port - is a setting
# to fix, and falling back would silently drop every write since the
# cutover.
_DOWN_MARKERS = (
    'connection refused', 'no such file or directory', 'timeout expired',
    'timed out', 'the database system is shutting down',
    'the database system is starting up',
    'the database system is in recovery mode',
    'server closed the connection unexpectedly',
    'terminating connection due to administrator command',
    'could not receive data from server', 'ssl syscall error',
    'network is unreachable', 'no route to host', 'connection reset',
    'canceling statement due to statement timeout',
)


def server_down(error: BaseException) -> bool:
    """Does *error* say the server is down (rather than misconfigured)?"""
    text = str(error).lower()
    return any(marker in text for marker in _DOWN_MARKERS)

# Per alias: the tables the last truncate emptied with DELETE (a table
# outside the copy points at them), which COPY FREEZE may not load.
_emptied_row_by_row: dict[str, frozenset[str]] = {}


def truncate(alias: str, tables: Iterable[str],
             referenced: Iterable[str] = ()) -> None:
    """Empty *tables* (inside the caller's transaction): TRUNCATE in one
    statement, except the *referenced* ones, which are DELETEd.

    No CASCADE: a table outside the plan that points at one of these
    makes PostgreSQL refuse, instead of silently emptying it too. A
    table outside the copy that keeps its rows is named in *referenced*
    (transfer/exclusions.py): PostgreSQL refuses to TRUNCATE what any
    other table references, even when empty; the DELETE is checked
    against it at commit (Django's FKs are DEFERRABLE, deferred here).
    """
    tables = list(tables)
    by_row = frozenset(referenced) & set(tables)
    _emptied_row_by_row[alias] = by_row
    quote = connections[alias].ops.quote_name
    names = ', '.join(quote(t) for t in tables if t not in by_row)
    with connections[alias].cursor() as cursor:
        if names:
            cursor.execute(f'TRUNCATE {names}')
        for table in sorted(by_row):
            cursor.execute(f'DELETE FROM {quote(table)}')


def postgres_may_freeze(alias: str, table: str) -> bool:
    """PostgreSQL: COPY FREEZE needs the table truncated in this
    transaction; one emptied by DELETE (see truncate) is loaded
    without it."""
    return table not in _emptied_row_by_row.get(alias, frozenset())


def drop_secondary_indexes(alias: str, tables: Iterable[str]
                           ) -> list[str]:
    """Drop indexes that back no constraint; return their definitions.

    Building an index once after the load is several times faster than
    maintaining it row by row during COPY.
    """
    definitions = []
    quote = connections[alias].ops.quote_name
    with connections[alias].cursor() as cursor:
        for table in tables:
            cursor.execute(
                'SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x '
                'JOIN pg_class i ON i.oid = x.indexrelid '
                'WHERE x.indrelid = %s::regclass AND NOT EXISTS ('
                'SELECT 1 FROM pg_constraint c '
                'WHERE c.conindid = x.indexrelid)', [quote(table)])
            for name, definition in cursor.fetchall():
                cursor.execute(f'DROP INDEX {quote(name)}')
                definitions.append(definition)
    return definitions


def create_indexes(alias: str, definitions: Iterable[str]) -> None:
    """Rebuild dropped indexes. PostgreSQL refuses CREATE INDEX on a
    table with pending (deferred) FK checks, so those run first: a
    dangling key fails here, before the commit."""
    with connections[alias].cursor() as cursor:
        cursor.execute('SET CONSTRAINTS ALL IMMEDIATE')
        for definition in definitions:
            cursor.execute(definition)


class _QueueReader:
    """File-like object psycopg2's copy_expert reads COPY data from."""

    def __init__(self, chunks: 'queue.Queue[bytes | None | BaseException]'):
        self.chunks = chunks

    def read(self, size: int = -1) -> bytes:
        chunk = self.chunks.get()
        if chunk is None:
            return b''
        if isinstance(chunk, BaseException):
            raise CopyAborted(str(chunk))
        return chunk


def postgres_copy_rows(alias: str, table: str, columns: list[str],
                       chunks: Iterator[bytes], freeze: bool = False
                       ) -> None:
    """COPY encoded text chunks into *table*, in the open transaction.

    The chunks are produced (read from the source and converted) in this
    thread while a second thread runs copy_expert: psycopg2 releases the
    GIL while libpq sends, so conversion and the server's parsing overlap
    on two cores. A failure on either side aborts the COPY and re-raises.
    """
    connection = connections[alias]
    connection.ensure_connection()
    quote = connection.ops.quote_name
    sql = (f'COPY {quote(table)} ({", ".join(quote(c) for c in columns)}) '
           f'FROM STDIN' + (' WITH (FREEZE)' if freeze else ''))
    raw_cursor = connection.connection.cursor()
    pipe: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []

    def run_copy() -> None:
        try:
            raw_cursor.copy_expert(sql, _QueueReader(pipe), size=1 << 16)
        except BaseException as err:  # noqa: BLE001 re-raised in caller
            failure.append(err)
            # Unblock a producer waiting on a full queue.
            while True:
                try:
                    pipe.get_nowait()
                except queue.Empty:
                    break

    worker = threading.Thread(target=run_copy, name=f'copy-{table}',
                              daemon=True)
    worker.start()

    def put(item: object) -> bool:
        while worker.is_alive():
            try:
                pipe.put(item, timeout=_PUT_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    try:
        for chunk in chunks:
            if failure or not put(chunk):
                break
    except BaseException as err:
        put(err)
        worker.join()
        raw_cursor.close()
        raise
    finally:
        # Stop reading the source now (a generator left to the garbage
        # collector would close its cursor after the connection).
        close = getattr(chunks, 'close', None)
        if close is not None:
            close()
    put(None)
    worker.join()
    raw_cursor.close()
    if failure:
        # psycopg2's own error -> Django's DatabaseError, as for any
        # query made through a Django cursor.
        with connection.wrap_database_errors:
            raise failure[0]


def postgres_reset_sequences(alias: str,
                             model_list: Iterable[type[models.Model]]
                             ) -> None:
    """Set every sequence of *model_list* past the highest loaded id, so
    the next ORM insert gets a fresh one (what loaddata does)."""
    connection = connections[alias]
    statements = connection.ops.sequence_reset_sql(no_style(),
                                                   list(model_list))
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def sequence_values(alias: str, tables: Iterable[tuple[str, str]]
                    ) -> dict[str, int]:
    """The highest value each (table, column) sequence has handed out."""
    found = {}
    quote = connections[alias].ops.quote_name
    with connections[alias].cursor() as cursor:
        for table, column in tables:
            cursor.execute('SELECT pg_get_serial_sequence(%s, %s)',
                           [quote(table), column])
            sequence = cursor.fetchone()[0]
            if not sequence:
                continue
            cursor.execute(f'SELECT last_value, is_called FROM {sequence}')
            last_value, is_called = cursor.fetchone()
            found[table] = last_value if is_called else last_value - 1
    return found


# -- comparison forms

def fast_column(plan: Any, alias: str, quoted: str, digest: bool = False
                ) -> tuple[str, Callable | None]:
    """(select expression, fast path) for the column of *plan* (a
    normalize.ColumnPlan): the exact canonical form, or with *digest*
    the cheaper digest form; None: use the field's converters."""
    if digest:
        return postgres_digest_column(plan, alias, quoted)
    return postgres_fast_column(plan, alias, quoted)


def _postgres_to_char(internal: str, quoted: str) -> str | None:
    """The exact canonical text of a datetime or time, formatted by
    PostgreSQL itself (no Python datetime objects)."""
    from django.conf import settings

    if internal == 'DateTimeField':
        source = f"{quoted} AT TIME ZONE 'UTC'" if settings.USE_TZ \
            else quoted
        return f"to_char({source}, 'YYYY-MM-DD HH24:MI:SS.US')"
    if internal == 'TimeField':
        return f"to_char({quoted}, 'HH24:MI:SS.US')"
    return None


def postgres_fast_column(plan: Any, alias: str, quoted: str
                         ) -> tuple[str, Callable | None]:
    """(select expression, fast path) for a column on PostgreSQL."""
    # Imported here: normalize imports the engines package.
    from anthias_rollback import normalize
    from anthias_rollback.fields import value_field

    field = value_field(plan.field)
    internal = field.get_internal_type()
    formatted = _postgres_to_char(internal, quoted)
    if formatted is not None:
        return formatted, normalize.identity
    if internal == 'DateField':
        return f"to_char({quoted}, 'YYYY-MM-DD')", normalize.identity
    if internal == 'JSONField' and field.decoder is None:
        return f'{quoted}::text', normalize.json_column(
            normalize.slow_values(plan, alias))
    return quoted, None


def postgres_digest_column(plan: Any, alias: str, quoted: str
                           ) -> tuple[str, Callable | None]:
    """(select expression, digest form) for a column on PostgreSQL."""
    from anthias_rollback import normalize
    from anthias_rollback.fields import value_field

    field = value_field(plan.field)
    internal = field.get_internal_type()
    formatted = _postgres_to_char(internal, quoted)
    if formatted is not None:
        # As Python's isoformat(): no fraction when it is zero.
        return f"replace({formatted}, '.000000', '')", normalize.identity
    if internal == 'JSONField' and field.decoder is None:
        return f'{quoted}::text', normalize.identity
    return postgres_fast_column(plan, alias, quoted)



# -- checksum mode: bucket digests in the engine (engines/digests.py)

def digest_blockers(alias: str, model: type[models.Model]) -> list[str]:
    """Columns of *model* without an in-engine digest form here."""
    from anthias_rollback.engines import digests

    return digests.digest_blockers(model, alias)


def bucket_digests(alias: str, model: type[models.Model], bounds: list,
                   on_rows: Callable[[int], None] | None = None
                   ) -> list[tuple[int, bytes]]:
    """(rows, digest) per key-range bucket, computed in the engine
    (engines/digests.py)."""
    from anthias_rollback.engines import digests

    return digests.postgres_bucket_digests(alias, model, bounds, on_rows)
