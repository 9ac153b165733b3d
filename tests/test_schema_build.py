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
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connections

from anthias_rollback import schema, schema_build
from anthias_rollback.engines import sqlite_file
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


# --- the schema template cache ----------------------------------------------

def master(path) -> set:
    """The schema as SQLite records it."""
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        return set(conn.execute(
            'SELECT type, name, tbl_name, sql FROM sqlite_master'))
    finally:
        conn.close()


def template_files(data_dir) -> dict:
    folder = data_dir / schema_build.TEMPLATE_DIR
    return {p.name: p for p in folder.iterdir()} if folder.exists() else {}


def test_new_file_after_the_first_is_a_copy_of_the_template(data_dir):
    """The first new file is built by the child and kept as the template;
    the next is a copy of it (no child), with the same schema, the same
    recorded migrations and the same rows migrate makes. A file that
    is not empty still goes through the child."""
    runs = schema_build.CHILD_RUNS
    first = data_dir / 'first.db'
    applied = schema_build.migrate_file(first, timeout=300)
    assert schema_build.CHILD_RUNS == runs + 1
    kept = template_files(data_dir)
    assert sorted(p.suffix for p in kept.values()) == ['.db', '.json']

    second = data_dir / 'second.db'
    second.touch(mode=0o644)        # an empty file is new too
    assert schema_build.migrate_file(second, timeout=300) == applied
    assert schema_build.CHILD_RUNS == runs + 1
    assert master(second) == master(first)
    assert recorded(second) == recorded(first) >= set(applied)
    counts = []
    for path in (first, second):
        conn = sqlite_file.sqlite_open_readonly(path, 5.0)
        counts.append(sqlite_file.sqlite_table_counts(conn))
        conn.close()
    assert counts[0] == counts[1]
    assert counts[1]['auth_permission'] > 0
    assert stat.S_IMODE(second.stat().st_mode) == 0o600
    conn = sqlite3.connect(second)
    assert conn.execute('PRAGMA journal_mode').fetchone()[0] == 'delete'
    conn.close()

    folder = data_dir / schema_build.TEMPLATE_DIR
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in
            template_files(data_dir).values()} == {0o600}
    # Not empty: the child, which finds nothing to do.
    assert schema_build.migrate_file(second, timeout=300) == []
    assert schema_build.CHILD_RUNS == runs + 2
    assert template_files(data_dir).keys() == kept.keys()


def test_the_key_follows_the_options_and_the_code(data_dir):
    assert schema_build.template_key() == schema_build.template_key()
    assert schema_build.template_key() != schema_build.template_key(
        wal=True)


def test_the_key_is_the_same_on_either_profile(tmp_path):
    """wagtail defines its SQLite full-text index model only when
    `default` is SQLite. The child that builds the template always is;
    a key that followed the calling process's models missed the
    template on every rollback started from the postgres profile (a
    full copy then waited 14 s for the migrations). Both profiles, one
    key; the key still sees the profile's model set differ."""
    data = tmp_path / 'data'
    data.mkdir()
    device = Device(data, 'postgres://nobody@127.0.0.1:9/none')
    script = (
        'from django.apps import apps\n'
        'from anthias_rollback import schema_build\n'
        'print(json.dumps({"key": schema_build.template_key(),\n'
        '  "fts": any(m._meta.db_table == "wagtailsearch_indexentry_fts"\n'
        '             for m in apps.get_models())}))\n')
    on_sqlite = in_cms(device, script, ANTHIAS_DB_PROFILE='sqlite')
    on_postgres = in_cms(device, script, ANTHIAS_DB_PROFILE='postgres')
    # The premise: the two processes really have other models.
    assert on_sqlite['fts'] and not on_postgres['fts']
    assert on_sqlite['key'] == on_postgres['key']


