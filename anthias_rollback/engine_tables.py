"""Tables on one engine only: found in the two real schemas, left out.

A planned table that exists on one engine only, or whose columns differ
between the engines although both have the same migrations applied (the
commands check that), can only come from a vendor-conditional migration
or model: wagtail's search index is an FTS5 virtual table plus text
columns on SQLite and tsvector columns on PostgreSQL. Such a table is
derived data: it is not copied, compared, journaled or counted (the
planner leaves it out, models_graph.plan_models), and the commands named
in ANTHIAS_ROLLBACK_REBUILD_COMMANDS rebuild it after a copy.

The list is found lazily, at the first plan a command makes, from the
aliases the command registered (`register_aliases`), so that a
`migrate_to_postgres` sees PostgreSQL's schema after its own `migrate`.
Each list found is recorded in the data dir (engine_tables.json, 0600):
with PostgreSQL down (a standby or backup rollback), or the migrations
not yet the same, the recorded list is used instead.
"""
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from django.apps import apps
from django.conf import settings
from django.db import connections

from anthias_rollback import conf, engines, fsutil, schema
from anthias_rollback.engines.sqlite_schema import sqlite_file_schema
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.report import first_line, redact

RECORD_NAME = 'engine_tables.json'
# A rebuild of a large search index takes minutes; one that hangs must
# not hold the command forever.
REBUILD_TIMEOUT_SECONDS = 3600

Found = Literal['introspected', 'recorded', 'none']


@dataclass(frozen=True)
class EngineTables:
    """The tables left out of every plan, and how they were found."""
    tables: tuple[str, ...]
    found: Found
    rebuilt_by: tuple[str, ...]

    def line(self) -> str | None:
        """The one line naming them (None when there are none)."""
        if not self.tables:
            return None
        rebuilt = ', '.join(self.rebuilt_by) or (
            'nothing (set ANTHIAS_ROLLBACK_REBUILD_COMMANDS)')
        how = '' if self.found == 'introspected' else \
            ' (as recorded: PostgreSQL could not be compared now)'
        return (f'left out, exist on one engine only / differ by engine: '
                f'{", ".join(self.tables)}{how}; rebuilt by: {rebuilt}')

    def as_dict(self) -> dict[str, Any]:
        return {'tables': list(self.tables), 'found': self.found,
                'rebuilt_by': list(self.rebuilt_by)}


@dataclass(frozen=True)
class RebuildResult:
    command: str
    ok: bool
    detail: str  # 'ok', or the last line the failed command printed

    def line(self) -> str:
        return f'{self.command}: {"ok" if self.ok else "failed"}' + (
            '' if self.ok else f' ({self.detail})')


# ----------------------------------------------------------- the registry

