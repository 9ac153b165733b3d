"""An upgrade while the rollback window is open, on the CMS host, in real
processes: the device runs on PostgreSQL with an ORM writer going, the
new release's `migrate` (as Anthias's start script runs it, on
`default` = postgres) adds a model and a column with a default on a table
that holds rows, writers of the old and the new release write to both;
then the device goes back to SQLite in three ways:

- (a) PostgreSQL up: the rollback copies it, the new table and column
  included, and a stale process's write to the new table is refused;
- (b) PostgreSQL killed, from the standby, which followed the schema;
- (c) PostgreSQL killed, no standby, from a backup taken before the
  upgrade: migrated forward in the new file, then restored.

Each ends with this file's own row-by-row comparison (tests/helpers/
raw_tables and sqlite3), never validate_migration.
"""
import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

from tests import test_host_cms
from tests.conftest import postgres_killed
from tests.helpers import raw_tables
from tests.test_host_cms import BY_KEY, MANAGE, ROOT, SEARCH_TABLES, Device

# A fresh database on the run's PostgreSQL server per test.
cms_database = test_host_cms.cms_database

NEW_TABLE = 'release3_notice'
SETTING = 'models_corners_setting'
# Tables `migrate` fills itself (post_migrate): the upgrade adds rows.
MIGRATE_MADE = {'auth_permission', 'django_content_type'}


def ok(done: subprocess.CompletedProcess, *codes: int) -> str:
    output = done.stdout + done.stderr
    assert done.returncode in (codes or (0,)), output[-3000:]
    return output


