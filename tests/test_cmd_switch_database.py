import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from anthias_rollback import profiles
from tests.conftest import run_manage

UNREACHABLE = {'ENGINE': 'django.db.backends.postgresql',
               'NAME': 'anthias', 'USER': 'anthias',
               'PASSWORD': 'hunter2', 'HOST': '127.0.0.1', 'PORT': 1,
               'OPTIONS': {'connect_timeout': 2}}


def switch(*args):
    out, err = StringIO(), StringIO()
    call_command('switch_database', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def active(data_dir):
    return profiles.resolve_active_profile(data_dir, {}).name


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_switch_to_migrated_postgres_and_back(same_data, data_dir):
    out, _ = switch('--to', 'postgres')
    assert 'active profile: postgres (was sqlite' in out
    assert active(data_dir) == 'postgres'
    out, _ = switch('--show')
    assert 'active profile: postgres (from state file' in out
    switch('--to', 'sqlite')
    assert active(data_dir) == 'sqlite'


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_flip_refused_for_unreachable_postgres(data_dir):
    connections['postgres'].close()
    saved = connections['postgres'].settings_dict.copy()
    connections['postgres'].settings_dict.update(UNREACHABLE)
    try:
        with pytest.raises(CommandError) as excinfo:
            switch('--to', 'postgres')
    finally:
        connections['postgres'].close()
        connections['postgres'].settings_dict.update(saved)
    message = str(excinfo.value)
    assert excinfo.value.returncode == 1
    assert '127.0.0.1:1' in message and 'does not answer' in message
    assert 'hunter2' not in message
    assert active(data_dir) == 'sqlite'
    assert not profiles.state_file_path(data_dir).exists()


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_flip_refused_for_unmigrated_postgres_then_forced(data_dir):
    # Un-apply one migration on the test PostgreSQL database.
    call_command('migrate', 'sessions', 'zero', database='postgres',
                 verbosity=0)
    try:
        with pytest.raises(CommandError) as excinfo:
            switch('--to', 'postgres')
        assert 'sessions.0001_initial' in str(excinfo.value)
        assert 'unapplied migrations' in str(excinfo.value)
        assert active(data_dir) == 'sqlite'
        _, err = switch('--to', 'postgres', '--force')
        assert 'forced' in err
        assert active(data_dir) == 'postgres'
    finally:
        call_command('migrate', database='postgres', verbosity=0)


def test_env_override_wins_and_show_says_so(data_dir, monkeypatch):
    profiles.write_active_profile(data_dir, 'postgres')
    monkeypatch.setenv('ANTHIAS_DB_PROFILE', 'sqlite')
    out, _ = switch('--show')
    assert 'active profile: sqlite (from env: ANTHIAS_DB_PROFILE)' in out
    out, _ = switch('--show', '--json')
    shown = json.loads(out)
    assert {k: shown[k] for k in ('name', 'source', 'detail')} == {
        'name': 'sqlite', 'source': 'env', 'detail': 'ANTHIAS_DB_PROFILE'}
    # No database access in this test: the window is reported as unread.
    assert 'error' in shown['window']


def test_unknown_profile_is_usage_error(data_dir):
    with pytest.raises(CommandError, match="invalid choice: 'mysql'"):
        switch('--to', 'mysql')


@pytest.mark.django_db(databases=['sqlite'])
def test_data_dir_not_writable_leaves_profile(readonly_dir):
    with (override_settings(ANTHIAS_DATA_DIR=str(readonly_dir)),
          pytest.raises(CommandError,
                        match='cannot write profile state file')):
        switch('--to', 'sqlite')
    assert list(readonly_dir.iterdir()) == []


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_restart_command_failure_is_exit_4_and_flip_stays(same_data, data_dir,
                                                          settings):
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = 'sh -c "echo boom; exit 7"'
    with pytest.raises(CommandError) as excinfo:
        switch('--to', 'postgres')
    assert excinfo.value.returncode == 4
    assert 'restart command failed: boom' in str(excinfo.value)
    assert active(data_dir) == 'postgres'


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_restart_command_runs(same_data, data_dir, settings, tmp_path):
    marker = tmp_path / 'restarted'
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = f'touch {marker}'
    out, _ = switch('--to', 'postgres')
    assert marker.exists()
    assert 'restart command: exit 0' in out


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_subprocess_exit_codes(same_data, host_env):
    done = run_manage(host_env, 'switch_database', '--to', 'postgres')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(
        'active profile: postgres')
    bad = dict(host_env, ANTHIAS_POSTGRES_URL='postgres://u:pw@h:x/db')
    done = run_manage(bad, 'switch_database', '--to', 'postgres')
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr
    assert done.stderr.strip() == (
        'CommandError: ANTHIAS_POSTGRES_URL is malformed: port is not a '
        'number; expected postgres://HOST:PORT/DBNAME with user and '
        'password before the host, or ?host=/socket/dir')
    done = run_manage(host_env, 'switch_database', '--to', 'nope')
    assert done.returncode == 2


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_cutover_journal_recorded(data_dir):
    from anthias_rollback.window import cutover as window_cutover
    from tests.helpers.factories import AssetFactory

    AssetFactory.create_batch(3)
    # PostgreSQL is empty: the switch is refused and nothing changes...
    with pytest.raises(CommandError, match='does not hold SQLite') as exc:
        switch('--to', 'postgres')
    assert 'anthias_app.Asset: sqlite 3 rows, postgres 0' in str(exc.value)
    assert window_cutover.read_cutover(data_dir) is None
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'
    # ... unless forced, which the change journal records.
    switch('--to', 'postgres', '--force')
    from anthias_rollback.window import journal as window_journal
    assert window_journal.window_state('postgres').forced is True
    recorded = window_cutover.read_cutover(data_dir)
    assert recorded['source']['models']['anthias_app.Asset']['rows'] == 3
    assert recorded['target']['models']['anthias_app.Asset']['rows'] == 0
    assert 'anthias_app.0001_initial' in recorded['target']['migrations']
    path = window_cutover.record_path(data_dir)
    assert (path.stat().st_mode & 0o777) == 0o600
