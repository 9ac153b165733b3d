"""The one seam for engine-specific code.

`for_alias(alias)` returns the module for that connection's engine
(`engines.sqlite` or `engines.postgresql`), typed as `Engine`, the
Protocol below: generic code calls only its names and never tests a
vendor itself, as `loaddata` asks `connection.ops`. It chooses by
`connection.vendor`, not the ENGINE string, so a wrapped backend
(django-prometheus, a pool) still works. mypy checks that both modules
satisfy `Engine` (engines/conformance.py).

Helpers that exist for one engine only keep its name in theirs
(`postgres_copy_rows`, `sqlite_bulk_load_pragmas`); file-level SQLite
helpers live in `sqlite_file`, server-level PostgreSQL ones in
`postgres_server`. Everything here takes aliases and plain values, never
prints, and raises Django's database errors for the caller to turn into
RollbackErrors.
"""
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol, cast

from django.db import connections

from anthias_rollback.exceptions import ConfigError

if TYPE_CHECKING:
    from django.db import models

_MODULES = {'sqlite': 'anthias_rollback.engines.sqlite',
            'postgresql': 'anthias_rollback.engines.postgresql'}


class Engine(Protocol):
    """What every engine module provides: reading, writing a copy,
    checks and probes (tests/test_engines.py holds both to it too)."""

    __name__: str   # the module's (is_sqlite)
    # PostgreSQL's reader hands the copy COPY text rows; SQLite's rows
    # are values.
    ROWS_AS_COPY_TEXT: bool
    # JSON arrives as text the copy must parse itself (SQLite).
    JSON_AS_TEXT: bool

    # -- reading
    def read_snapshot(self, alias: str, deadline: float | None = None
                      ) -> AbstractContextManager[None]: ...

    def fetch_chunks(self, alias: str, sql: str, params: Sequence = (),
                     chunk_rows: int = 5000) -> Iterator[list[tuple]]: ...

    def byte_order(self, column: str, text: bool) -> str: ...

    def key_range_clause(self, column: str, kind: str | None,
                         low: object, high: object
                         ) -> tuple[str, list]: ...

    def key_in_clause(self, column: str, kind: str | None,
                      keys: Sequence) -> tuple[str, list]: ...

    def fast_column(self, plan: Any, alias: str, quoted: str,
                    digest: bool = False
                    ) -> tuple[str, Callable | None]: ...

    def select_sql(self, alias: str, table: str,
                   fields: Sequence) -> str: ...

    # Checksum mode's bucket digests computed in the engine (digests.py).
    def digest_blockers(self, alias: str, model: type['models.Model']
                        ) -> list[str]: ...

    def bucket_digests(self, alias: str, model: type['models.Model'],
                       bounds: list,
                       on_rows: Callable[[int], None] | None = None
                       ) -> list[tuple[int, bytes]]: ...

    def sequence_values(self, alias: str,
                        tables: Iterable[tuple[str, str]]
                        ) -> dict[str, int]: ...

    # -- writing a copy
    def bulk_load(self, alias: str) -> AbstractContextManager[None]: ...

    def truncate(self, alias: str, tables: Iterable[str],
                 referenced: Iterable[str] = ()) -> None: ...

    def drop_secondary_indexes(self, alias: str, tables: Iterable[str]
                               ) -> list[str]: ...

    def create_indexes(self, alias: str,
                       definitions: Iterable[str]) -> None: ...

    def write_rows(self, alias: str, table: str, columns: list[str],
                   batches: Iterator[list]) -> None: ...

    def value_checker(self, field: 'models.Field', alias: str
                      ) -> Callable[[Any], None] | None: ...

    def value_writer(self, field: 'models.Field', alias: str
                     ) -> Callable[[Any], Any]: ...

    def finish_load(self, source_alias: str, target_alias: str,
                    model_list: list[type['models.Model']]
                    ) -> list[tuple[str, Any, str, str]]: ...

    # -- checks and probes
    def source_problem(self, alias: str) -> str | None: ...

    def foreign_key_problems(self, alias: str, tables: Iterable[str]
                             ) -> list[tuple[str, Any, str, str]]: ...

    def probe_table(self, alias: str, model: type['models.Model'],
                    budget_ms: int) -> None: ...

    def server_down(self, error: BaseException) -> bool: ...


# The Protocol's names, for the runtime check in tests/test_engines.py.
INTERFACE = tuple(name for name in (*Engine.__annotations__, *vars(Engine))
                  if not name.startswith('_'))


def for_alias(alias: str) -> Engine:
    """The engine module for *alias*; ConfigError for an engine this app
    does not support (named with the alias, never the DSN)."""
    vendor = connections[alias].vendor
    name = _MODULES.get(vendor)
    if name is None:
        raise ConfigError(f'database {alias!r}: engine {vendor} is not '
                          'supported (sqlite and postgresql are)')
    # Imported by name: the engine modules import this package.
    return cast(Engine, import_module(name))


def is_sqlite(alias: str) -> bool:
    """Is *alias* a SQLite file (the kind a rollback can swap in)?"""
    return for_alias(alias).__name__ == _MODULES['sqlite']


class ValueRejected(Exception):
    """A source value the target engine would reject (raised by the
    engines' value checkers; the copy collects them as problems)."""

