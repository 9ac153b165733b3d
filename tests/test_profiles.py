import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
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
def test_default_shares_active_alias_test_database():
    """default is no TEST MIRROR (a host test declaring only `default`
    then ran on the live file): it has the active alias's TEST NAME, so
    Django creates one test database for both, and no third one.

    Tests that use `default` run with transaction=True: TestCase opens an
    atomic block on the other alias too, and two BEGIN IMMEDIATE on one
    SQLite file would lock each other."""
    default = connections.settings['default']['TEST']
    assert not default['MIRROR']
    assert default['NAME'] == connections.settings['sqlite']['TEST']['NAME']
    assert (connections['default'].settings_dict['NAME']
            == connections['sqlite'].settings_dict['NAME']
            == default['NAME'])


def test_every_alias_has_its_own_test_name(tmp_path):
    live = tmp_path / 'live' / 'anthias.db'
    dbs = profiles.build_databases(data_dir=tmp_path, env={
        'ANTHIAS_SQLITE_PATH': str(live), 'POSTGRES_DB': 'signage'})
    assert dbs['sqlite']['TEST']['NAME'] == str(live.with_name(
        'test_anthias.db'))
    assert dbs['postgres']['TEST']['NAME'] == 'test_signage'
    for alias in dbs:
        assert 'MIRROR' not in dbs[alias]['TEST']
        assert dbs[alias]['TEST']['NAME'] != dbs[alias]['NAME']
    assert dbs['default']['TEST'] is dbs['sqlite']['TEST']


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


def test_bad_env_profile_falls_back_to_sqlite_and_is_named(tmp_path):
    """It raised at settings import, crashing every command even on a
    SQLite device; resolving the profile still refuses, naming it."""
    dbs = profiles.build_databases(data_dir=tmp_path,
                                   env={'ANTHIAS_DB_PROFILE': 'mysql'})
    assert dbs['default']['ENGINE'].endswith('sqlite3')
    assert ("ANTHIAS_DB_PROFILE='mysql' is not a profile"
            in dbs['default'][profiles.PROFILE_PROBLEM_KEY])
    with pytest.raises(ConfigError, match='ANTHIAS_DB_PROFILE'):
        profiles.resolve_active_profile(tmp_path,
                                        {'ANTHIAS_DB_PROFILE': 'mysql'})


@pytest.mark.parametrize('content', [
    b'\x00\xff\xfe binary', b'["postgres"]', b'{"profile": "oracle"}'],
    ids=['binary', 'json-list', 'unknown-profile'])
def test_bad_state_file_falls_back_to_sqlite_and_is_named(tmp_path,
                                                          content):
    path = profiles.state_file_path(tmp_path)
    path.write_bytes(content)
    dbs = profiles.build_databases(data_dir=tmp_path, env={})
    assert dbs['default']['ENGINE'].endswith('sqlite3')
    assert str(path) in dbs['default'][profiles.PROFILE_PROBLEM_KEY]
    with pytest.raises(StateFileError, match='is not valid'):
        profiles.resolve_active_profile(tmp_path, {})
    assert path.read_bytes() == content
    good = profiles.build_databases(data_dir=tmp_path / 'other', env={})
    assert profiles.PROFILE_PROBLEM_KEY not in good['default']


def test_corrupt_state_file_is_reported(tmp_path):
    profiles.state_file_path(tmp_path).write_text('{"profile": ')
    with pytest.raises(StateFileError, match='is not valid'):
        profiles.resolve_active_profile(tmp_path, {})


def test_state_file_is_0600_and_read_by_its_owner(tmp_path):
    """0600 like every file the tool creates (it was 0644). A process
    of the same user reads it; another user's cannot."""
    path = profiles.write_active_profile(tmp_path, 'postgres')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if os.geteuid() != 0:
        assert profiles.resolve_active_profile(tmp_path, {}).name == \
            'postgres'
        return
    # Root reads anything: hand a data dir to two unprivileged users in
    # forked children (the modules are loaded already). Not under
    # tmp_path: pytest's base dir is 0700, closed to them.
    shared = Path(tempfile.mkdtemp(prefix='anthias-owner-'))
    try:
        _check_owner_only(shared)
    finally:
        shutil.rmtree(shared)


def _check_owner_only(data_dir):
    os.chown(data_dir, 65534, 65534)
    os.chmod(data_dir, 0o755)
    path = profiles.state_file_path(data_dir)

    def as_user(uid, action):
        pid = os.fork()
        if pid == 0:   # pragma: no cover (child)
            try:
                os.setgid(uid)
                os.setuid(uid)
                action()
                os._exit(0)
            except StateFileError:
                os._exit(3)
            except BaseException:  # noqa: BLE001 a forked child must _exit
                os._exit(4)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    def owner_writes_and_reads():
        profiles.write_active_profile(data_dir, 'sqlite')
        assert profiles.resolve_active_profile(data_dir, {}).name == \
            'sqlite'

    assert as_user(65534, owner_writes_and_reads) == 0
    assert path.stat().st_uid == 65534
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert as_user(1, lambda: profiles.resolve_active_profile(
        data_dir, {})) == 3   # another user: "cannot read", no traceback


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


def test_state_file_records_its_own_inode(tmp_path):
    path = profiles.write_active_profile(tmp_path, 'postgres')
    state = json.loads(path.read_text())
    assert state[profiles.INODE_KEY] == path.stat().st_ino
    assert profiles.resolve_active_profile(tmp_path, {}).name == 'postgres'
    # A second write is a new file (rename): it names its own inode too.
    profiles.write_active_profile(tmp_path, 'sqlite')
    state = json.loads(path.read_text())
    assert state[profiles.INODE_KEY] == path.stat().st_ino
    assert profiles.resolve_active_profile(tmp_path, {}).name == 'sqlite'


