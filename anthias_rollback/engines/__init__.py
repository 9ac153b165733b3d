"""The one seam for engine-specific code.

`for_alias(alias)` returns the module for that connection's engine
(`engines.sqlite` or `engines.postgresql`); generic code calls the names
in `INTERFACE` on it and never tests a vendor itself, as `loaddata` asks
`connection.ops`. It chooses by `connection.vendor`, not the ENGINE
string, so a wrapped backend (django-prometheus, a pool) still works.

Helpers that exist for one engine only keep its name in theirs
(`postgres_copy_rows`, `sqlite_bulk_load_pragmas`); file-level SQLite
helpers live in `sqlite_file`, server-level PostgreSQL ones in
`postgres_server`. Everything here takes aliases and plain values, never
prints, and raises Django's database errors for the caller to turn into
RollbackErrors.
"""
from importlib import import_module
from types import ModuleType

from django.db import connections

from anthias_rollback.exceptions import ConfigError

_MODULES = {'sqlite': 'anthias_rollback.engines.sqlite',
            'postgresql': 'anthias_rollback.engines.postgresql'}

# What every engine module provides (tests/test_engines.py holds both to
# it): reading, writing a copy, checks and probes.
INTERFACE = ('read_snapshot', 'fetch_chunks', 'byte_order',
             'key_range_clause', 'key_in_clause', 'fast_column',
             'bulk_load', 'truncate', 'drop_secondary_indexes',
             'create_indexes', 'write_rows', 'select_sql', 'value_checker',
             'value_writer', 'source_problem', 'sequence_values',
             'finish_load', 'foreign_key_problems', 'probe_table',
             'server_down', 'ROWS_AS_COPY_TEXT', 'JSON_AS_TEXT')


def for_alias(alias: str) -> ModuleType:
    """The engine module for *alias*; ConfigError for an engine this app
    does not support (named with the alias, never the DSN)."""
    vendor = connections[alias].vendor
    name = _MODULES.get(vendor)
    if name is None:
        raise ConfigError(f'database {alias!r}: engine {vendor} is not '
                          'supported (sqlite and postgresql are)')
    return import_module(name)


def is_sqlite(alias: str) -> bool:
    """Is *alias* a SQLite file (the kind a rollback can swap in)?"""
    return for_alias(alias).__name__ == _MODULES['sqlite']


class ValueRejected(Exception):
    """A source value the target engine would reject (raised by the
    engines' value checkers; the copy collects them as problems)."""
