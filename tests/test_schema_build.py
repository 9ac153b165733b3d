"""schema_build: a SQLite file's schema built (or migrated forward) in a
child where the file is the only database, so data migrations writing
through the default manager reach nothing else (they wrote into the
production PostgreSQL when the rollback built its file in-process); and
schema.migration_state, the one view of a file's migrations against the
code (squashes resolved as Django's MigrationLoader does).

The data migrations are the CMS host's (tests/hosts/cms: wagtail's, and
tests/models_corners 0002), run in real processes.
"""
import json
import logging
import sqlite3
import stat
import subprocess
import sys

import pytest
from django.db import connections

from anthias_rollback import schema, schema_build
from anthias_rollback.exceptions import SchemaMismatchError
from tests.conftest import ROOT
from tests.helpers import raw_tables
from tests.test_host_cms import (  # noqa: F401
    BY_KEY,
    SEARCH_TABLES,
    Device,
    cms_database,
)


def in_cms(device: Device, script: str, *args: str, **env: str) -> dict:
    """Run *script* in the CMS host (django set up); its last stdout line
    is JSON."""
    code = 'import django, json, sys\ndjango.setup()\n' + script
    done = subprocess.run([sys.executable, '-c', code, *args],
                          env=device.env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def migrated_postgres(device: Device) -> None:
    done = device.run('migrate', '--database', 'postgres', '--noinput',
                      env=device.env(ANTHIAS_DB_PROFILE='postgres'))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


BUILD_AND_COPY = '''
from pathlib import Path
from anthias_rollback import profiles, schema_build, transfer
path = Path(sys.argv[1])
applied = schema_build.migrate_file(path, timeout=300)
import sqlite3
conn = sqlite3.connect(path)
seeded = conn.execute('SELECT key FROM models_corners_setting').fetchall()
conn.close()
with profiles.sqlite_file_alias(path) as alias:
    # The composite-key model is another piece of work's (transfer).
    transfer.transfer_data('postgres', alias, replace=True,
                           exclude=['models_corners.Composite'])
print(json.dumps({'applied': applied, 'seeded': seeded}))
'''


@pytest.mark.slow
def test_new_file_built_in_isolation_then_holds_exactly_postgres_rows(
        tmp_path, cms_database):  # noqa: F811
    """On the postgres profile (`default` is PostgreSQL): the data
    migrations run in the new file only (PostgreSQL's fingerprint,
    sequences included, does not move), and the copy afterwards leaves
    exactly PostgreSQL's rows, not the ones the data migrations made."""
    import psycopg2

    data = tmp_path / 'data'
    data.mkdir()
    device = Device(data, cms_database)
    migrated_postgres(device)
    conn = psycopg2.connect(device.pg_url)
    with conn, conn.cursor() as cursor:
        # PostgreSQL's rows differ from what the data migration makes.
        cursor.execute("UPDATE models_corners_setting SET value = 'edited' "
                       "WHERE key = 'seeded-by-0002'")
        cursor.execute("INSERT INTO models_corners_setting (key, value) "
                       "VALUES ('only-on-postgres', 'x')")
        cursor.execute('DELETE FROM "MixedCase" WHERE "Parent" IS NOT NULL')
    conn.close()
    before = raw_tables.pg_fingerprint(device.pg_url)
    new = data / 'new.db'
    result = in_cms(device, BUILD_AND_COPY, str(new),
                    ANTHIAS_DB_PROFILE='postgres')
    assert raw_tables.pg_fingerprint(device.pg_url) == before
    assert 'models_corners.0002_settings_seeded' in result['applied']
    assert result['seeded'] == [['seeded-by-0002']]
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    diff = raw_tables.compare_all(
        new, device.pg_url, by_key=BY_KEY,
        skip=SEARCH_TABLES | {'models_corners_composite'})
    assert diff.equal, json.dumps(diff.differing, default=str)[:3000]
    assert {'MixedCase', 'models_corners_setting',
            'wagtailcore_page'} <= set(diff.compared)


SQUASH_STATE = '''
from pathlib import Path
import sqlite3
from anthias_rollback import schema_build
from anthias_rollback.rollback import sources
path = Path(sys.argv[1])
schema_build.migrate_file(path, timeout=300)
squash = 'wagtailcore', '0001_squashed_0016_change_page_url_path_to_text_field'
out = {}
def state(name):
    s = sources.file_migration_state(path)
    out[name] = {'unknown': list(s.unknown), 'pending': list(s.pending)}
conn = sqlite3.connect(path)
out['recorded'] = [r[0] for r in conn.execute(
    "SELECT name FROM django_migrations WHERE app = 'wagtailcore'")]
state('fresh')
# A file from before the squash was shipped: only the replaced names.
conn.execute('DELETE FROM django_migrations WHERE app = ? AND name = ?',
             squash)
conn.commit()
state('replaced names only')
# Part of the squash applied: Django uses the replaced migrations.
conn.execute("DELETE FROM django_migrations WHERE app = 'wagtailcore' "
             "AND name = '0016_change_page_url_path_to_text_field'")
conn.commit()
state('partly')
conn.close()
print(json.dumps(out))
'''


@pytest.mark.slow
def test_squashed_history_is_neither_unknown_nor_pending(
        tmp_path, cms_database):  # noqa: F811
    """wagtailcore's 0001..0016 are squashed: Django records the replaced
    names too, which the rollback called 'unknown to this code'."""
    data = tmp_path / 'data'
    data.mkdir()
    device = Device(data, cms_database)
    out = in_cms(device, SQUASH_STATE, str(data / 'squash.db'))
    assert '0002_initial_data' in out['recorded']     # a replaced name
    assert out['fresh'] == {'unknown': [], 'pending': []}
    assert out['replaced names only'] == {'unknown': [], 'pending': []}
    assert out['partly'] == {
        'unknown': [],
        'pending': ['wagtailcore.0016_change_page_url_path_to_text_field']}


def test_failing_migration_is_one_line_naming_the_file(tmp_path, caplog):
    path = tmp_path / 'clash.db'
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE django_content_type (x integer)')
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger='anthias_rollback.schema'
                         ), pytest.raises(SchemaMismatchError) as excinfo:
        schema_build.migrate_file(path, timeout=300)
    message = str(excinfo.value)
    assert '\n' not in message
    assert str(path) in message
    assert 'already exists' in message
    assert 'Traceback' not in message
    assert any('Traceback' in r.getMessage() for r in caplog.records)


