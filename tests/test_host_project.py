"""A blank host project (`django-admin startproject`) adopting the app:
what a new adopter sees, in real child processes."""
import glob
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.parse
import uuid
from pathlib import Path

import psycopg2
import pytest

from anthias_rollback import profiles
from tests.conftest import ROOT
from tests.helpers import pgserver

ADOPTION = '''
from anthias_rollback.profiles import build_databases

DATA_DIR = os.environ['ANTHIAS_DATA_DIR']
DATABASES = build_databases(data_dir=DATA_DIR)
DATABASE_ROUTERS = ['anthias_rollback.routers.BothProfilesRouter']
'''

HOST_TESTS = '''
import pytest
from django.contrib.auth.models import User
from django.db import connections


@pytest.mark.django_db(transaction=True)
def test_writes_and_flushes_default():
    """What Anthias's own tests do: declare only `default`."""
    assert connections['default'].settings_dict['NAME'] != LIVE
    User.objects.create(username='from-a-host-test')
    assert User.objects.count() == 1   # not the live file's sentinel


@pytest.mark.django_db(databases=['default', 'sqlite', 'postgres'],
                       transaction=True)
def test_every_alias_has_a_test_database():
    for alias in ('default', 'sqlite'):
        assert connections[alias].settings_dict['NAME'] != LIVE
    assert connections['postgres'].settings_dict['NAME'].startswith(
        'test_')
    User.objects.using('postgres').create(username='pg-host-test')
    User.objects.using('sqlite').create(username='sqlite-host-test')
    assert User.objects.using('sqlite').count() == 1
'''


