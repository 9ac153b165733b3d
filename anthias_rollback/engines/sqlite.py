"""SQLite side of the transfer: snapshots, bulk-load pragmas, inserts,
foreign-key checks and sqlite_sequence."""
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections, models, transaction

from anthias_rollback.engines.sqlite_file import sqlite_file_problem


@contextmanager
def read_snapshot(alias: str, deadline: float | None = None
                  ) -> Iterator[None]:
    """One deferred, query_only read transaction on *alias*: every later
    SELECT on this connection sees the same WAL snapshot, and the live
    app's writers are not blocked (BEGIN IMMEDIATE, Django's mode here,
    would). *deadline* (a time.monotonic() value) interrupts a statement
    that runs past it. Inside a caller's atomic block, that transaction is
    the snapshot."""
    connection = connections[alias]
    connection.ensure_connection()
    if connection.in_atomic_block:
        yield
        return
    raw = connection.connection
    wrap = connection.wrap_database_errors
    with wrap:
        raw.execute('PRAGMA query_only = ON')
        raw.execute('BEGIN DEFERRED')
        # SQLite: the snapshot starts at the first read, not at BEGIN.
        raw.execute('SELECT count(*) FROM sqlite_master').fetchone()
    if deadline is not None:
        raw.set_progress_handler(
            lambda: int(time.monotonic() > deadline), 100_000)
    try:
        yield
    finally:
        raw.set_progress_handler(None, 0)
        with wrap:
            try:
                if raw.in_transaction:
                    raw.execute('ROLLBACK')
            finally:
                raw.execute('PRAGMA query_only = OFF')


def fetch_chunks(alias: str, sql: str, params: Sequence = (),
                 chunk_rows: int = 5000) -> Iterator[list[tuple]]:
    """Rows of *sql* in chunks (sqlite3 steps lazily: constant memory).
    The raw connection is taken now, so the generator may run in another
    thread (`connections` is thread-local)."""
    connection = connections[alias]
    connection.ensure_connection()
    raw, wrap = connection.connection, connection.wrap_database_errors

    def chunks() -> Iterator[list[tuple]]:
        cursor = raw.cursor()
        try:
            with wrap:
                cursor.execute(sql, params)
                while rows := cursor.fetchmany(chunk_rows):
                    yield rows
        finally:
            cursor.close()
    return chunks()


def byte_order(column: str, text: bool) -> str:
    """ORDER BY expression sorting *column* bytewise."""
    # SQLite: BINARY is memcmp; explicit in case the column has another.
    return f'{column} COLLATE BINARY' if text else column


def key_range_clause(column: str, kind: str | None, low: object,
                     high: object) -> tuple[str, list]:
    """WHERE clause and parameters for keys in [low, high) (None:
    unbounded) in byte order; *kind* is fields.key_kind()."""
    if kind == 'text':
        column = f'{column} COLLATE BINARY'
    clauses, params = [], []
    for bound, op in ((low, '>='), (high, '<')):
        if bound is not None:
            clauses.append(f'{column} {op} ?')
            params.append(bound)
    return ' AND '.join(clauses), params


def key_in_clause(column: str, kind: str | None, keys: Sequence
                  ) -> tuple[str, list]:
    """WHERE clause and parameters for keys in *keys* (keep them under
    SQLite's variable limit: 999 on old builds)."""
    return f'{column} IN ({", ".join("?" * len(keys))})', list(keys)