class Writer:
    """A `cms_writer` process on the device's active profile."""

    def __init__(self, device: Device, tag: str, stop: Path) -> None:
        self.stop = stop
        self.proc = subprocess.Popen(
            [*MANAGE, 'cms_writer', '--tag', tag, '--stop-file', str(stop)],
            env=device.env(), cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

    def finish(self) -> dict:
        self.stop.touch()
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result['error'] is None, result
        return result


def pg_count(url: str, sql: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()[0]
    finally:
        conn.close()


def wait_for_rows(url: str, sql: str, at_least: int,
                  timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while pg_count(url, sql) < at_least:
        assert time.monotonic() < deadline, f'{sql}: fewer than {at_least}'
        time.sleep(0.1)


def upgraded_window(tmp_path: Path, url: str) -> Device:
    """Release 1 moved to PostgreSQL with a backup and a standby; then
    release 3's migrate under a running writer, and writers of both
    releases. Returns the device (release 3, writers stopped)."""
    data = tmp_path / 'data'
    data.mkdir()
    device = Device(data, url)
    ok(device.run('migrate', '--database', 'sqlite', '--noinput'))
    ok(device.run('migrate', '--database', 'postgres', '--noinput'))
    ok(device.run('cms_fill', '--phase', 'before'))
    ok(device.run('backup_database'))
    ok(device.run('migrate_to_postgres'))
    ok(device.run('switch_database', '--to', 'postgres'))
    ok(device.run('replicate_changes', '--once'))

    old = Writer(device, 'r1', tmp_path / 'stop-r1')
    wait_for_rows(url, f"SELECT count(*) FROM {SETTING} "
                       "WHERE key LIKE 'r1-%'", 5)
    device.release = 3
    # Anthias's start script: `migrate` on default, the active profile.
    ok(device.run('migrate', '--noinput'))
    new = Writer(device, 'r3', tmp_path / 'stop-r3')
    wait_for_rows(url, f'SELECT count(*) FROM {NEW_TABLE}', 10)
    assert old.finish()['acknowledged'] > 0
    assert new.finish()['acknowledged'] > 0
    assert pg_count(url, f'SELECT count(*) FROM {SETTING} '
                         'WHERE priority > 0') > 0
    return device


def assert_live_equals_postgres(device: Device) -> dict:
    diff = raw_tables.compare_all(device.sqlite, device.pg_url,
                                  skip=SEARCH_TABLES, by_key=BY_KEY)
    assert diff.equal, json.dumps(diff.differing, default=str)[:3000]
    assert not diff.column_sets_differ or set(
        diff.column_sets_differ) <= SEARCH_TABLES, diff.column_sets_differ
    assert {NEW_TABLE, SETTING} <= set(diff.compared), diff.compared
    assert diff.compared[NEW_TABLE] >= 10
    return diff.compared


def sqlite_rows(path: Path, table: str, columns: list[str]) -> list:
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        names = ', '.join(f'"{c}"' for c in columns)
        return sorted(conn.execute(f'SELECT {names} FROM "{table}"'),
                      key=repr)
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_a_postgres_up(tmp_path, cms_database):
    device = upgraded_window(tmp_path, cms_database)
    out = ok(device.run('rollback_migration', '--emergency', '--yes'))
    assert 'data loss: none' in out
    assert_live_equals_postgres(device)
    # A stale process still on PostgreSQL: its write to the table the
    # upgrade made is refused, like its write to an old table.
    conn = psycopg2.connect(cms_database)
    try:
        with conn.cursor() as cursor, pytest.raises(
                psycopg2.Error, match='fenced'):
            cursor.execute(f"INSERT INTO {NEW_TABLE} (text) "
                           "VALUES ('stale')")
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_b_postgres_killed_from_the_standby(tmp_path, cms_database):
    device = upgraded_window(tmp_path, cms_database)
    # The standby follows the schema: the rounds after the upgrade work.
    ok(device.run('replicate_changes', '--once'))
    ok(device.run('rollback_readiness'))
    with postgres_killed():
        out = ok(device.run('rollback_migration', '--emergency', '--yes'),
                 0, 4)
        assert 'standby' in out
    # Every write was replicated before the kill: nothing is missing.
    assert_live_equals_postgres(device)


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_c_postgres_killed_from_a_backup_before_the_upgrade(
        tmp_path, cms_database):
    device = upgraded_window(tmp_path, cms_database)
    shutil.rmtree(device.data / 'standby')
    backups = sorted((device.data / 'backups').glob('*.db'))
    assert len(backups) == 1
    backup = backups[0]
    with postgres_killed():
        out = ok(device.run('rollback_migration', '--emergency', '--yes'),
                 4)
        assert 'backup' in out
    # The backup's rows, row by row, in the upgraded schema: the new
    # column holds its default, the new table exists and is empty, and
    # release 2's data migration ran on the new file (only there).
    before = raw_tables.sqlite_tables(backup)
    after = raw_tables.sqlite_tables(device.sqlite)
    for table, columns in before.items():
        if table in SEARCH_TABLES or table == 'django_migrations':
            continue
        assert table in after, table
        left = sqlite_rows(device.sqlite, table, columns)
        right = sqlite_rows(backup, table, columns)
        if table == SETTING:
            by_key = {row[1]: row for row in left}
            assert by_key.pop('release-2')[2] == 'second release'
            assert by_key['seeded-by-0002'][2] == 'first release, upgraded'
            left = [r for r in left if r[1] != 'release-2'
                    and r[1] != 'seeded-by-0002']
            right = [r for r in right if r[1] != 'seeded-by-0002']
        if table in MIGRATE_MADE:
            # migrate's post_migrate adds the new model's rows.
            extra = set(left) - set(right)
            assert set(right) <= set(left), table
            assert extra and all('notice' in repr(r) for r in extra), extra
            continue
        assert left == right, table
    assert 'priority' in after[SETTING]
    assert {p for (p,) in sqlite_rows(device.sqlite, SETTING,
                                      ['priority'])} == {0}
    assert NEW_TABLE in after
    assert sqlite_rows(device.sqlite, NEW_TABLE, ['id']) == []
    applied = {f'{a}.{n}' for a, n in sqlite_rows(
        device.sqlite, 'django_migrations', ['app', 'name'])}
    assert {'models_corners.0003_setting_priority',
            'release3.0001_notice'} <= applied
