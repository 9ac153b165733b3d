"""SQLite: a file's tables, columns and applied migrations, read only.

engine_tables.py compares the two engines' schemas at a command's first
plan. Reading the live file through the `sqlite` alias (a read-write
connection) made the last closing connection checkpoint and remove the
-wal/-shm files, and another process that had lost its locks on the file
then failed with "disk I/O error"; a mode=ro reader never checkpoints.
"""
from collections.abc import Iterable
from pathlib import Path

from anthias_rollback.engines.sqlite_file import (
    sqlite_applied_migrations,
    sqlite_open_readonly,
)


def sqlite_file_schema(path: Path, tables: Iterable[str],
                       timeout: float = 5.0
                       ) -> tuple[set[tuple[str, str]],
                                  dict[str, frozenset[str] | None]]:
    """(applied migrations as (app, name), column names per table of
    *tables*, None where it is missing) of the SQLite file *path*.

    Read-only; a file nobody has open in WAL mode (no -wal beside it) is
    read as immutable, which leaves no side files (sqlite_copy_readonly's
    note). The file itself is never opened with open(): closing such a
    descriptor drops every POSIX lock this process holds on the file.
    Raises FileNotFoundError, sqlite3.Error when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'SQLite file {path} does not exist')
    immutable = not Path(f'{path}-wal').exists()
    conn = sqlite_open_readonly(path, timeout, immutable=immutable)
    try:
        migrations = {tuple(label.split('.', 1))
                      for label in sqlite_applied_migrations(conn)}
        existing = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns: dict[str, frozenset[str] | None] = {}
        for table in tables:
            if table not in existing:
                columns[table] = None
                continue
            quoted = '"' + table.replace('"', '""') + '"'
            columns[table] = frozenset(
                row[1] for row in conn.execute(
                    f'PRAGMA table_info({quoted})'))
        return migrations, columns  # type: ignore[return-value]  # 2-tuples
    finally:
        conn.close()