@contextmanager
def sqlite_bulk_load_pragmas(alias: str) -> Iterator[None]:
    """Fast, still atomic, loading into a SQLite file that is not live.

    SQLite: foreign_keys can only change outside a transaction, so it is
    switched off around the caller's atomic block and the load is checked
    with foreign_key_check instead. synchronous=OFF and an in-memory
    journal keep ROLLBACK working; a crash mid-load can spoil the file,
    which is acceptable only because nobody uses it before it is verified.
    """
    connection = connections[alias]
    connection.ensure_connection()
    raw = connection.connection
    journal = raw.execute('PRAGMA journal_mode').fetchone()[0]
    synchronous = raw.execute('PRAGMA synchronous').fetchone()[0]
    cache = raw.execute('PRAGMA cache_size').fetchone()[0]
    connection.disable_constraint_checking()
    raw.execute('PRAGMA synchronous = OFF')
    if journal.lower() != 'wal':
        raw.execute('PRAGMA journal_mode = MEMORY')
    # 32 MiB: with the copy's batches, a full rollback of 1M rows peaks
    # under 150 MB (issue 22; 64 MiB and larger batches made 213 MB).
    raw.execute('PRAGMA cache_size = -32768')
    # temp_store stays FILE: the sorter of the CREATE INDEX after the
    # load spills to temporary files (the page cache) instead of keeping
    # every key in this process's memory (at 1M rows, alone: 0.95 s
    # against 1.82 s with MEMORY).
    try:
        yield
    finally:
        if raw.in_transaction:
            raw.execute('ROLLBACK')
        if journal.lower() != 'wal':
            raw.execute(f'PRAGMA journal_mode = {journal}')
        raw.execute(f'PRAGMA synchronous = {int(synchronous)}')
        raw.execute(f'PRAGMA cache_size = {int(cache)}')
        connection.enable_constraint_checking()


# Rows per INSERT statement (multi-row VALUES), within SQLite's limit on
# bound variables.
_MAX_ROWS_PER_INSERT = 500


