"""Router that lets `migrate --database sqlite|postgres` build the schema
and keeps a migration's own writes on the database being migrated.

Django allows migrations everywhere when no router has an opinion; this
router says so explicitly for our aliases, so a host router placed after
it cannot keep `migrate` from creating the full schema on either engine.

Data migrations (RunPython) of third-party apps write through the default
manager, i.e. through `default`: during `migrate --database X` that is a
second connection (to the same SQLite file: "database is locked"; to the
other engine: rows written where nobody asked). While a migrate runs on X
(from Django's pre_migrate to post_migrate, which apps.py connects to
`migration_started`/`migration_finished`), every read and write goes to X,
and `default` itself is X's connection in that thread: the same
connection and transaction as the migration. Outside a migrate
reads and writes get no opinion (None): core code always names its alias.
A migrate that raises sends no post_migrate: a process that goes on
after one (in-process callers) uses `migrating()`, which restores the
state whatever happens.
"""
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Per thread: a migrate in one thread must not route another thread's
# queries (the test server, a monitor thread). Django's connections are
# per thread too.
_state = threading.local()


def migrating_alias() -> str | None:
    """The alias a `migrate` is running on in this thread, if any."""
    return getattr(_state, 'alias', None)


def _start(alias: str) -> None:
    """Route to *alias*, and let `default` BE *alias*'s connection: some
    data migrations name `default` outright (wagtail's 0086 calls
    create_permissions(), whose `using` defaults to 'default'), which no
    router can redirect. Same wrapper object: same connection, same
    transaction as the migration."""
    from django.db import connections

    from anthias_rollback.profiles import DEFAULT

    if getattr(_state, 'saved_default', None) is None and alias != DEFAULT:
        _state.saved_default = connections[DEFAULT]
        connections[DEFAULT] = connections[alias]
    _state.alias = alias


def _finish() -> None:
    from django.db import connections

    from anthias_rollback.profiles import DEFAULT

    saved = getattr(_state, 'saved_default', None)
    if saved is not None:
        connections[DEFAULT] = saved
    _state.saved_default = None
    _state.alias = None


def migration_started(sender: Any = None, using: str | None = None,
                      **kwargs: Any) -> None:
    """pre_migrate receiver: sent once per app before ANY migration runs
    (the first app's migrations included), with the alias in `using`."""
    if using is not None and migrating_alias() != using:
        _start(using)


def migration_finished(sender: Any = None, using: str | None = None,
                       **kwargs: Any) -> None:
    """post_migrate receiver: sent per app (those with a models module,
    in INSTALLED_APPS order) after every migration ran. Cleared at the
    last app's, so other apps' post_migrate handlers that write through
    the default manager stay on the migrated alias too."""
    from django.apps import apps

    with_models = [a for a in apps.get_app_configs()
                   if a.models_module is not None]
    if not with_models or sender is with_models[-1]:
        _finish()


def migrate_command_alias(argv: list[str]) -> str | None:
    """X when this process is `manage.py migrate --database X` (X not
    `default`). apps.py then starts the routing in ready(), before the
    command imports any migration: some decide their operations from
    `django.db.connection.vendor` when imported (wagtailsearch 0006
    creates an FTS5 table on SQLite, tsvector columns on PostgreSQL),
    which must then be X's."""
    import argparse

    from anthias_rollback.profiles import DEFAULT

    if len(argv) < 2 or argv[1] != 'migrate':
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--database')
    try:
        known, _ = parser.parse_known_args(argv[2:])
    except SystemExit:   # `--database` without a value: migrate says so
        return None
    alias = known.database
    return alias if alias and alias != DEFAULT else None


@contextmanager
def migrating(alias: str) -> Iterator[None]:
    """Route this thread's default-manager reads and writes (and
    `default`) to *alias* for the block, even when the host did not
    install this router (it is put at the front of django.db.router's
    list meanwhile). Whatever happens, the state is put back."""
    from django.db import router

    routers = router.routers   # cached_property: the resolved list
    ours = BothProfilesRouter()
    added = not any(isinstance(r, BothProfilesRouter) for r in routers)
    if added:
        routers.insert(0, ours)
    nested = migrating_alias() is not None
    if not nested:
        _start(alias)
    try:
        yield
    finally:
        if not nested:
            _finish()
        if added:
            routers.remove(ours)


class BothProfilesRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return migrating_alias()

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return migrating_alias()

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> None:
        return None

    def allow_migrate(self, db: str, app_label: str,
                      model_name: str | None = None,
                      **hints: Any) -> bool | None:
        from anthias_rollback.profiles import DEFAULT, PROFILES

        if db in PROFILES or db == DEFAULT:
            return True
        return None
