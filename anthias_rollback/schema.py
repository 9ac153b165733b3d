"""Migration state and reachability of an alias, and applying the
schema (`migrate`) on one.

Reads only, but for ensure_schema. Raises DatabaseUnavailableError
(DatabaseDownError when the server is down rather than misconfigured),
naming the alias and host:port, never the password, when the alias does
not answer.
"""
from io import StringIO

from django.core.management import call_command
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.recorder import MigrationRecorder

from anthias_rollback import engines
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


def diff_migrations(left_alias: str, right_alias: str
                    ) -> tuple[list[str], list[str]]:
    """Applied migrations only on the left, only on the right."""
    left = applied_migrations(left_alias)
    right = applied_migrations(right_alias)
    return (sorted(f'{a}.{n}' for a, n in left - right),
            sorted(f'{a}.{n}' for a, n in right - left))


def ensure_schema(alias: str) -> list[str]:
    """Apply pending migrations on *alias*; return their labels.

    Raises SchemaMismatchError naming the alias when `migrate` fails (no
    permission to create tables, disk full on the server...).
    """
    pending = pending_migrations(alias)
    if not pending:
        return []
    try:
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