def clean_env(**extra: str) -> dict:
    """The run's environment without its test settings module (pytest-
    django's env var would override the host's pytest.ini)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('DJANGO_SETTINGS_MODULE', 'ANTHIAS_DB_PROFILE',
                        'ANTHIAS_SQLITE_PATH', 'ANTHIAS_POSTGRES_URL',
                        'ANTHIAS_DATA_DIR')}
    env['PYTHONPATH'] = str(ROOT)
    env.update(extra)
    return env


def start_host(tmp_path: Path, adopt: bool, extra: str = '') -> Path:
    """`django-admin startproject host`, with the app added (and, if
    *adopt*, DATABASES from build_databases), then *extra* appended to
    its settings. Returns the project dir."""
    project = tmp_path / 'hostproject'
    project.mkdir()
    subprocess.run([sys.executable, '-m', 'django', 'startproject', 'host',
                    str(project)], check=True, env=clean_env(),
                   capture_output=True)
    settings = project / 'host' / 'settings.py'
    text = settings.read_text()
    text = text.replace("INSTALLED_APPS = [",
                        "INSTALLED_APPS = [\n    'anthias_rollback',", 1)
    text = 'import os\n' + text
    if adopt:
        text += ADOPTION
    settings.write_text(text + extra)
    return project


def manage(project: Path, env: dict, *args: str
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, 'manage.py', *args], cwd=project,
                          env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_app_without_build_databases_fails_check(tmp_path):
    """Every command died with "The connection 'sqlite' doesn't exist"
    while `check` said no issues. Now `check` says what to add."""
    project = start_host(tmp_path, adopt=False)
    env = clean_env()
    done = manage(project, env, 'check')
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Traceback' not in done.stderr
    assert 'anthias_rollback.E002' in done.stderr
    assert 'DATABASES = build_databases(data_dir=' in done.stderr
    assert 'from anthias_rollback.profiles import build_databases' in \
        done.stderr
    # A command that needs the alias: one line naming the fix.
    done = manage(project, env, 'switch_database', '--show')
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'build_databases' in lines[0]


@pytest.mark.slow
def test_host_project_tests_never_touch_the_live_file(tmp_path):
    """pytest-django gave `default` a TEST MIRROR of `sqlite` and made no
    test database when a host test declared only `default`: both
    aliases resolved to the real anthias.db, and the flush after a
    transaction=True test emptied it. The live file must not change."""
    project = start_host(tmp_path, adopt=True)
    data = tmp_path / 'data'
    data.mkdir()
    live = data / 'anthias.db'
    env = clean_env(ANTHIAS_DATA_DIR=str(data),
                    ANTHIAS_POSTGRES_URL=os.environ[
                        'ANTHIAS_TEST_POSTGRES_URL'])
    done = manage(project, env, 'migrate', '--database', 'sqlite',
                  '--verbosity', '0')
    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(live)
    with conn:
        conn.execute("INSERT INTO auth_user (username, password, "
                     "is_superuser, is_staff, is_active, first_name, "
                     "last_name, email, date_joined) VALUES ('sentinel', "
                     "'', 0, 0, 1, '', '', '', '2024-01-01')")
    conn.close()
    before = live.read_bytes()
    assert not Path(f'{live}-wal').exists()
    (project / 'pytest.ini').write_text(textwrap.dedent('''\
        [pytest]
        DJANGO_SETTINGS_MODULE = host.settings
        '''))
    (project / 'test_host.py').write_text(
        f'LIVE = {str(live)!r}\n' + HOST_TESTS)
    # First alone, as Anthias's suite is (every test declares only
    # `default`: pytest-django sets up only the declared aliases), then
    # with the other aliases declared too.
    alone = 'test_host.py::test_writes_and_flushes_default'
    for selection, passed in ((alone, '1 passed'),
                              ('test_host.py', '2 passed')):
        done = subprocess.run(
            [sys.executable, '-m', 'pytest', '-q', '-p',
             'no:cacheprovider', selection], cwd=project, env=env,
            capture_output=True, text=True, timeout=300, check=False)
        assert live.read_bytes() == before, done.stdout
        assert done.returncode == 0, done.stdout + done.stderr
        assert passed in done.stdout
    assert live.read_bytes() == before
    assert not Path(f'{live}-wal').exists()   # nothing opened it to write
    conn = sqlite3.connect(f'file:{live}?mode=ro', uri=True)
    try:
        assert conn.execute('SELECT username FROM auth_user').fetchall() \
            == [('sentinel',)]
    finally:
        conn.close()


# -- Anthias's start sequence (bin/start_server.sh) with django-dbbackup ----

# Anthias's line, as it runs it against `default` when anthias.db exists
# (there `python -m anthias_server.manage`; here the host's manage.py).
START_LINE = ('{m} dbbackup --noinput --clean && '
              '{m} migrate --fake-initial --noinput || '
              '{m} dbrestore --noinput')
# The README and the docs site together: the adoption blocks are on
# docs/adopting.md, the units on docs/operations.md, the settings on
# docs/configuration.md.
README = '\n'.join(path.read_text() for path in [
    ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))])

# Anthias's dbbackup settings (django_project/settings.py), plus an app
# with a migration left for the start sequence to apply.
ANTHIAS_DBBACKUP = '''
INSTALLED_APPS += ['dbbackup', 'signage']
STORAGES = {
    'default': {'BACKEND': 'django.core.files.storage.FileSystemStorage'},
    'staticfiles': {
        'BACKEND': 'django.contrib.staticfiles.storage.StaticFilesStorage'},
    'dbbackup': {'BACKEND': 'django.core.files.storage.FileSystemStorage',
                 'OPTIONS': {'location': os.path.join(DATA_DIR, 'backups')}},
}
DBBACKUP_HOSTNAME = 'anthias'
'''
SIGNAGE = {
    '__init__.py': '',
    'models.py': '''
from django.db import models


class Note(models.Model):
    text = models.CharField(max_length=50)
    shown = models.BooleanField(default=False)
''',
    'migrations/__init__.py': '',
    'migrations/0001_initial.py': '''
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [migrations.CreateModel('Note', [
        ('id', models.AutoField(primary_key=True, serialize=False)),
        ('text', models.CharField(max_length=50))])]
''',
    'migrations/0002_note_shown.py': '''
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [('signage', '0001_initial')]
    operations = [migrations.AddField(
        'note', 'shown', models.BooleanField(default=False))]
''',
}
INSPECT = '''
import json
from django.db import connections
from django.db.migrations.recorder import MigrationRecorder
c = connections['default']
with c.cursor() as cursor:
    cursor.execute('SELECT text FROM signage_note ORDER BY id')
    notes = [row[0] for row in cursor.fetchall()]
    columns = [col.name for col in
               c.introspection.get_table_description(cursor, 'signage_note')]
applied = sorted(n for a, n in MigrationRecorder(c).applied_migrations()
                 if a == 'signage')
print(json.dumps({'vendor': c.vendor, 'notes': notes, 'columns': columns,
                  'applied': applied}))
'''


def readme_python_block(marker: str) -> str:
    """The fenced python block right after `<!-- adoption: MARKER -->`."""
    found = re.search(rf'<!-- adoption: {re.escape(marker)} -->\s*'
                      r'```python\n(.*?)```', README, re.DOTALL)
    assert found, f'README has no block marked adoption: {marker}'
    return found.group(1)


def signage_host(tmp_path: Path, dbbackup: str | None = None) -> Path:
    """A host with Anthias's dbbackup settings and the README's dbbackup
    block (or *dbbackup* instead of it)."""
    if dbbackup is None:
        dbbackup = readme_python_block('dbbackup')
    project = start_host(tmp_path, adopt=True,
                         extra=ANTHIAS_DBBACKUP + '\n' + dbbackup)
    for name, text in SIGNAGE.items():
        path = project / 'signage' / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip('\n'))
    return project


def checked(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def prepare(project: Path, env: dict) -> dict:
    """`default` migrated up to signage 0001 (0002 left for the start
    sequence) and holding two notes. Returns observe()."""
    checked(manage(project, env, 'migrate', '--noinput', '-v', '0'))
    checked(manage(project, env, 'migrate', 'signage', '0001', '-v', '0'))
    checked(manage(project, env, 'shell', '--no-imports', '-c',
                   'from django.db import connections\n'
                   'with connections["default"].cursor() as c:\n'
                   '    c.execute("INSERT INTO signage_note (text) '
                   'VALUES (\'kept-1\'), (\'kept-2\')")'))
    return observe(project, env)


def observe(project: Path, env: dict) -> dict:
    return json.loads(checked(manage(project, env, 'shell', '--no-imports',
                                     '-c', INSPECT)).strip().splitlines()[-1])


def run_line(project: Path, env: dict, line: str = START_LINE
             ) -> tuple[subprocess.CompletedProcess, float]:
    m = f'{shlex.quote(sys.executable)} manage.py'
    started = time.monotonic()
    done = subprocess.run(['bash', '-c', line.replace('{m}', m)],
                          cwd=project,
                          env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    return done, time.monotonic() - started


def stored(data: Path) -> list[str]:
    folder = data / 'backups'
    return sorted(p.name for p in folder.iterdir()) if folder.exists() \
        else []


def server_major() -> int:
    out = subprocess.run([str(pgserver.embedded_bin_dir() / 'pg_dump'),
                          '--version'], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(r'(\d+)(?:\.\d+)?', out.split(')')[-1]).group(1))


def pg_dump_major(path: str) -> int | None:
    try:
        out = subprocess.run([path, '--version'], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(re.search(r'\) (\d+)', out).group(1))


@pytest.fixture
def host_database():
    """A database of its own on the run's PostgreSQL server: its URL."""
    base = os.environ['ANTHIAS_TEST_POSTGRES_URL']
    name = f'host_{uuid.uuid4().hex[:12]}'
    admin = psycopg2.connect(base)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE {name}')
        yield urllib.parse.urlsplit(base)._replace(
            path=f'/{name}').geturl()
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
    finally:
        admin.close()


