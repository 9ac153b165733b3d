"""switch.py directly: the checked, atomic flip and the restart command.

The command's own behaviour (output, exit codes, --show) is in
test_cmd_switch_database.py; these pin the core functions it relies on.
"""
import json
import socket
import stat
import subprocess
import sys

import pytest
from django.db import connections

from anthias_rollback import profiles, switch
from anthias_rollback.exceptions import (
    ConfigError,
    DatabaseUnavailableError,
    StateFileError,
)
from anthias_rollback.window import cutover as window_cutover
from tests.conftest import ROOT

BOTH = ['sqlite', 'postgres']


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def state(data_dir) -> dict:
    return json.loads(profiles.state_file_path(data_dir).read_text())


@pytest.mark.django_db(databases=BOTH)
def test_switch_writes_state_file_with_previous(same_data, data_dir):
    result = switch.switch_profile('postgres', restart=False,
                                   extra_state={'reason': 'cutover'})
    path = profiles.state_file_path(data_dir)
    assert result.state_file == path
    assert (result.previous, result.profile, result.forced) == (
        'sqlite', 'postgres', False)
    assert result.restart is None and result.warnings == ()
    written = state(data_dir)
    assert written['profile'] == 'postgres'
    assert written['previous'] == 'sqlite'
    assert written['forced'] is False
    assert written['reason'] == 'cutover'
    assert 'changed_at' in written
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    # Only the state file, the cutover journal, the standby dir (the
    # cutover file) and the schema template built after the flip: no
    # temp file left.
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        [path.name, window_cutover.record_path(data_dir).name, 'standby',
         'schema_templates'])
    assert len(list((data_dir / 'schema_templates').glob('*.json'))) == 1


@pytest.mark.django_db(databases=BOTH)
def test_state_file_mode_private_to_its_writer(same_data, data_dir):
    """Owner read/write, nobody else may write it (it decides which
    database every process opens). Its content holds no secret."""
    switch.switch_profile('postgres', restart=False)
    path = profiles.state_file_path(data_dir)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o600 == 0o600
    assert mode & 0o022 == 0, oct(mode)
    assert mode & 0o111 == 0, oct(mode)
    assert set(state(data_dir)) == {'profile', 'previous', 'forced',
                                    'changed_at', 'inode'}
    # The file names its own inode (a copy restored elsewhere does not).
    assert state(data_dir)['inode'] == path.stat().st_ino


@pytest.mark.django_db(databases=BOTH)
def test_second_switch_records_previous_and_no_new_journal(same_data,
                                                         data_dir):
    first = switch.switch_profile('postgres', restart=False)
    assert first.cutover_journal == window_cutover.record_path(data_dir)
    again = switch.switch_profile('postgres', restart=False)
    assert again.previous == 'postgres'
    assert again.cutover_journal is None
    back = switch.switch_profile('sqlite', restart=False)
    assert (back.previous, back.profile) == ('postgres', 'sqlite')
    assert back.cutover_journal is None
    assert state(data_dir)['previous'] == 'postgres'