@pytest.mark.parametrize('damage', ['database', 'record', 'bytes'])
def test_broken_template_is_ignored_and_rebuilt(data_dir, caplog, damage):
    schema_build.migrate_file(data_dir / 'first.db', timeout=300)
    files = template_files(data_dir)
    db, = (p for p in files.values() if p.suffix == '.db')
    record, = (p for p in files.values() if p.suffix == '.json')
    if damage == 'database':
        # The schema pages overwritten: quick_check fails.
        with open(db, 'r+b') as fh:
            fh.seek(100)
            fh.write(b'\xff' * 8000)
    elif damage == 'record':
        record.write_text('{not json')
    else:
        # A row's bytes changed, the pages still sound: the checksum.
        conn = sqlite3.connect(db)
        conn.execute("UPDATE auth_permission SET name = 'x' WHERE id = 1")
        conn.commit()
        conn.close()
    runs = schema_build.CHILD_RUNS
    new = data_dir / 'new.db'
    with caplog.at_level(logging.WARNING, logger='anthias_rollback.schema'):
        applied = schema_build.migrate_file(new, timeout=300)
    assert schema_build.CHILD_RUNS == runs + 1
    assert 'sessions.0001_initial' in applied
    assert any('ignored and rebuilt' in r.getMessage()
               for r in caplog.records)
    assert sqlite_file.sqlite_quick_check(new) == 'ok'
    conn = sqlite3.connect(new)
    assert conn.execute('SELECT name FROM auth_permission WHERE id = 1'
                        ).fetchone()[0] != 'x'
    conn.close()
    # Rebuilt: the next new file is a sound copy again.
    again = data_dir / 'again.db'
    assert schema_build.migrate_file(again, timeout=300) == applied
    assert schema_build.CHILD_RUNS == runs + 1
    assert master(again) == master(new)


def test_unusable_template_dir_never_fails_the_caller(data_dir, caplog):
    """A file where the folder belongs: migrate_file builds as without a
    cache; ensure_template and the switch say so in one line."""
    from anthias_rollback import switch

    (data_dir / schema_build.TEMPLATE_DIR).write_text('not a folder')
    path = data_dir / 'new.db'
    with caplog.at_level(logging.WARNING, logger='anthias_rollback.schema'):
        assert 'sessions.0001_initial' in schema_build.migrate_file(
            path, timeout=300)
    assert sqlite_file.sqlite_quick_check(path) == 'ok'
    assert any('cannot keep a schema template' in r.getMessage()
               for r in caplog.records)
    with pytest.raises(SchemaMismatchError) as excinfo:
        schema_build.ensure_template(timeout=300)
    assert '\n' not in str(excinfo.value)
    warning, = switch.prepare_schema_template()
    assert warning.startswith('no schema template prepared (')
    assert 'Traceback' not in warning


def test_ensure_template_builds_once(data_dir):
    from anthias_rollback import switch

    runs = schema_build.CHILD_RUNS
    assert switch.prepare_schema_template() == []
    assert schema_build.CHILD_RUNS == runs + 1
    made = schema_build.ensure_template(timeout=300)
    assert schema_build.CHILD_RUNS == runs + 1
    assert made.parent == data_dir / schema_build.TEMPLATE_DIR
    # Only the template and its record: the scratch file is gone.
    assert len(template_files(data_dir)) == 2
    new = data_dir / 'new.db'
    schema_build.migrate_file(new, timeout=300)
    assert schema_build.CHILD_RUNS == runs + 1
    assert master(new) == master(made)


EDITED_HOST = '''
import os, sys, json, sqlite3
import django
django.setup()
from pathlib import Path
from anthias_rollback import schema_build
migration = Path(sys.argv[1])
data = Path(os.environ['ANTHIAS_DATA_DIR'])
original = migration.read_text()
out = {}

def build(name):
    path = data / f'{name}.db'
    before = schema_build.CHILD_RUNS
    schema_build.migrate_file(path, timeout=300)
    conn = sqlite3.connect(path)
    sql, = conn.execute("SELECT sql FROM sqlite_master "
                        "WHERE name = 'django_session'").fetchone()
    conn.close()
    folder = data / 'schema_templates'
    out[name] = {'child': schema_build.CHILD_RUNS - before,
                 'wide_key': 'varchar(41)' in sql,
                 'records': len(list(folder.glob('*.json')))}

build('original')
build('original-again')
migration.write_text(original.replace('max_length=40', 'max_length=41'))
build('edited')
migration.write_text(original)
build('original-after-edit')
migration.write_text(original + '# a comment changes the bytes\\n')
build('commented')
print(json.dumps(out))
'''