def missing_database_url() -> str:
    """A server that answers, a database that is not created yet."""
    return urllib.parse.urlsplit(
        os.environ['ANTHIAS_TEST_POSTGRES_URL'])._replace(
        path='/not_created_yet').geturl()


def device_env(data: Path, postgres_url: str, pg_dump: Path | str) -> dict:
    return clean_env(ANTHIAS_DATA_DIR=str(data),
                     ANTHIAS_POSTGRES_URL=postgres_url,
                     ANTHIAS_PG_DUMP=str(pg_dump))


@pytest.mark.slow
@pytest.mark.parametrize('profile', ['sqlite', 'postgres'])
def test_start_line_backs_up_migrates_and_keeps_the_data(
        tmp_path, host_database, profile):
    """Anthias's start line, unchanged, with the README's dbbackup block:
    exit 0, one backup of `default` (SQLite file, or pg_dump custom
    format with the server's own pg_dump given as ANTHIAS_PG_DUMP),
    signage 0002 applied, the notes unchanged; then the backup restores."""
    project = signage_host(tmp_path)
    data = tmp_path / 'data'
    data.mkdir()
    url = host_database if profile == 'postgres' else missing_database_url()
    env = device_env(data, url, pgserver.embedded_bin_dir() / 'pg_dump')
    if profile == 'postgres':
        profiles.write_active_profile(data, 'postgres')
    before = prepare(project, env)
    assert before['vendor'] == ('postgresql' if profile == 'postgres'
                                else 'sqlite')
    assert before['applied'] == ['0001_initial']

    done, seconds = run_line(project, env)
    assert done.returncode == 0, done.stdout + done.stderr
    after = observe(project, env)
    assert after['applied'] == ['0001_initial', '0002_note_shown']
    assert 'shown' in after['columns']
    assert after['notes'] == before['notes'] == ['kept-1', 'kept-2']
    extension = 'psql.bin' if profile == 'postgres' else 'sqlite3'
    backups = stored(data)
    assert len(backups) == 2, backups   # the dump and its .metadata
    dump = backups[0]
    assert re.fullmatch(rf'default-anthias-[\d-]+\.{re.escape(extension)}',
                        dump), dump
    assert backups[1] == f'{dump}.metadata'
    assert (data / 'backups' / dump).stat().st_size > 0
    sys.stderr.write(f'\n[start line] {profile}: {seconds:.1f}s\n')

    # The backup restores: a later change is undone, the pre-migrate
    # state (0001, no column) and the notes come back.
    checked(manage(project, env, 'shell', '--no-imports', '-c',
                   'from django.db import connections\n'
                   'with connections["default"].cursor() as c:\n'
                   '    c.execute("DELETE FROM signage_note")'))
    changed = observe(project, env)
    if profile == 'postgres':
        # dbrestore builds the connector named in the .metadata file
        # without DBBACKUP_CONNECTORS' commands: PATH's pg_restore runs.
        # A too-old one fails before it changes anything.
        on_path = pg_dump_major(shutil.which('pg_restore') or 'pg_restore')
        if on_path is not None and on_path < server_major():
            done = manage(project, env, 'dbrestore', '--database',
                          'default', '--noinput')
            assert done.returncode == 1
            assert 'unsupported version' in done.stderr, done.stderr
            assert observe(project, env) == changed
        env['PATH'] = f'{pgserver.embedded_bin_dir()}:{env["PATH"]}'
    checked(manage(project, env, 'dbrestore', '--database', 'default',
                   '--noinput'))
    restored = observe(project, env)
    assert restored['notes'] == ['kept-1', 'kept-2']
    assert restored['applied'] == ['0001_initial']
    assert 'shown' not in restored['columns']


