"""Migration state and reachability of an alias, and applying the
schema (`migrate`) on one.

Reads only, but for ensure_schema. Raises DatabaseUnavailableError
(DatabaseDownError when the server is down rather than misconfigured),
naming the alias and host:port, never the password, when the alias does
not answer.
"""
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from io import StringIO
from typing import Any

from django.core.management import call_command
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder

from anthias_rollback import engines, routers
from anthias_rollback.exceptions import (
    DatabaseDownError,
    DatabaseUnavailableError,
    SchemaMismatchError,
)
from anthias_rollback.profiles import check_alias_configured
from anthias_rollback.report import describe_alias, first_line


def check_connection(alias: str) -> None:
    """Run `SELECT 1` on *alias*; DatabaseUnavailableError if it fails."""
    check_alias_configured(alias)
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute('SELECT 1')
            cursor.fetchone()
    except DatabaseError as err:
        connections[alias].close()
        down = engines.for_alias(alias).server_down(err)
        kind = DatabaseDownError if down else DatabaseUnavailableError
        raise kind(f'{describe_alias(alias)} '
                   + ('does not answer' if down else 'refused the connection')
                   + f': {first_line(err)}') from None


def applied_migrations(alias: str) -> set[tuple[str, str]]:
    """(app, name) of the migrations recorded as applied on *alias*."""
    check_connection(alias)
    recorder = MigrationRecorder(connections[alias])
    if not recorder.has_table():
        return set()
    return set(recorder.applied_migrations())


def pending_migrations(alias: str) -> list[str]:
    """Labels (`app.name`) of migrations not yet applied on *alias*."""
    check_connection(alias)
    executor = MigrationExecutor(connections[alias])
    targets = executor.loader.graph.leaf_nodes()
    return [f'{m.app_label}.{m.name}'
            for m, _ in executor.migration_plan(targets)]


@dataclass(frozen=True)
class MigrationState:
    """A database's recorded migrations as this code's Django sees them.

    unknown: recorded names this code has never heard of (neither a
    migration on disk nor replaced by a squash on disk): the file is
    AHEAD of the code, a downgrade. pending: this code's migrations not
    yet applied there, squashes resolved, in the order `migrate` would
    apply them: the file is BEHIND and can be migrated forward."""
    unknown: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def current(self) -> bool:
        return not self.unknown and not self.pending


class _RecordedLoader(MigrationLoader):
    """MigrationLoader fed a set of recorded (app, name) instead of a
    connection, so squashes are resolved by Django's own build_graph
    (all replaced applied: the squash counts as applied; some: the
    replaced migrations stay in the graph) for a file read elsewhere."""

    def __init__(self, recorded: Iterable[tuple[str, str]]) -> None:
        self._recorded: dict[tuple[str, str], Any] = dict.fromkeys(recorded)
        super().__init__(None, ignore_no_migrations=True)

    # build_graph() with no connection assigns {}: the records stand in.
    @property
    def applied_migrations(self) -> dict[tuple[str, str], Any]:
        return self._recorded

    @applied_migrations.setter
    def applied_migrations(self, value: Any) -> None:
        pass


def migration_state(recorded: Iterable[tuple[str, str]]
                    ) -> MigrationState:
    """Compare migrations recorded in a database (django_migrations rows
    as (app, name)) with this code's. The one check every place that
    holds a file against the code uses (backup, rollback, standby)."""
    recorded = set(recorded)
    loader = _RecordedLoader(recorded)
    replaced = {name for migration in loader.replacements.values()
                for name in migration.replaces}
    unknown = sorted(f'{a}.{n}' for a, n in recorded
                     if (a, n) not in loader.disk_migrations
                     and (a, n) not in replaced)
    applied = loader.applied_migrations
    pending: list[str] = []
    seen: set[tuple[str, str]] = set()
    # MigrationExecutor.migration_plan's forward walk from the leaves.
    for leaf in loader.graph.leaf_nodes():
        for key in loader.graph.forwards_plan(leaf):
            if key not in applied and key not in seen:
                seen.add(key)
                pending.append(f'{key[0]}.{key[1]}')
    return MigrationState(tuple(unknown), tuple(pending))