def test_new_file_is_created_private_and_migrated(tmp_path):
    path = tmp_path / 'new.db'
    applied = schema_build.migrate_file(path, timeout=300)
    assert 'sessions.0001_initial' in applied
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    conn = sqlite3.connect(path)
    try:
        assert conn.execute('PRAGMA journal_mode').fetchone()[0] == 'delete'
        names = {f'{a}.{n}' for a, n in conn.execute(
            'SELECT app, name FROM django_migrations')}
    finally:
        conn.close()
    assert set(applied) <= names
    assert schema_build.migrate_file(path, timeout=300) == []


@pytest.mark.django_db(databases=['sqlite'])
def test_migration_state_of_the_code():
    recorded = schema.applied_migrations('sqlite')
    assert schema.migration_state(recorded).current
    everything = schema.migration_state(set())
    assert everything.unknown == ()
    assert 'sessions.0001_initial' in everything.pending
    # contenttypes before auth: the order migrate applies them in.
    assert everything.pending.index('contenttypes.0001_initial') < \
        everything.pending.index('auth.0001_initial')
    behind = schema.migration_state(
        recorded - {('sessions', '0001_initial')})
    assert behind.pending == ('sessions.0001_initial',)
    assert behind.unknown == ()
    ahead = schema.migration_state(
        recorded | {('sessions', '0099_newer'), ('gone_app', '0001_x')})
    assert ahead.unknown == ('gone_app.0001_x', 'sessions.0099_newer')
    assert ahead.pending == ()
    assert 'unknown to this code: gone_app.0001_x' in schema.describe_state(
        ahead)
    assert connections['sqlite'].vendor == 'sqlite'