def sqlite_insert_rows(alias: str, table: str, columns: list[str],
                       rows: list[tuple], replace: bool = False) -> None:
    """Insert one batch into *table* (in the caller's transaction), many
    rows per INSERT statement (*replace*: INSERT OR REPLACE, a row whose
    key or unique value is taken replaces the one holding it).

    sqlite3 releases the GIL around each sqlite3_step; with one row per
    step, a thread reading the source for the next batch made the insert
    wait for the GIL after every row (measured: 4x slower than alone).
    A multi-row VALUES statement is one step for hundreds of rows: the
    same rows, in the same order, but the GIL is given up for long
    stretches.
    """
    if not rows:
        return
    raw = connections[alias].connection
    quote = connections[alias].ops.quote_name
    width = len(columns)
    verb = 'INSERT OR REPLACE' if replace else 'INSERT'
    head = (f'{verb} INTO {quote(table)} '
            f'({", ".join(quote(c) for c in columns)}) VALUES ')
    one = f'({", ".join("?" * width)})'
    limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    group = max(1, min(_MAX_ROWS_PER_INSERT, limit // max(width, 1)))
    full = len(rows) - len(rows) % group
    if group > 1 and full:
        # One parameter list per statement, made as executemany asks for
        # it (a flat list sliced up copied every reference twice).
        raw.executemany(head + ', '.join([one] * group),
                        (list(chain.from_iterable(rows[i:i + group]))
                         for i in range(0, full, group)))
    else:
        full = 0
    rest = rows[full:]
    if len(rest) > 1:
        raw.execute(head + ', '.join([one] * len(rest)),
                    list(chain.from_iterable(rest)))
    elif rest:
        raw.execute(head + one, rest[0])


def sqlite_delete_rows(alias: str, table: str, column: str | None = None,
                       keys: Sequence = ()) -> None:
    """Delete the rows of *table* whose *column* is in *keys* (all rows
    when *column* is None), in the caller's transaction; keys go in
    groups under SQLite's variable limit."""
    raw = connections[alias].connection
    quote = connections[alias].ops.quote_name
    if column is None:
        raw.execute(f'DELETE FROM {quote(table)}')
        return
    limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    keys = list(keys)
    for start in range(0, len(keys), limit):
        group = keys[start:start + limit]
        raw.execute(f'DELETE FROM {quote(table)} WHERE {quote(column)} IN '
                    f'({", ".join("?" * len(group))})', group)



@contextmanager
def sqlite_quick_null_binding() -> Iterator[None]:
    """While in the block, sqlite3 binds None without its adaptation
    search.

    sqlite3 binds int, float and str directly but looks every other
    value up in its adapter registry first, then tries __adapt__ and
    __conform__, before None finally becomes NULL: a tenth of the insert
    time of the reverse copy's Asset rows (1.1 NULLs a row, measured).
    A registered adapter for None that returns None (`{}.get`, a C call)
    ends that search at the first lookup; the bound value is NULL as
    before. The registry is the sqlite3 module's, so the entry is only
    there during the copy, and one registered by someone else is left
    alone.
    """
    key = (type(None), sqlite3.PrepareProtocol)
    if key in sqlite3.adapters:
        yield
        return
    quick: Callable[[Any], Any] = {}.get
    sqlite3.adapters[key] = quick
    try:
        yield
    finally:
        if sqlite3.adapters.get(key) is quick:
            del sqlite3.adapters[key]


@contextmanager
def bulk_load(alias: str) -> Iterator[None]:
    """The target transaction of a copy into *alias*: bulk-load pragmas
    around one atomic block (the file is not live yet)."""
    with sqlite_bulk_load_pragmas(alias), sqlite_quick_null_binding(), \
            transaction.atomic(using=alias):
        yield


def write_rows(alias: str, table: str, columns: list[str],
               batches: Iterator[list]) -> None:
    """Insert converted rows (parameter tuples) batch by batch."""
    for rows in batches:
        if rows:
            sqlite_insert_rows(alias, table, columns, rows)


# Rows handed to write_rows are parameter tuples, not COPY text lines.
ROWS_AS_COPY_TEXT = False
# SQLite keeps JSON as text and Django's converter passes malformed text
# through as a str: the copy parses it itself to fail loudly.
JSON_AS_TEXT = True
# Declared types whose values sqlite3's driver-level converters parse
# (and turn into None when unparsable) before any field sees them.
_PARSED_TYPES = {'date', 'time', 'datetime', 'timestamp'}


def select_sql(alias: str, table: str, fields: Sequence) -> str:
    """SELECT of *fields* of *table* for the copy's reader: dates as text
    (an expression has no declared type, so the field's converter sees
    the text and can fail loudly), plus json_valid() per JSON column after
    the fields (the fast row converter trusts text SQLite's parser took).
    """
    from anthias_rollback.engines.rows import sqlite_json_columns

    connection = connections[alias]
    quote = connection.ops.quote_name
    columns = []
    for fld in fields:
        column = quote(fld.column)
        if fld.db_type(connection) in _PARSED_TYPES:
            column = f'CAST({column} AS TEXT)'
        columns.append(column)
    columns += [f'json_valid({quote(fields[i].column)})'
                for i in sqlite_json_columns(list(fields))]
    return f'SELECT {", ".join(columns)} FROM {quote(table)}'


def value_checker(field: models.Field, alias: str) -> None:
    """SQLite stores any value as given: nothing to reject up front."""
    return


def value_writer(field: models.Field, alias: str
                 ) -> Callable[[Any], Any]:
    """Python value -> DB-API parameter, via get_db_prep_value."""
    connection = connections[alias]
    prep = field.get_db_prep_value

    def write_param(value: Any) -> Any:
        if value is None:
            return None
        return prep(value, connection, prepared=False)
    return write_param


def source_problem(alias: str) -> str | None:
    """Why *alias* cannot be a copy's source, or None: the file must
    exist (Django would silently create a missing one) and be readable
    as a database (a bad page answers SELECT 1 but not sqlite_master)."""
    from anthias_rollback.report import describe_alias, first_line

    problem = sqlite_file_problem(Path(connections[alias].settings_dict[
        'NAME']))
    if problem:
        return f'source {alias}: {problem}'
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute('SELECT count(*) FROM sqlite_master')
    except DatabaseError as err:
        connections[alias].close()
        return f'cannot read {describe_alias(alias)}: {first_line(err)}'
    return None


def sequence_values(alias: str, tables: Iterable[tuple[str, str]]
                    ) -> dict[str, int]:
    """The highest id each table's autoincrement has handed out."""
    names = [table for table, _ in tables]
    if not names:
        return {}
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                       "AND name = 'sqlite_sequence'")
        if cursor.fetchone() is None:
            return {}
        marks = ', '.join(['%s'] * len(names))
        cursor.execute('SELECT name, seq FROM sqlite_sequence WHERE name '
                       f'IN ({marks})', names)
        return dict(cursor.fetchall())


def finish_load(source_alias: str, target_alias: str,
                model_list: list[type[models.Model]]
                ) -> list[tuple[str, Any, str, str]]:
    """Inside the copy's transaction: raise sqlite_sequence to the
    source's sequences (no id the source handed out is reused after a
    rollback), then return the copied rows whose foreign keys point
    nowhere (table, pk, column, parent)."""
    from anthias_rollback import engines, fields

    keyed = [(m._meta.db_table, m._meta.pk.column) for m in model_list
             if fields.has_auto_key(m)]
    source = engines.for_alias(source_alias)
    sqlite_sync_sequences(target_alias,
                          source.sequence_values(source_alias, keyed))
    return foreign_key_problems(
        target_alias, [m._meta.db_table for m in model_list])


def probe_table(alias: str, model: type[models.Model], budget_ms: int
                ) -> None:
    """Read one row of *model*, interrupted after *budget_ms*."""
    connection = connections[alias]
    connection.ensure_connection()
    raw = connection.connection
    deadline = time.monotonic() + budget_ms / 1000
    table = connection.ops.quote_name(model._meta.db_table)
    raw.set_progress_handler(lambda: int(time.monotonic() > deadline),
                             10_000)
    try:
        with connection.wrap_database_errors:
            raw.execute(f'SELECT 1 FROM {table} LIMIT 1').fetchall()
    finally:
        raw.set_progress_handler(None, 0)



def server_down(error: BaseException) -> bool:
    """A file has no server to be down."""
    return False

def truncate(alias: str, tables: Iterable[str],
             referenced: Iterable[str] = ()) -> None:
    """Empty *tables* and forget their AUTOINCREMENT counters.

    SQLite: always row by row (DELETE), with foreign keys off during the
    load, so *referenced* (tables a table outside the copy points at)
    need nothing more."""
    quote = connections[alias].ops.quote_name
    tables = list(tables)
    with connections[alias].cursor() as cursor:
        for table in tables:
            cursor.execute(f'DELETE FROM {quote(table)}')
        cursor.execute("SELECT 1 FROM sqlite_master WHERE "
                       "name = 'sqlite_sequence'")
        if cursor.fetchone():
            for table in tables:
                cursor.execute('DELETE FROM sqlite_sequence WHERE name = %s',
                               [table])


def drop_secondary_indexes(alias: str, tables: Iterable[str]
                                  ) -> list[str]:
    """Drop explicit indexes (not the automatic ones behind PRIMARY KEY
    and UNIQUE); return their CREATE statements to rebuild after the
    load."""
    definitions = []
    quote = connections[alias].ops.quote_name
    with connections[alias].cursor() as cursor:
        for table in tables:
            cursor.execute("SELECT name, sql FROM sqlite_master WHERE "
                           "type = 'index' AND tbl_name = %s AND sql IS "
                           "NOT NULL", [table])
            for name, sql in cursor.fetchall():
                cursor.execute(f'DROP INDEX {quote(name)}')
                definitions.append(sql)
    return definitions


def create_indexes(alias: str, definitions: Iterable[str]) -> None:
    with connections[alias].cursor() as cursor:
        for definition in definitions:
            cursor.execute(definition)


def foreign_key_problems(alias: str, tables: Iterable[str]
                                ) -> list[tuple[str, object, str, str]]:
    """(table, primary key, column, parent table) of every row whose
    foreign key points nowhere: rows SQLite tolerated (foreign_keys was
    off, or an old schema) that PostgreSQL will refuse."""
    found = []
    raw = connections[alias].connection
    quote = connections[alias].ops.quote_name
    for table in tables:
        checks = raw.execute(
            f'PRAGMA foreign_key_check({quote(table)})').fetchall()
        if not checks:
            continue
        keys = {row[0]: row[3] for row in raw.execute(
            f'PRAGMA foreign_key_list({quote(table)})').fetchall()}
        pk_columns = [row[1] for row in raw.execute(
            f'PRAGMA table_info({quote(table)})').fetchall() if row[5]]
        for _table, rowid, parent, fkid in checks:
            pk = rowid
            if rowid is not None and len(pk_columns) == 1:
                found_pk = raw.execute(
                    f'SELECT {quote(pk_columns[0])} FROM {quote(table)} '
                    f'WHERE rowid = ?', [rowid]).fetchone()
                pk = found_pk[0] if found_pk else rowid
            found.append((table, pk, keys.get(fkid, '?'), parent))
    return found


def sqlite_use_wal(alias: str) -> None:
    """SQLite: put *alias*'s file in WAL mode (kept in the file), so a
    reader and a writer of it wait for neither."""
    with connections[alias].cursor() as cursor:
        cursor.execute('PRAGMA journal_mode=WAL')


def sqlite_defer_foreign_keys(alias: str) -> None:
    """SQLite: check the foreign keys of *alias*'s open transaction at
    COMMIT instead of per statement (the caller holds the transaction)."""
    connections[alias].connection.execute('PRAGMA defer_foreign_keys = ON')


def sqlite_sync_sequences(alias: str, values: dict[str, int]) -> None:
    """Raise sqlite_sequence for each table to at least *values[table]*,
    so SQLite's AUTOINCREMENT never hands out an id seen before."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1 FROM sqlite_master WHERE "
                       "name = 'sqlite_sequence'")
        if not cursor.fetchone():
            return
        for table, value in values.items():
            cursor.execute("SELECT sql FROM sqlite_master WHERE "
                           "type = 'table' AND name = %s", [table])
            row = cursor.fetchone()
            if not row or 'AUTOINCREMENT' not in (row[0] or '').upper():
                continue
            cursor.execute('SELECT seq FROM sqlite_sequence WHERE name = %s',
                           [table])
            current = cursor.fetchone()
            if current is None:
                cursor.execute('INSERT INTO sqlite_sequence (name, seq) '
                               'VALUES (%s, %s)', [table, value])
            elif current[0] < value:
                cursor.execute('UPDATE sqlite_sequence SET seq = %s '
                               'WHERE name = %s', [value, table])


# -- comparison forms

def fast_column(plan: Any, alias: str, quoted: str, digest: bool = False
                ) -> tuple[str, Callable | None]:
    """(select expression, fast path) for the column of *plan* (a
    normalize.ColumnPlan): the exact canonical form, or with *digest*
    the cheaper digest form; None: use the field's converters."""
    if digest:
        return sqlite_digest_column(plan, alias, quoted)
    return sqlite_fast_column(plan, alias, quoted)


def sqlite_fast_column(plan: Any, alias: str, quoted: str
                       ) -> tuple[str, Callable | None]:
    """(select expression, fast path) for a column on SQLite."""
    # Imported here: normalize imports the engines package.
    from django.conf import settings

    from anthias_rollback import normalize
    from anthias_rollback.fields import value_field

    internal = value_field(plan.field).get_internal_type()
    slow = normalize.slow_values(plan, alias)
    utc_storage = (not settings.USE_TZ
                   or connections[alias].timezone_name == 'UTC')
    # SQLite: `+col` has no declared type, so sqlite3 hands over the
    # stored text instead of parsing it into datetime objects.
    if internal == 'DateTimeField' and utc_storage:
        return f'+{quoted}', normalize.padded_text_column(26, (10, ' '),
                                                          slow)
    if internal == 'TimeField':
        return f'+{quoted}', normalize.padded_text_column(15, (2, ':'),
                                                          slow)
    if internal == 'DateField':
        return f'+{quoted}', normalize.date_column(slow)
    if internal == 'JSONField' and value_field(plan.field).decoder is None:
        return quoted, normalize.json_column(slow)
    if internal == 'BooleanField' and not plan.field.is_relation:
        # SQLite: Django's sqlite3 converter for the `bool` declared type
        # already returned bool, which the field converters keep as is.
        return quoted, normalize.identity
    return quoted, None


def sqlite_digest_column(plan: Any, alias: str, quoted: str
                         ) -> tuple[str, Callable | None]:
    """(select expression, digest form) for a column on SQLite."""
    from django.conf import settings

    from anthias_rollback import normalize
    from anthias_rollback.fields import value_field

    field = value_field(plan.field)
    internal = field.get_internal_type()
    if internal in ('DateTimeField', 'TimeField'):
        trimmed = normalize.without_zero_fraction(
            normalize.slow_values(plan, alias))
        utc_storage = (internal == 'TimeField' or not settings.USE_TZ
                       or connections[alias].timezone_name == 'UTC')
        if utc_storage:
            # The stored text as is: if it equals PostgreSQL's text, it
            # parses to the same value; odd shapes just mismatch.
            return f'+{quoted}', normalize.text_or(trimmed)
        return quoted, normalize.all_through(trimmed)
    if internal == 'JSONField' and field.decoder is None:
        return quoted, normalize.json_digest_column(
            normalize.slow_values(plan, alias))
    return sqlite_fast_column(plan, alias, quoted)


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

    return digests.sqlite_bucket_digests(alias, model, bounds, on_rows)
