"""A blank host project (`django-admin startproject`) adopting the app:
what a new adopter sees, in real child processes."""
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

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


def start_host(tmp_path: Path, adopt: bool) -> Path:
    """`django-admin startproject host`, with the app added (and, if
    *adopt*, DATABASES from build_databases). Returns the project dir."""
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
    settings.write_text(text)
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
