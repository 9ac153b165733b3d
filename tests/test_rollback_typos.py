"""A mistyped PostgreSQL setting is not an outage: the emergency
rollback (source auto) must not restore the backup over writes that are
safe on PostgreSQL. Each case is a real `manage.py` process: exit 1, one
line naming the setting, the live file and the profile unchanged."""
import pytest
from django.db import connections

from anthias_rollback import profiles
from tests.conftest import run_manage
from tests.helpers.rollback import file_digest, seed_device, write_on_postgres

ALL = ['default', 'sqlite', 'postgres']

CASES = {
    'port out of range': ({}, ['--postgres-port', '99999'], '99999'),
    'unknown role': ({}, ['--postgres-user', 'nosuchrole'], 'nosuchrole'),
    'missing database': ({}, ['--postgres-db', 'nosuchdb'], 'nosuchdb'),
    'host that does not resolve': (
        {}, ['--postgres-host', 'no-such-host.invalid'],
        'no-such-host.invalid'),
    'URL with a non-numeric port': (
        {'ANTHIAS_POSTGRES_URL': 'postgres://u:p@127.0.0.1:54x2/anthias'},
        [], 'ANTHIAS_POSTGRES_URL'),
    'POSTGRES_PORT=abc': ({'ANTHIAS_POSTGRES_URL': None,
                           'POSTGRES_PORT': 'abc'}, [], 'POSTGRES_PORT'),
    'POSTGRES_CONNECT_TIMEOUT=abc': (
        {'ANTHIAS_POSTGRES_URL': None, 'POSTGRES_HOST': '127.0.0.1',
         'POSTGRES_CONNECT_TIMEOUT': 'abc'}, [],
        'POSTGRES_CONNECT_TIMEOUT'),
}


@pytest.mark.parametrize('case', CASES)
@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_typo_refuses_instead_of_restoring_the_backup(
        case, data_dir, settings, host_env):
    env_changes, args, named = CASES[case]
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    before = file_digest(device.live)
    env = dict(host_env)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    done = run_manage(env, 'rollback_migration', '--emergency', *args)
    assert done.returncode == 1, (case, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in done.stderr, lines
    assert named in lines[0], lines[0]
    assert 'not an outage' in lines[0] or 'malformed' in lines[0]
    assert file_digest(device.live) == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    assert 'RESTORED' not in done.stdout and 'ROLLED BACK' not in \
        done.stdout


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_profile_forced_by_the_environment_is_refused(data_dir, settings,
                                                      host_env):
    device = seed_device(settings)
    connections['sqlite'].close()
    before = file_digest(device.live)
    env = dict(host_env, ANTHIAS_DB_PROFILE='postgres')
    done = run_manage(env, 'rollback_migration', '--emergency')
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'ANTHIAS_DB_PROFILE=postgres' in lines[0]
    assert file_digest(device.live) == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