@pytest.mark.slow
def test_an_edited_migration_changes_the_key(tmp_path):
    """The reference project with sessions' migrations from a package of
    this test (MIGRATION_MODULES): editing its 0001 makes the next new
    file go through the child (a template of the old code would have the
    old column); going back to the old bytes finds the old template; only
    the newest two are kept."""
    import shutil

    import django.contrib.sessions.migrations as shipped

    package = tmp_path / 'edited_sessions_migrations'
    shutil.copytree(Path(shipped.__file__).parent, package,
                    ignore=shutil.ignore_patterns('__pycache__'))
    (tmp_path / 'edited_settings.py').write_text(
        'from settings_profiles.settings import *  # noqa\n'
        "MIGRATION_MODULES = {'sessions': 'edited_sessions_migrations'}\n")
    data = tmp_path / 'data'
    data.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('ANTHIAS_', 'DJANGO_'))}
    env.update({'DJANGO_SETTINGS_MODULE': 'edited_settings',
                'ANTHIAS_DATA_DIR': str(data),
                'PYTHONPATH': os.pathsep.join([str(tmp_path), str(ROOT)]),
                # Edits within one second keep a stale .pyc otherwise.
                'PYTHONDONTWRITEBYTECODE': '1'})
    done = subprocess.run(
        [sys.executable, '-c', EDITED_HOST,
         str(package / '0001_initial.py')],
        env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        'original': {'child': 1, 'wide_key': False, 'records': 1},
        'original-again': {'child': 0, 'wide_key': False, 'records': 1},
        'edited': {'child': 1, 'wide_key': True, 'records': 2},
        'original-after-edit': {'child': 0, 'wide_key': False,
                                'records': 2},
        'commented': {'child': 1, 'wide_key': False, 'records': 2},
    }


def test_read_only_templates_are_used_never_written(data_dir, caplog):
    """The drill's mode: no template is made, refreshed or dropped in
    the data dir, but a sound one is copied."""
    runs = schema_build.CHILD_RUNS
    with schema_build.templates_read_only():
        schema_build.migrate_file(data_dir / 'a.db', timeout=300)
    assert schema_build.CHILD_RUNS == runs + 1
    assert not (data_dir / schema_build.TEMPLATE_DIR).exists()

    made = schema_build.ensure_template(timeout=300)
    record, = (data_dir / schema_build.TEMPLATE_DIR).glob('*.json')
    os.utime(record, (1_000_000_000, 1_000_000_000))
    with schema_build.templates_read_only():
        schema_build.migrate_file(data_dir / 'b.db', timeout=300)
    assert schema_build.CHILD_RUNS == runs + 2
    assert record.stat().st_mtime == 1_000_000_000
    assert master(data_dir / 'b.db') == master(made)

    record.write_text('{not json')
    with schema_build.templates_read_only(), caplog.at_level(
            logging.WARNING, logger='anthias_rollback.schema'):
        schema_build.migrate_file(data_dir / 'c.db', timeout=300)
    assert schema_build.CHILD_RUNS == runs + 3
    assert record.read_text() == '{not json'
    assert any('ignored' in r.getMessage() for r in caplog.records)


def test_a_file_that_cannot_be_written_keeps_the_template(data_dir):
    """The caller's folder is missing: the child's one-line error, as
    without a cache, and the template stays."""
    made = schema_build.ensure_template(timeout=300)
    before = template_files(data_dir).keys()
    missing = data_dir / 'no-such-folder' / 'new.db'
    with pytest.raises(SchemaMismatchError) as excinfo:
        schema_build.migrate_file(missing, timeout=300)
    assert '\n' not in str(excinfo.value)
    assert template_files(data_dir).keys() == before
    assert made.exists()