FLIP_IN_CHILD = '''
import django
django.setup()
from anthias_rollback import switch
switch.switch_profile("sqlite", force=True, restart=False)
'''


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_flip_killed_before_rename_keeps_old_profile(same_data, data_dir,
                                                     host_env):
    """SIGKILL inside the flip, after the new state was written to a temp
    file: the old state file is whole and still decides."""
    switch.switch_profile('postgres', restart=False)
    before = profiles.state_file_path(data_dir).read_bytes()
    env = dict(host_env,
               ANTHIAS_ROLLBACK_KILL_AT='atomic-write:before-rename')
    done = subprocess.run([sys.executable, '-c', FLIP_IN_CHILD], env=env,
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == -9, done.stderr
    assert profiles.state_file_path(data_dir).read_bytes() == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    env.pop('ANTHIAS_ROLLBACK_KILL_AT')
    done = subprocess.run([sys.executable, '-c', FLIP_IN_CHILD], env=env,
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'


@pytest.mark.parametrize('profile', ['mysql', 'default', ''])
def test_unknown_profile_refused_and_nothing_written(data_dir, profile):
    with pytest.raises(ConfigError, match='unknown profile'):
        switch.switch_profile(profile, restart=False)
    assert list(data_dir.iterdir()) == []


@pytest.mark.django_db(databases=BOTH)
def test_check_target_accepts_migrated_aliases():
    assert switch.check_target('postgres') is None
    assert switch.check_target('sqlite') is None


@pytest.mark.django_db(databases=['postgres'])
def test_check_target_refuses_closed_port():
    port = closed_port()
    overrides = {'host': '127.0.0.1', 'port': str(port),
                 'password': 'Cl0sed-pw'}
    with (profiles.postgres_override_alias(overrides) as alias,
          pytest.raises(DatabaseUnavailableError) as excinfo):
        switch.check_target(alias)
    message = str(excinfo.value)
    assert f'127.0.0.1:{port}' in message
    assert 'does not answer' in message
    assert 'Cl0sed-pw' not in message


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_switch_refused_for_unreachable_postgres_alias(data_dir):
    """The postgres alias itself pointed at a closed port: no flip, no
    journal, no state file."""
    port = closed_port()
    pg = connections['postgres']
    pg.close()
    saved = dict(pg.settings_dict)
    pg.settings_dict.update(HOST='127.0.0.1', PORT=port,
                            OPTIONS={'connect_timeout': 2})
    try:
        with pytest.raises(DatabaseUnavailableError,
                           match=f'127.0.0.1:{port}'):
            switch.switch_profile('postgres', restart=False)
    finally:
        pg.close()
        pg.settings_dict.clear()
        pg.settings_dict.update(saved)
    assert list(data_dir.iterdir()) == []
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'


@pytest.mark.django_db(databases=BOTH)
def test_env_override_is_a_warning(same_data, data_dir, monkeypatch):
    monkeypatch.setenv('ANTHIAS_DB_PROFILE', 'sqlite')
    result = switch.switch_profile('postgres', restart=False)
    assert result.previous == 'sqlite'
    assert len(result.warnings) == 1
    assert 'ANTHIAS_DB_PROFILE=sqlite' in result.warnings[0]
    assert 'overrides the state file' in result.warnings[0]
    # The state file is still written (it applies once the env is unset).
    assert state(data_dir)['profile'] == 'postgres'


@pytest.mark.django_db(databases=BOTH)
def test_restart_false_never_runs_configured_command(
        same_data, data_dir, settings, tmp_path):
    marker = tmp_path / 'restarted'
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = f'touch {marker}'
    result = switch.switch_profile('postgres', restart=False)
    assert result.restart is None and not marker.exists()
    result = switch.switch_profile('sqlite')
    assert marker.exists()
    assert result.restart.ok and result.restart.returncode == 0


def test_no_restart_command_configured(settings):
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = ''
    assert switch.restart_after_flip() is None


def test_restart_command_success_output():
    result = switch.run_restart_command('echo restarted', timeout=10)
    assert result.ok is True
    assert result.returncode == 0
    assert result.output == 'restarted'
    assert result.command == 'echo restarted'
    assert result.seconds >= 0


def test_restart_command_exit_code_and_both_streams():
    result = switch.run_restart_command(
        'sh -c "echo out; echo err >&2; exit 3"', timeout=10)
    assert result.ok is False
    assert result.returncode == 3
    assert result.output == 'out\nerr'


def test_restart_command_output_keeps_the_tail():
    result = switch.run_restart_command(
        "python3 -c \"print('a' * 5000 + 'END')\"", timeout=10)
    assert result.ok
    assert len(result.output) == 2000
    assert result.output.endswith('END')


def test_restart_command_timeout(settings):
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = 'sleep 5'
    settings.ANTHIAS_ROLLBACK_RESTART_TIMEOUT = 0.5
    result = switch.restart_after_flip()
    assert result.ok is False
    assert result.returncode is None
    assert result.output == 'timed out after 0.5s'
    assert 0.4 < result.seconds < 3


def test_restart_command_missing_program():
    result = switch.run_restart_command('/nonexistent/restart-anthias',
                                        timeout=5)
    assert result.ok is False
    assert result.returncode is None
    assert 'No such file or directory' in result.output


@pytest.mark.django_db(databases=BOTH)
@pytest.mark.parametrize('damage', ['garbage', 'copy'])
def test_force_rewrites_a_bad_or_copied_state_file(damage, data_dir):
    """The fix the state file's error names really works: a garbage
    file, or a copy from another device (its recorded inode is not its
    own), is rewritten by switch_database --to sqlite --force."""
    path = profiles.state_file_path(data_dir)
    if damage == 'garbage':
        path.write_bytes(b'\x00\xffnot json')
    else:
        profiles.write_active_profile(data_dir, 'postgres')
        # Same content, another inode (written beside it, then renamed:
        # an unlinked inode's number could be handed out again).
        path.with_name('copy').write_bytes(path.read_bytes())
        path.with_name('copy').replace(path)
    with pytest.raises(StateFileError):
        profiles.resolve_active_profile(data_dir, {})
    with pytest.raises(StateFileError):
        switch.switch_profile('sqlite', restart=False)
    done = switch.switch_profile('sqlite', force=True, restart=False)
    assert any('rewritten (--force)' in w for w in done.warnings) == (
        damage == 'garbage')
    active = profiles.resolve_active_profile(data_dir, {})
    assert (active.name, active.source) == ('sqlite', 'state file')