def older_pg_dump() -> str:
    """A pg_dump older than the server, as on a device whose image has
    the distribution's client (Debian 12: 15) and a newer server."""
    major = server_major()
    for path in ['/usr/bin/pg_dump',
                 *sorted(glob.glob('/usr/lib/postgresql/*/bin/pg_dump'))]:
        found = pg_dump_major(path)
        if found is not None and found < major:
            return path
    # Never a silent skip: these machines carry Debian's client tools
    # (postgresql-client, 15), older than the embedded server.
    pytest.fail(f'no pg_dump older than the server ({major}) here; '
                'install postgresql-client')


@pytest.mark.slow
def test_start_line_with_a_too_old_pg_dump_fails_loudly(tmp_path,
                                                        host_database):
    """postgres profile, ANTHIAS_PG_DUMP older than the server: the line
    fails, naming the mismatch; no backup file, no migration, nothing
    restored, the data as it was. Likewise the README's line, which
    then passes with the server's own pg_dump."""
    old = older_pg_dump()
    project = signage_host(tmp_path)
    data = tmp_path / 'data'
    data.mkdir()
    env = device_env(data, host_database, old)
    profiles.write_active_profile(data, 'postgres')
    before = prepare(project, env)
    runs = {}
    for name, line in (('anthias', START_LINE),
                       ('readme', readme_start_line())):
        done, seconds = run_line(project, env, line)
        runs[name] = done
        assert done.returncode == 1, done.stdout + done.stderr
        assert 'aborting because of server version mismatch' in done.stderr
        assert f' {old} --dbname=postgresql://' in done.stderr
        assert stored(data) == []
        assert observe(project, env) == before
        sys.stderr.write(f'\n[start line] {name}, pg_dump {old}: '
                         f'exit 1 in {seconds:.1f}s\n')
    # Anthias's `|| dbrestore` ran and restored nothing (three aliases);
    # the README's line does not run it after a failed backup.
    assert 'you must specify the --database option' in \
        runs['anthias'].stderr
    assert 'dbrestore' not in runs['readme'].stderr
    assert 'Restoring' not in runs['readme'].stderr
    # With the server's own pg_dump the README's line goes through.
    env['ANTHIAS_PG_DUMP'] = str(pgserver.embedded_bin_dir() / 'pg_dump')
    done, _ = run_line(project, env, readme_start_line())
    assert done.returncode == 0, done.stdout + done.stderr
    after = observe(project, env)
    assert after['applied'] == ['0001_initial', '0002_note_shown']
    assert after['notes'] == before['notes']
    assert [n.rsplit('.', 1)[-1] for n in stored(data)] == ['bin',
                                                           'metadata']


