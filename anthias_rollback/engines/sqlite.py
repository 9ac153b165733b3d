"""SQLite side of the transfer: snapshots, bulk-load pragmas, inserts,
foreign-key checks and sqlite_sequence."""
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from django.db import connections

SQLITE_HEADER = b'SQLite format 3\x00'


def sqlite_file_problem(path: Path) -> str | None:
    """Why *path* cannot be a source SQLite file, or None if it can."""
    path = Path(path)
    if not path.exists():
        return f'SQLite file {path} does not exist'
    if not path.is_file():
        return f'{path} is not a file'
    try:
        with open(path, 'rb') as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as err:
        return f'cannot read {path}: {err.strerror}'
    if header != SQLITE_HEADER:
        return f'{path} is not a SQLite database'
    return None


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
    raw.execute('PRAGMA cache_size = -65536')  # 64 MiB
    raw.execute('PRAGMA temp_store = MEMORY')
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


def sqlite_insert_rows(alias: str, table: str, columns: list[str],
                       rows: list[tuple]) -> None:
    """executemany one batch into *table* (in the caller's transaction)."""
    quote = connections[alias].ops.quote_name
    marks = ', '.join('?' * len(columns))
    sql = (f'INSERT INTO {quote(table)} '
           f'({", ".join(quote(c) for c in columns)}) VALUES ({marks})')
    connections[alias].connection.executemany(sql, rows)


def sqlite_truncate(alias: str, tables: Iterable[str]) -> None:
    """Empty *tables* and forget their AUTOINCREMENT counters."""
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


def sqlite_drop_secondary_indexes(alias: str, tables: Iterable[str]
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


def sqlite_create_indexes(alias: str, definitions: Iterable[str]) -> None:
    with connections[alias].cursor() as cursor:
        for definition in definitions:
            cursor.execute(definition)


def sqlite_foreign_key_problems(alias: str, tables: Iterable[str]
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