class _Registry:
    """What this process's command registered: the two aliases, the data
    dir, and a callable told once when the list is first found."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.aliases: tuple[str, str] | None = None
        self.data_dir: Path | None = None
        self.notify: Callable[[EngineTables], None] | None = None
        self.result: EngineTables | None = None
        self.final = False
        self.unreachable = False
        self.notified = False


_registry = _Registry()


def register_aliases(sqlite_alias: str, postgres_alias: str,
                     data_dir: Path | None,
                     notify: Callable[[EngineTables], None] | None = None
                     ) -> None:
    """Leave the tables that differ between these two aliases out of
    every plan this process makes from now on (found at the first plan).
    *notify* receives the list once, when it is first not empty."""
    _registry.clear()
    _registry.aliases = (sqlite_alias, postgres_alias)
    _registry.data_dir = Path(data_dir) if data_dir else None
    _registry.notify = notify


def unregister() -> None:
    """Forget the registration (end of a command; tests)."""
    _registry.clear()


def current() -> EngineTables | None:
    """The list this process used, if one was looked for."""
    return _registry.result


def left_out_tables() -> frozenset[str]:
    """Tables every plan leaves out now (empty when nothing registered).

    Introspects both aliases once their migrations are the same (then
    the answer is kept for the process); otherwise, and when PostgreSQL
    does not answer, the recorded list, looked for again next time.
    """
    if _registry.aliases is None:
        return frozenset()
    if not _registry.final:
        _resolve()
    result = _registry.result
    return frozenset(result.tables) if result else frozenset()


def _resolve() -> None:
    left, right = _registry.aliases or ('', '')
    found: EngineTables | None = None
    if not _registry.unreachable:
        # A connection this look opens is closed after it: the caller's
        # aliases stay as they were (the SQLite side is read from the
        # file read-only, engines/sqlite_schema.py says why).
        closed = [a for a in (left, right)
                  if a in connections and
                  connections[a].connection is None]
        try:
            tables = find_engine_tables(left, right)
        except _NotComparable:
            tables = None
        except Exception:  # noqa: BLE001 - a side duty; the plan goes on
            # PostgreSQL (or the file) does not answer, or the alias is
            # not this run's to read: the record, and not asked again.
            _registry.unreachable = True
            tables = None
        finally:
            for alias in closed:
                connections[alias].close()
        if tables is not None:
            found = EngineTables(tables, 'introspected', rebuild_commands())
            _registry.final = True
            record_tables(_registry.data_dir, tables)
    if found is None:
        recorded = recorded_tables(_registry.data_dir)
        found = EngineTables(recorded or (),
                             'recorded' if recorded else 'none',
                             rebuild_commands())
    _registry.result = found
    if found.tables and not _registry.notified:
        _registry.notified = True
        if _registry.notify is not None:
            _registry.notify(found)


class _NotComparable(Exception):
    """The two schemas cannot be compared now (different migrations)."""


def find_engine_tables(sqlite_alias: str, postgres_alias: str
                       ) -> tuple[str, ...]:
    """Planned tables (every concrete managed model, exclusions aside)
    missing on one alias or with other column names there, sorted.

    Reads both schemas and django_migrations: the SQLite file read-only
    (engines.sqlite_schema), PostgreSQL through Django's introspection.
    Raises _NotComparable when the applied migrations differ (then the
    schemas differ for that reason), RollbackError, DatabaseError, OSError
    or sqlite3.Error when an alias cannot be read.
    """
    planned = sorted({m._meta.db_table for m in _planned_models()})
    left_migrations, left = _schema(sqlite_alias, planned)
    right_migrations, right = _schema(postgres_alias, planned)
    if left_migrations != right_migrations or not left_migrations:
        raise _NotComparable()
    return tuple(t for t in planned if left.get(t) != right.get(t))


def _planned_models() -> list:
    return [m for m in apps.get_models(include_auto_created=True)
            if not (m._meta.proxy or not m._meta.managed
                    or m._meta.swapped)]


def _schema(alias: str, tables: list[str]
            ) -> tuple[set[tuple[str, str]],
                       dict[str, frozenset[str] | None]]:
    """(applied migrations, column names per table, None if missing)."""
    if engines.is_sqlite(alias):
        return sqlite_file_schema(
            Path(connections[alias].settings_dict['NAME']), tables)
    migrations = schema.applied_migrations(alias)
    connection = connections[alias]
    existing = set(connection.introspection.table_names())
    found: dict[str, frozenset[str] | None] = {}
    with connection.cursor() as cursor:
        for table in tables:
            if table not in existing:
                found[table] = None
                continue
            found[table] = frozenset(
                c.name for c in connection.introspection
                .get_table_description(cursor, table))
    return migrations, found


# ------------------------------------------------------------- the record

def record_path(data_dir: Path) -> Path:
    return Path(data_dir) / RECORD_NAME


def record_tables(data_dir: Path | None, tables: tuple[str, ...]) -> None:
    """Keep *tables* for the runs that cannot introspect PostgreSQL
    (0600, atomic; only when it changed). A data dir that cannot be
    written costs only that fallback, never the command."""
    recorded = recorded_tables(data_dir)
    if data_dir is None or recorded == tables or (
            recorded is None and not tables):
        return
    try:
        fsutil.atomic_write_json(record_path(data_dir),
                                 {'tables': list(tables)}, mode=0o600)
    except OSError:
        pass


def recorded_tables(data_dir: Path | None) -> tuple[str, ...] | None:
    """The recorded list, None when there is none (or it is unreadable:
    then nothing is left out and the copy says what differs)."""
    if data_dir is None:
        return None
    try:
        document = fsutil.read_json(record_path(data_dir),
                                    'engine tables record', RollbackError)
    except RollbackError:
        return None
    tables = (document or {}).get('tables')
    if not isinstance(tables, list):
        return None
    return tuple(str(t) for t in tables)


# ----------------------------------------------------- the rebuild commands

def rebuild_commands() -> tuple[str, ...]:
    """ANTHIAS_ROLLBACK_REBUILD_COMMANDS (ConfigError if malformed)."""
    return tuple(conf.get_setting('ANTHIAS_ROLLBACK_REBUILD_COMMANDS'))


def run_rebuild_commands(profile: str, *,
                         env: dict[str, str] | None = None,
                         timeout: float = REBUILD_TIMEOUT_SECONDS
                         ) -> list[RebuildResult]:
    """Run each rebuild command in a child process of this project with
    *profile* active (ANTHIAS_DB_PROFILE), so that it writes into the
    database that profile names: PostgreSQL after migrate_to_postgres,
    the new live SQLite file after a rollback (*env* adds variables,
    e.g. ANTHIAS_SQLITE_PATH). Never raises for a command's failure:
    each result says ok or its last line."""
    return [_run_one(command, profile, env or {}, timeout)
            for command in rebuild_commands()]


def _run_one(command: str, profile: str, extra: dict[str, str],
             timeout: float) -> RebuildResult:
    env = dict(os.environ, **extra)
    env['ANTHIAS_DB_PROFILE'] = profile
    # (override_settings hides SETTINGS_MODULE; the variable then has it)
    module = settings.SETTINGS_MODULE or os.environ.get(
        'DJANGO_SETTINGS_MODULE')
    if module:
        env['DJANGO_SETTINGS_MODULE'] = module
    # `python -m django` finds the project as this process did.
    env['PYTHONPATH'] = os.pathsep.join(
        [os.getcwd(), *(p for p in sys.path if p)])
    try:
        done = subprocess.run(
            [sys.executable, '-m', 'django', *shlex.split(command)],
            env=env, capture_output=True, text=True, timeout=timeout,
            check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return RebuildResult(command, False, redact(first_line(err)))
    if done.returncode == 0:
        return RebuildResult(command, True, 'ok')
    lines = [line.strip() for line in
             (done.stdout + '\n' + done.stderr).splitlines()
             if line.strip()]
    last = lines[-1] if lines else f'exit {done.returncode}'
    return RebuildResult(command, False,
                         redact(f'exit {done.returncode}: {last}'))
