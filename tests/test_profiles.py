import json
import os
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from anthias_rollback import profiles
from anthias_rollback.exceptions import ConfigError, StateFileError
from tests.conftest import ROOT


def test_sqlite_options_pinned():
    """Anthias's SQLite options, exactly (its test_django_db_settings)."""
    options = connections.settings['sqlite']['OPTIONS']
    assert options == {
        'timeout': 20,
        'init_command': 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;',
        'transaction_mode': 'IMMEDIATE',
    }


@pytest.mark.django_db(databases=['sqlite'])
def test_sqlite_alias_runs_in_wal_mode():
    with connections['sqlite'].cursor() as cursor:
        cursor.execute('PRAGMA journal_mode')
        assert cursor.fetchone()[0] == 'wal'


@pytest.mark.django_db(databases=['default', 'sqlite'], transaction=True)
def test_default_mirrors_active_alias_in_tests():
    """default is a TEST MIRROR, so no third test database exists.

    Tests that use `default` run with transaction=True: TestCase opens an
    atomic block on the mirror too, and two BEGIN IMMEDIATE on one SQLite
    file would lock each other."""
    assert connections.settings['default']['TEST']['MIRROR'] == 'sqlite'
    assert (connections['default'].settings_dict['NAME']
            == connections['sqlite'].settings_dict['NAME'])


def test_build_databases_three_aliases(tmp_path):
    dbs = profiles.build_databases(data_dir=tmp_path, env={
        'POSTGRES_HOST': 'db.local', 'POSTGRES_PORT': '6543',
        'POSTGRES_DB': 'signage', 'POSTGRES_USER': 'pi',
        'POSTGRES_PASSWORD': 's3cret'})
    assert set(dbs) == {'sqlite', 'postgres', 'default'}
    assert dbs['sqlite']['NAME'] == str(tmp_path / 'anthias.db')
    assert dbs['postgres']['HOST'] == 'db.local'
    assert dbs['postgres']['PORT'] == 6543
    assert dbs['postgres']['OPTIONS']['connect_timeout'] == 5
    assert dbs['default']['ENGINE'] == dbs['sqlite']['ENGINE']


def test_postgres_url_parsed_including_socket(tmp_path):
    dbs = profiles.build_databases(data_dir=tmp_path, env={
        'ANTHIAS_POSTGRES_URL':
            'postgresql://u:p@/anthias?host=/run/pg&connect_timeout=3'})
    assert dbs['postgres']['HOST'] == '/run/pg'
    assert dbs['postgres']['NAME'] == 'anthias'
    assert dbs['postgres']['OPTIONS'] == {'connect_timeout': 3}


@pytest.mark.parametrize('url,reason', [
    ('postgres://u:hunter2@h:notaport/db', 'port is not a number'),
    ('mysql://u:hunter2@h/db', 'scheme must be postgres'),
    ('postgres://u:hunter2@h:5432/', 'no database name'),
])
def test_malformed_url_names_variable_not_secret(tmp_path, url, reason):
    dbs = profiles.build_databases(data_dir=tmp_path,
                                   env={'ANTHIAS_POSTGRES_URL': url})
    problem = dbs['postgres'][profiles.PROBLEM_KEY]
    assert problem.startswith('ANTHIAS_POSTGRES_URL is malformed')
    assert reason in problem
    assert 'hunter2' not in problem
    # The SQLite side still works: a bad URL never stops a SQLite device.
    assert dbs['default']['ENGINE'].endswith('sqlite3')


def test_active_profile_precedence(tmp_path):
    assert profiles.resolve_active_profile(tmp_path, {}).source == 'default'
    profiles.write_active_profile(tmp_path, 'postgres')
    active = profiles.resolve_active_profile(tmp_path, {})
    assert (active.name, active.source) == ('postgres', 'state file')
    active = profiles.resolve_active_profile(
        tmp_path, {'ANTHIAS_DB_PROFILE': 'sqlite'})
    assert (active.name, active.source) == ('sqlite', 'env')
    dbs = profiles.build_databases(data_dir=tmp_path, env={})
    assert dbs['default']['ENGINE'].endswith('postgresql')


def test_bad_env_profile_is_one_clear_error(tmp_path):
    with pytest.raises(ImproperlyConfigured,
                       match="ANTHIAS_DB_PROFILE='mysql' is not a profile"):
        profiles.build_databases(data_dir=tmp_path,
                                 env={'ANTHIAS_DB_PROFILE': 'mysql'})


def test_corrupt_state_file_is_reported(tmp_path):
    profiles.state_file_path(tmp_path).write_text('{"profile": ')
    with pytest.raises(StateFileError, match='is not valid'):
        profiles.resolve_active_profile(tmp_path, {})


def test_write_unknown_profile_refused(tmp_path):
    with pytest.raises(ConfigError):
        profiles.write_active_profile(tmp_path, 'oracle')
    assert not profiles.state_file_path(tmp_path).exists()


def test_state_file_never_torn_when_killed_before_rename(tmp_path):
    """SIGKILL between the temp write and the rename: old content stays,
    and no temp file is taken for the state file."""
    profiles.write_active_profile(tmp_path, 'sqlite')
    before = profiles.state_file_path(tmp_path).read_text()
    code = ('from anthias_rollback import profiles; '
            f'profiles.write_active_profile({str(tmp_path)!r}, "postgres")')
    env = dict(os.environ, ANTHIAS_ROLLBACK_KILL_AT=
               'atomic-write:before-rename', PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, '-c', code], env=env,
                          check=False)
    assert done.returncode == -9
    assert profiles.state_file_path(tmp_path).read_text() == before
    assert profiles.resolve_active_profile(tmp_path, {}).name == 'sqlite'
    # Without the fault the same write lands.
    env.pop('ANTHIAS_ROLLBACK_KILL_AT')
    subprocess.run([sys.executable, '-c', code], env=env, check=True)
    state = json.loads(profiles.state_file_path(tmp_path).read_text())
    assert state['profile'] == 'postgres'


@pytest.mark.django_db(databases=[], transaction=True)
def test_sqlite_file_alias_is_temporary(tmp_path):
    from django.core.management import call_command

    path = tmp_path / 'scratch.db'
    with profiles.sqlite_file_alias(path) as alias:
        call_command('migrate', database=alias, verbosity=0)
        with connections[alias].cursor() as cursor:
            cursor.execute('SELECT COUNT(*) FROM assets')
            assert cursor.fetchone() == (0,)
            cursor.execute('PRAGMA journal_mode')
            assert cursor.fetchone()[0] == 'delete'
    assert alias not in connections.settings
    assert not hasattr(connections._connections, alias)
    assert path.exists()