@pytest.mark.django_db(databases=['sqlite'])
def test_backup_verification_agrees_with_the_rollback(tmp_path):
    """backup_database's check (verify_backup, which the readiness and
    the rollback's choice of backup use) calls a file ahead of the code
    not valid, naming the migration, and a file behind it valid (the
    rollback migrates its copy forward)."""
    from anthias_rollback import backup

    live = tmp_path / 'live.db'
    schema_build.migrate_file(live, timeout=300)
    made = backup.create_backup(live, tmp_path / 'backups')
    assert backup.verify_backup(made.path).valid

    def edited(name, sql):
        path = tmp_path / name
        path.write_bytes(made.path.read_bytes())
        conn = sqlite3.connect(path)
        conn.execute(sql)
        conn.commit()
        conn.close()
        return backup.verify_backup(path).reasons

    behind = edited('behind.db', "DELETE FROM django_migrations WHERE "
                                 "app = 'sessions'")
    assert not any('does not know' in r for r in behind)
    ahead = edited('ahead.db', "INSERT INTO django_migrations (app, name, "
                               "applied) VALUES ('sessions', '0099_newer', "
                               "'2026-12-01')")
    assert any('sessions.0099_newer' in r and 'does not know' in r
               for r in ahead), ahead


def settings_rows(path) -> dict:
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        return dict(conn.execute(
            'SELECT key, value FROM models_corners_setting'))
    finally:
        conn.close()


def recorded(path) -> set:
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        return {f'{a}.{n}' for a, n in conn.execute(
            'SELECT app, name FROM django_migrations')}
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_cms_backup_from_before_a_release_is_migrated_forward(
        tmp_path, cms_database):  # noqa: F811
    """Issue 20 on the CMS host: a backup made at release 1, restored by
    release 2 (tests.hosts.cms.release2: a data migration through the
    default manager), is migrated forward in the new file and restored;
    the backup is not changed. A backup made at release 2 is refused by
    release 1, naming the migration it does not know."""
    from anthias_rollback.engines.sqlite_file import file_sha256

    data = tmp_path / 'data'
    data.mkdir()
    device = Device(data, cms_database)

    def run(*args, expect=(0,)):
        done = device.run(*args)
        assert done.returncode in expect, (done.stdout
                                           + done.stderr)[-3000:]
        assert 'Traceback' not in done.stderr
        return done

    run('migrate', '--database', 'sqlite', '--noinput')
    run('migrate', '--database', 'postgres', '--noinput')
    run('backup_database')
    old = list(data.rglob('anthias_backup_*.db'))
    assert len(old) == 1
    digest = file_sha256(old[0])
    run('switch_database', '--to', 'postgres', '--force')
    device.release = 2
    run('migrate', '--database', 'postgres', '--noinput')
    run('rollback_migration', '--emergency', '--source', 'backup',
        '--backup-path', str(old[0]), expect=(0, 4))
    assert file_sha256(old[0]) == digest
    assert 'release2.0001_release2_data' in recorded(device.sqlite)
    assert settings_rows(device.sqlite) == {
        'seeded-by-0002': 'first release, upgraded',
        'release-2': 'second release'}
    report = json.loads(max((data / 'reports').glob('rollback_*.json'))
                        .read_text())
    forward = [p for p in report['phases']
               if p['name'] == 'migrate-forward']
    assert forward and ('migrated forward: release2.0001_release2_data'
                        in forward[0]['detail'])

    # A backup made at release 2, restored by release 1: a downgrade.
    run('backup_database')
    new, = set(data.rglob('anthias_backup_*.db')) - set(old)
    assert 'release2.0001_release2_data' in recorded(new)
    run('switch_database', '--to', 'postgres', '--force')
    device.release = 1
    live = raw_tables.sqlite_fingerprint(device.sqlite)
    done = run('rollback_migration', '--emergency', '--source', 'backup',
               '--backup-path', str(new), expect=(1,))
    output = done.stdout + done.stderr
    assert 'release2.0001_release2_data' in output
    assert 'does not know' in output
    assert raw_tables.sqlite_fingerprint(device.sqlite) == live
