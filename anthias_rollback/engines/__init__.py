"""Engine-specific pieces of the transfer (one module per engine).

Callers pick the module with `connections[alias].vendor`; everything here
takes aliases and plain values, never prints, and raises Django's
database errors for the caller to turn into RollbackErrors.
"""
from collections.abc import Iterator
from typing import Any


def fetch_batches(cursor: Any, sql: str, batch_size: int
                  ) -> Iterator[list[tuple]]:
    """Run *sql* on a DB-API *cursor* and yield its rows in batches,
    closing the cursor at the end (constant memory on both engines: a
    named cursor on PostgreSQL, sqlite3's lazy stepping on SQLite)."""
    try:
        cursor.execute(sql)
        while rows := cursor.fetchmany(batch_size):
            yield rows
    finally:
        cursor.close()
