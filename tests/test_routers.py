"""BothProfilesRouter: while `migrate` runs on an alias, a data
migration writing through the default manager writes there, and only
there (issue: `migrate --database sqlite` died with "database is
locked"; `--database postgres` wrote its rows into the live SQLite file).

The CMS host (tests/hosts/cms) has such a data migration
(tests/models_corners/migrations/0002) and wagtail's own; each migrate
runs in a real process, and the database not named must not change.
"""
import sqlite3

import psycopg2
import pytest
from django.db import connections, router

from anthias_rollback import routers
from anthias_rollback.routers import BothProfilesRouter
from tests.helpers import raw_tables
from tests.test_host_cms import Device, cms_database  # noqa: F401

SEEDED = "SELECT count(*) FROM models_corners_setting WHERE key = " \
         "'seeded-by-0002'"


def sqlite_seeded(path) -> int:
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        return conn.execute(SEEDED).fetchone()[0]
    finally:
        conn.close()


def pg_seeded(url: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(SEEDED)
            return cursor.fetchone()[0]
    finally:
        conn.close()


def ok(done) -> None:
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert 'Traceback' not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize('profile', ['sqlite', 'postgres'])
def test_data_migrations_write_only_to_the_migrated_alias(
        tmp_path, cms_database, profile):  # noqa: F811
    data = tmp_path / 'data'
    data.mkdir()
    device = Device(data, cms_database)
    env = device.env(ANTHIAS_DB_PROFILE=profile)

    ok(device.run('migrate', '--database', 'postgres', '--noinput',
                  env=env))
    assert pg_seeded(device.pg_url) == 1
    # Nothing was written to the SQLite file (it may not even exist).
    if device.sqlite.exists():
        assert not any(raw_tables.sqlite_fingerprint(device.sqlite)
                       ['rows'].values())

    before = raw_tables.pg_fingerprint(device.pg_url)
    ok(device.run('migrate', '--database', 'sqlite', '--noinput', env=env))
    assert sqlite_seeded(device.sqlite) == 1
    assert raw_tables.pg_fingerprint(device.pg_url) == before

    # The data migration again on PostgreSQL while SQLite has its
    # tables: its rows must not land in the SQLite file.
    ok(device.run('migrate', '--database', 'postgres', 'models_corners',
                  'zero', '--noinput', env=env))
    sqlite_before = raw_tables.sqlite_fingerprint(device.sqlite)
    ok(device.run('migrate', '--database', 'postgres', '--noinput',
                  env=env))
    assert pg_seeded(device.pg_url) == 1
    assert raw_tables.sqlite_fingerprint(device.sqlite) == sqlite_before

    # And on SQLite, PostgreSQL (which has every table) stays as it is.
    ok(device.run('migrate', '--database', 'sqlite', 'models_corners',
                  'zero', '--noinput', env=env))
    before = raw_tables.pg_fingerprint(device.pg_url)
    ok(device.run('migrate', '--database', 'sqlite', '--noinput', env=env))
    assert sqlite_seeded(device.sqlite) == 1
    assert raw_tables.pg_fingerprint(device.pg_url) == before


def test_no_opinion_outside_a_migrate():
    from django.contrib.auth.models import User

    ours = BothProfilesRouter()
    assert routers.migrating_alias() is None
    assert ours.db_for_read(User) is None
    assert ours.db_for_write(User) is None


def test_migrating_routes_the_default_manager_and_restores():
    from django.contrib.auth.models import User

    default = connections['default']
    with routers.migrating('sqlite'):
        assert router.db_for_write(User) == 'sqlite'
        assert router.db_for_read(User) == 'sqlite'
        # `.using('default')` (wagtail's create_permissions) lands there.
        assert connections['default'] is connections['sqlite']
    assert connections['default'] is default
    assert routers.migrating_alias() is None
    assert router.db_for_write(User) == 'default'
    with pytest.raises(RuntimeError), routers.migrating('postgres'):
        raise RuntimeError('a failed migrate')
    assert routers.migrating_alias() is None
    assert connections['default'] is default


def test_migrating_without_the_router_installed(settings):
    """A host that did not list BothProfilesRouter: ours is put in front
    for the block only (ensure_schema relies on it)."""
    from django.contrib.auth.models import User

    def forget():   # ConnectionRouter caches the resolved list
        router._routers = None
        router.__dict__.pop('routers', None)

    settings.DATABASE_ROUTERS = []
    forget()
    try:
        assert router.routers == []
        with routers.migrating('postgres'):
            assert router.db_for_write(User) == 'postgres'
        assert router.routers == []
        assert router.db_for_write(User) == 'default'
    finally:
        settings.DATABASE_ROUTERS = [
            'anthias_rollback.routers.BothProfilesRouter']
        forget()


def test_migrate_command_alias():
    alias = routers.migrate_command_alias
    assert alias(['manage.py', 'migrate', '--database', 'postgres']) == (
        'postgres')
    assert alias(['manage.py', 'migrate', 'app', '--database=sqlite',
                  '--noinput']) == 'sqlite'
    assert alias(['manage.py', 'migrate', '--database', 'default']) is None
    assert alias(['manage.py', 'migrate']) is None
    assert alias(['manage.py', 'check', '--database', 'sqlite']) is None
    assert alias(['manage.py', 'migrate', '--database']) is None


def test_signals_mark_every_app_until_the_last_post_migrate():
    from django.apps import apps
    from django.db.models.signals import post_migrate, pre_migrate

    configs = [a for a in apps.get_app_configs()
               if a.models_module is not None]
    default = connections['default']
    pre_migrate.send(sender=configs[0], app_config=configs[0],
                     verbosity=0, interactive=False, using='sqlite')
    try:
        assert connections['default'] is connections['sqlite']
        assert routers.migrating_alias() == 'sqlite'
        # An app's post_migrate before the last keeps the routing (its
        # handlers may write through the default manager too).
        routers.migration_finished(sender=configs[0], using='sqlite')
        assert routers.migrating_alias() == 'sqlite'
        routers.migration_finished(sender=configs[-1], using='sqlite')
        assert routers.migrating_alias() is None
    finally:
        routers._finish()
    assert connections['default'] is default
    assert post_migrate.has_listeners()