def readme_start_line() -> str:
    """The README's recommended start line, with {m} for the manage
    command."""
    found = re.search(r'<!-- adoption: start_server.sh -->\s*```sh\n(.*?)```',
                      README, re.DOTALL)
    assert found, 'README has no block marked adoption: start_server.sh'
    first, body = found.group(1).split('\n', 1)
    assert first.startswith('manage=')
    return body.replace('\\\n', ' ').replace('$manage', '{m}').strip()


@pytest.mark.slow
def test_start_line_without_dbbackup_databases_skips_migrate(tmp_path):
    """Without DBBACKUP_DATABASES dbbackup backs up every alias: on the
    sqlite profile it also runs pg_dump on `postgres` (here its database
    is not created yet), fails, and migrate never runs."""
    project = signage_host(tmp_path, dbbackup=(
        'from anthias_rollback.profiles import dbbackup_connectors\n'
        'DBBACKUP_CONNECTORS = dbbackup_connectors(DATABASES)\n'))
    data = tmp_path / 'data'
    data.mkdir()
    env = device_env(data, missing_database_url(),
                     pgserver.embedded_bin_dir() / 'pg_dump')
    before = prepare(project, env)
    done, _ = run_line(project, env)
    assert done.returncode == 1, done.stdout
    assert 'database "not_created_yet" does not exist' in done.stderr, \
        done.stderr
    assert stored(data)[0].startswith('sqlite-anthias-')   # then postgres
    after = observe(project, env)
    assert after == before   # 0002 not applied
    assert 'you must specify the --database option' in done.stderr


@pytest.mark.slow
def test_start_line_on_a_restored_copy_of_the_state_file(tmp_path):
    """Another device's state file restored here (an Anthias backup):
    E001 stops dbbackup (so migrate is skipped) and dbrestore, each
    naming the copy; the data is untouched."""
    project = signage_host(tmp_path)
    data = tmp_path / 'data'
    data.mkdir()
    env = device_env(data, missing_database_url(),
                     pgserver.embedded_bin_dir() / 'pg_dump')
    before = prepare(project, env)
    other = tmp_path / 'other-device'
    state = profiles.write_active_profile(other, 'postgres')
    profiles.state_file_path(data).write_bytes(state.read_bytes())
    live = (data / 'anthias.db').read_bytes()
    done, _ = run_line(project, env)
    assert done.returncode == 1
    assert done.stderr.count('anthias_rollback.E001') == 2, done.stderr
    assert 'is a copy' in done.stderr
    assert stored(data) == []
    assert (data / 'anthias.db').read_bytes() == live
    profiles.state_file_path(data).unlink()
    assert observe(project, env) == before