def parse_labels(labels: Iterable[str]) -> set[tuple[str, str]]:
    """`app.name` labels (a manifest's, sqlite_applied_migrations')
    back to (app, name)."""
    return {tuple(label.split('.', 1)) for label in labels}  # type: ignore[misc]


def alias_migration_state(alias: str) -> MigrationState:
    """migration_state of what *alias* records."""
    return migration_state(applied_migrations(alias))


def describe_state(state: MigrationState, limit: int = 5) -> str:
    """`unknown to this code: a.1, b.2` / `not applied: ...`, shortened."""
    def names(labels: tuple[str, ...]) -> str:
        more = len(labels) - limit
        return ', '.join(labels[:limit]) + (f' and {more} more'
                                            if more > 0 else '')
    parts = []
    if state.unknown:
        parts.append(f'unknown to this code: {names(state.unknown)}')
    if state.pending:
        parts.append(f'not applied: {names(state.pending)}')
    return '; '.join(parts)


def diff_migrations(left_alias: str, right_alias: str
                    ) -> tuple[list[str], list[str]]:
    """Applied migrations only on the left, only on the right."""
    left = applied_migrations(left_alias)
    right = applied_migrations(right_alias)
    return (sorted(f'{a}.{n}' for a, n in left - right),
            sorted(f'{a}.{n}' for a, n in right - left))


def forget_migration_modules() -> None:
    """Drop the installed apps' migration modules from sys.modules, so
    the next MigrationLoader imports them again.

    Some migrations choose their operations from `django.db.connection`'s
    vendor when imported (wagtailsearch 0006: an FTS5 table on SQLite,
    tsvector columns on PostgreSQL). Imported once in a process whose
    `default` is SQLite (a backup's migration check, say), the module
    would later create SQLite's table on PostgreSQL."""
    from django.apps import apps

    prefixes = []
    for config in apps.get_app_configs():
        module, _ = MigrationLoader.migrations_module(config.label)
        if module:
            prefixes.append(module + '.')
    for name in [n for n in sys.modules if n.startswith(tuple(prefixes))]:
        del sys.modules[name]


def ensure_schema(alias: str) -> list[str]:
    """Apply pending migrations on *alias*; return their labels.

    Raises SchemaMismatchError naming the alias when `migrate` fails (no
    permission to create tables, disk full on the server...).
    """
    try:
        # Data migrations writing through the default manager (or naming
        # `default`) must land on *alias*, in its transaction, even when
        # the host did not install BothProfilesRouter; and migrations
        # imported here (again: forget_migration_modules) see *alias*'s
        # vendor as `connection`'s.
        with routers.migrating(alias):
            forget_migration_modules()
            pending = pending_migrations(alias)
            if not pending:
                return []
            call_command('migrate', database=alias, interactive=False,
                         verbosity=0, stdout=StringIO(), stderr=StringIO())
    except DatabaseError as err:
        connections[alias].close()
        raise SchemaMismatchError(
            f'cannot create the schema on {describe_alias(alias)}: '
            f'{first_line(err)}') from None
    return pending


def check_same_migrations(source_alias: str, target_alias: str,
                          pending_on_target: list[str] | None = None
                          ) -> None:
    """SchemaMismatchError listing migrations applied on one side only
    (*pending_on_target* counts as applied there: a dry run's view)."""
    only_source, only_target = diff_migrations(source_alias,
                                               target_alias)
    if pending_on_target:
        only_source = [m for m in only_source
                       if m not in set(pending_on_target)]
    if only_source or only_target:
        lines = []
        if only_source:
            lines.append(f'only on {describe_alias(source_alias)}: '
                         f'{", ".join(only_source)}')
        if only_target:
            lines.append(f'only on {describe_alias(target_alias)}: '
                         f'{", ".join(only_target)}')
        raise SchemaMismatchError(
            'the two databases have different migrations applied; run '
            '`migrate` on the side that lags first. ' + '; '.join(lines))
