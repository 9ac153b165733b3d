"""Every table of a SQLite file and a PostgreSQL database, read with
sqlite3 and psycopg2 alone (never the app's compare code), values
normalised by the PostgreSQL column's type; and fingerprints that show
whether a database changed (rows, content, sequences)."""
import datetime as dt
import decimal
import hashlib
import ipaddress
import json
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg2


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str


def pg_columns(url: str) -> dict[str, list[Column]]:
    """Base tables of schema public -> their columns in order."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT c.table_name, c.column_name, c.data_type "
                "FROM information_schema.columns c "
                "JOIN information_schema.tables t USING (table_schema, "
                "table_name) WHERE c.table_schema = 'public' AND "
                "t.table_type = 'BASE TABLE' "
                "ORDER BY c.table_name, c.ordinal_position")
            found: dict[str, list[Column]] = {}
            for table, column, kind in cursor.fetchall():
                found.setdefault(table, []).append(Column(column, kind))
            return found
    finally:
        conn.close()


def sqlite_tables(path: Path) -> dict[str, list[str]]:
    """Tables of the file -> column names (FTS shadow tables and
    sqlite_* left out; virtual tables kept)."""
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND "
            "name NOT LIKE 'sqlite_%' ORDER BY name")]
        virtual = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND "
            "sql LIKE 'CREATE VIRTUAL TABLE%'")}
        shadow = {f'{v}_{s}' for v in virtual
                  for s in ('data', 'idx', 'content', 'docsize', 'config')}
        return {name: [r[1] for r in conn.execute(
                    f'PRAGMA table_info("{name}")')]
                for name in names if name not in shadow}
    finally:
        conn.close()


# SQLite keeps a decimal in a NUMERIC column as a REAL: no device can
# hold more than 15 significant digits there (Django reads it back so).
# Across the engines a number is compared at that width; a wider value
# written on PostgreSQL is "the same row" when SQLite holds all it can.
_SQLITE_DIGITS = decimal.Context(prec=15)


def _number(value) -> decimal.Decimal | None:
    if value is None:
        return None
    if isinstance(value, float):
        return _SQLITE_DIGITS.create_decimal_from_float(value).normalize()
    return _SQLITE_DIGITS.create_decimal(str(value)).normalize()


def _when(value) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _json(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return json.dumps(value, sort_keys=True)


def normalise(pg_type: str, value):
    """*value* as read from either engine, in one comparable form."""
    if value is None:
        return None
    if pg_type == 'boolean':
        return bool(value)
    if pg_type in ('integer', 'bigint', 'smallint'):
        return int(value)
    if pg_type == 'numeric':
        return _number(value)
    if pg_type in ('double precision', 'real'):
        return float(value)
    if pg_type == 'timestamp with time zone':
        return _when(value)
    if pg_type == 'date':
        return value if isinstance(value, dt.date) \
            else dt.date.fromisoformat(value)
    if pg_type.startswith('time'):
        return value if isinstance(value, dt.time) \
            else dt.time.fromisoformat(value)
    if pg_type == 'bytea':
        return bytes(value)
    if pg_type == 'uuid':
        return uuid.UUID(str(value))
    if pg_type in ('jsonb', 'json'):
        return _json(value)
    if pg_type == 'inet':
        return ipaddress.ip_address(str(value))
    if pg_type == 'interval':
        return value if isinstance(value, dt.timedelta) \
            else dt.timedelta(microseconds=int(value))
    return value


def _sort_key(row: tuple) -> tuple:
    return tuple((v is None, type(v).__name__, repr(v)) for v in row)


def read_pg(url: str, table: str, columns: list[Column]) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            names = ', '.join(f'"{c.name}"' for c in columns)
            cursor.execute(f'SELECT {names} FROM "{table}"')
            rows = [tuple(normalise(c.pg_type, v)
                          for c, v in zip(columns, row))
                    for row in cursor.fetchall()]
    finally:
        conn.close()
    return sorted(rows, key=_sort_key)


def read_sqlite(path: Path, table: str, columns: list[Column]
                ) -> list[tuple]:
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        names = ', '.join(f'"{c.name}"' for c in columns)
        rows = [tuple(normalise(c.pg_type, v)
                      for c, v in zip(columns, row))
                for row in conn.execute(f'SELECT {names} FROM "{table}"')]
    finally:
        conn.close()
    return sorted(rows, key=_sort_key)


@dataclass
class TablesDiff:
    compared: dict[str, int]            # table -> rows (equal)
    only_sqlite: list[str]
    only_postgres: list[str]
    column_sets_differ: list[str]
    differing: dict[str, str]           # table -> what differs

    @property
    def equal(self) -> bool:
        return not self.differing


def compare_all(sqlite_path: Path, pg_url: str, *,
                skip: set[str] = frozenset(),
                by_key: dict[str, list[str]] | None = None) -> TablesDiff:
    """Row by row over every table present on both sides with the same
    columns; tables in *skip* are not compared (they are still listed).
    *by_key*: tables compared on those columns only (as sets)."""
    by_key = by_key or {}
    pg = {t: c for t, c in pg_columns(pg_url).items()
          if not t.startswith('anthias_rb_')}
    lite = sqlite_tables(sqlite_path)
    diff = TablesDiff({}, sorted(set(lite) - set(pg)),
                      sorted(set(pg) - set(lite)), [], {})
    for table in sorted(set(lite) & set(pg)):
        columns = pg[table]
        if sorted(c.name for c in columns) != sorted(lite[table]):
            diff.column_sets_differ.append(table)
            continue
        if table in skip:
            continue
        if table in by_key:
            columns = [c for c in columns if c.name in by_key[table]]
        left = read_sqlite(sqlite_path, table, columns)
        right = read_pg(pg_url, table, columns)
        if table in by_key:
            left, right = sorted(set(left), key=_sort_key), \
                sorted(set(right), key=_sort_key)
        if left == right:
            diff.compared[table] = len(left)
            continue
        missing = [r for r in right if r not in left][:3]
        extra = [r for r in left if r not in right][:3]
        diff.differing[table] = (
            f'SQLite {len(left)} rows, PostgreSQL {len(right)}; only on '
            f'PostgreSQL e.g. {missing}; only in SQLite e.g. {extra}')
    return diff


# -- fingerprints: did a database change? ---------------------------------

def sqlite_fingerprint(path: Path) -> dict:
    """A sha256 of the file's content (every table's rows in rowid
    order: SQLite moves pages between the file and its -wal without
    changing a row, so the bytes of the file alone would not do), rows
    per table, sqlite_sequence."""
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        tables = sorted(r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND "
            "name NOT LIKE 'sqlite_%'"))
        digest = hashlib.sha256()
        rows = {}
        for table in tables:
            digest.update(table.encode() + b'\0')
            count = 0
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                digest.update(repr(row).encode())
                count += 1
            rows[table] = count
        schema = conn.execute(
            'SELECT group_concat(sql, char(10)) FROM (SELECT sql FROM '
            'sqlite_master ORDER BY name)').fetchone()[0]
        digest.update((schema or '').encode())
        has_seq = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
        ).fetchone()
        sequences = dict(conn.execute(
            'SELECT name, seq FROM sqlite_sequence')) if has_seq else {}
    finally:
        conn.close()
    return {'sha256': digest.hexdigest(), 'rows': rows,
            'sequences': sequences}


def pg_fingerprint(url: str, *, tool_tables: bool = False) -> dict:
    """Rows and an md5 of every table's content, every sequence's last
    value (the tool's own anthias_rb_* objects left out unless
    *tool_tables*)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT table_name FROM information_schema.tables WHERE "
                "table_schema = 'public' AND table_type = 'BASE TABLE'")
            tables = sorted(r[0] for r in cursor.fetchall()
                            if tool_tables
                            or not r[0].startswith('anthias_rb_'))
            content = {}
            for table in tables:
                cursor.execute(
                    f'SELECT count(*), md5(coalesce(string_agg(t::text, '
                    f"'|' ORDER BY t::text), '')) FROM \"{table}\" t")
                content[table] = cursor.fetchone()
            cursor.execute(
                "SELECT sequencename, last_value FROM pg_sequences WHERE "
                "schemaname = 'public'")
            sequences = {name: value for name, value in cursor.fetchall()
                         if tool_tables
                         or not name.startswith('anthias_rb_')}
    finally:
        conn.close()
    return {'tables': content, 'sequences': sequences}