def test_copied_state_file_is_refused_in_one_line(tmp_path):
    """A copy (another device's data dir restored here) said postgres and
    was obeyed. Now `default` stays sqlite and the problem says why and
    what to do; accept_copy still reads it (for a forced rewrite)."""
    first, second = tmp_path / 'a', tmp_path / 'b'
    second.mkdir()
    source = profiles.write_active_profile(first, 'postgres')
    copy = profiles.state_file_path(second)
    shutil.copy2(source, copy)
    dbs = profiles.build_databases(data_dir=second, env={})
    assert dbs['default']['ENGINE'].endswith('sqlite3')
    problem = dbs['default'][profiles.PROFILE_PROBLEM_KEY]
    assert '\n' not in problem
    assert f'profile state file {copy} is a copy' in problem
    assert "its profile 'postgres'" in problem
    assert 'delete it to run on sqlite' in problem
    assert '`manage.py switch_database --to postgres --force`' in problem
    assert problem.endswith('(running on sqlite until fixed)')
    with pytest.raises(StateFileError, match='is a copy'):
        profiles.resolve_active_profile(second, {})
    assert profiles.resolve_active_profile(
        second, {}, accept_copy=True).name == 'postgres'
    # The original is still obeyed where it was written.
    assert profiles.resolve_active_profile(first, {}).name == 'postgres'
    # Deleting the copy is the fix for a device that runs on SQLite.
    copy.unlink()
    assert profiles.PROFILE_PROBLEM_KEY not in profiles.build_databases(
        data_dir=second, env={})['default']


def test_state_file_overwritten_in_place_is_refused(tmp_path):
    """Anthias's restore (tarfile) truncates an existing file in place:
    same inode as this device's own file, content from elsewhere."""
    path = profiles.write_active_profile(tmp_path, 'sqlite')
    foreign = dict(json.loads(path.read_text()), profile='postgres')
    foreign[profiles.INODE_KEY] += 1
    with open(path, 'r+b') as fh:
        fh.truncate()
        fh.write(json.dumps(foreign).encode())
    with pytest.raises(StateFileError) as excinfo:
        profiles.resolve_active_profile(tmp_path, {})
    assert f'this file is {path.stat().st_ino}' in str(excinfo.value)
    # Saying sqlite, the fix is only to delete it.
    foreign['profile'] = 'sqlite'
    path.write_text(json.dumps(foreign))
    dbs = profiles.build_databases(data_dir=tmp_path, env={})
    assert 'switch_database' not in dbs['default'][
        profiles.PROFILE_PROBLEM_KEY]


def test_state_file_without_inode_is_still_obeyed(tmp_path):
    """Devices switched before the inode was recorded keep their profile
    (losing it would put them on a stale SQLite file)."""
    profiles.state_file_path(tmp_path).write_text(
        '{"profile": "postgres", "changed_at": "2025-01-01T00:00:00"}\n')
    assert profiles.resolve_active_profile(tmp_path, {}).name == 'postgres'
    dbs = profiles.build_databases(data_dir=tmp_path, env={})
    assert dbs['default']['ENGINE'].endswith('postgresql')
    assert profiles.PROFILE_PROBLEM_KEY not in dbs['default']


def test_env_profile_wins_over_a_copied_state_file(tmp_path):
    first, second = tmp_path / 'a', tmp_path / 'b'
    second.mkdir()
    shutil.copy(profiles.write_active_profile(first, 'postgres'),
                profiles.state_file_path(second))
    active = profiles.resolve_active_profile(
        second, {'ANTHIAS_DB_PROFILE': 'postgres'})
    assert (active.name, active.source) == ('postgres', 'env')


def test_dbbackup_connectors_follow_the_profile_and_pg_dump(tmp_path):
    env = {'ANTHIAS_POSTGRES_URL':
           'postgresql://u:p@/anthias?host=/run/pg sock&connect_timeout=3',
           'ANTHIAS_PG_DUMP': '/usr/lib/postgresql/18/bin/pg_dump'}
    dbs = profiles.build_databases(data_dir=tmp_path, env=env)
    connectors = profiles.dbbackup_connectors(dbs, env)
    assert set(connectors) == {'postgres'}   # sqlite profile
    assert connectors['postgres'] == {
        'DUMP_CMD': '/usr/lib/postgresql/18/bin/pg_dump',
        'RESTORE_CMD': '/usr/lib/postgresql/18/bin/pg_restore',
        'HOST': '%2Frun%2Fpg%20sock',
        'ENV': {'PGCONNECT_TIMEOUT': '3'}}
    profiles.write_active_profile(tmp_path, 'postgres')
    dbs = profiles.build_databases(data_dir=tmp_path, env=env)
    connectors = profiles.dbbackup_connectors(dbs, env)
    assert connectors['default'] == connectors['postgres']
    # TCP: HOST left to DATABASES; no ANTHIAS_PG_DUMP: PATH's tools.
    tcp = {'ANTHIAS_POSTGRES_URL': 'postgres://u:p@db.local:5432/anthias'}
    dbs = profiles.build_databases(data_dir=tmp_path, env=tcp)
    assert profiles.dbbackup_connectors(dbs, tcp)['default'] == {
        'DUMP_CMD': 'pg_dump', 'RESTORE_CMD': 'pg_restore',
        'ENV': {'PGCONNECT_TIMEOUT': '5'}}
    assert profiles.dbbackup_connectors(dbs, tcp, pg_dump='/opt/pg_dump')[
        'default']['RESTORE_CMD'] == '/opt/pg_restore'
