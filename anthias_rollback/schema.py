"""Migration state and reachability of an alias.

Reads only. Raises DatabaseUnavailableError (naming the alias and
host:port, never the password) when the alias does not answer.
"""
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.recorder import MigrationRecorder

from anthias_rollback.exceptions import DatabaseUnavailableError
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
        raise DatabaseUnavailableError(
            f'{describe_alias(alias)} does not answer: '
            f'{first_line(err)}') from None


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
