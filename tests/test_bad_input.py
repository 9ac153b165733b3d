"""Bad settings and state files, as a user sees them: real `manage.py`
child processes; one line on stderr, the exit code, no traceback, no
file changed. A bad setting never stops a device that runs on SQLite."""
import json

import pytest

from anthias_rollback import conf, models_graph, profiles
from anthias_rollback.exceptions import ConfigError
from anthias_rollback.rollback import swap
from tests.conftest import run_manage

DB = pytest.mark.django_db(databases=['sqlite', 'postgres'],
                           transaction=True)
SHOW_VENDOR = ('from django.db import connections; '
               'print(connections["default"].vendor)')

BAD_PROFILES = {
    'state-binary': ('file', b'\x00\xff\xfe\x00 not json'),
    'state-json-list': ('file', b'["postgres"]'),
    'state-unknown-profile': ('file', b'{"profile": "oracle"}'),
    'env-oracle': ('env', 'oracle'),
}


def one_error_line(done):
    """The child's stderr is one CommandError line, no traceback."""
    assert 'Traceback' not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@DB
@pytest.mark.parametrize('kind,value', BAD_PROFILES.values(),
                         ids=BAD_PROFILES.keys())
def test_bad_profile_setting_does_not_brick_the_device(data_dir, host_env,
                                                       kind, value):
    """It crashed settings import: every command, even on SQLite, died
    with a traceback. Now: sqlite by fallback, `check` fails naming the
    file or variable, commands that need the profile refuse in a line."""
    state = profiles.state_file_path(data_dir)
    if kind == 'file':
        state.write_bytes(value)
        named = str(state)
    else:
        host_env['ANTHIAS_DB_PROFILE'] = value
        named = 'ANTHIAS_DB_PROFILE'
    before = state.read_bytes() if state.exists() else None

    done = run_manage(host_env, 'shell', '--no-imports', '-c',
                      SHOW_VENDOR)
    assert (done.returncode, done.stdout.strip()) == (0, 'sqlite'), \
        done.stderr
    assert 'Traceback' not in done.stderr

    done = run_manage(host_env, 'check')
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr
    assert 'anthias_rollback.E001' in done.stderr and named in done.stderr

    done = run_manage(host_env, 'switch_database', '--show')
    assert done.returncode == 1
    line = one_error_line(done)
    assert line.startswith('CommandError: ') and named in line

    done = run_manage(host_env, 'switch_database', '--to', 'postgres')
    assert done.returncode == 1
    assert named in one_error_line(done)
    assert (state.read_bytes() if state.exists() else None) == before


@DB
@pytest.mark.parametrize('variable', ['POSTGRES_PORT',
                                      'POSTGRES_CONNECT_TIMEOUT'])
def test_bad_postgres_setting_stays_one_line(data_dir, host_env, variable):
    host_env.pop('ANTHIAS_POSTGRES_URL')
    host_env[variable] = 'abc'
    done = run_manage(host_env, 'check')
    assert done.returncode == 0, done.stderr   # a warning: SQLite runs
    assert 'anthias_rollback.W001' in done.stderr
    assert variable in done.stderr
    done = run_manage(host_env, 'switch_database', '--to', 'postgres')
    assert done.returncode == 1
    assert f'{variable} is malformed' in one_error_line(done)
    assert not profiles.state_file_path(data_dir).exists()


@DB
def test_state_file_0600_is_read_by_the_host_process(data_dir, host_env):
    """The state file is 0600 now: the host (same user) still reads it."""
    path = profiles.write_active_profile(data_dir, 'postgres')
    assert path.stat().st_mode & 0o777 == 0o600
    done = run_manage(host_env, 'shell', '--no-imports', '-c',
                      SHOW_VENDOR)
    assert (done.returncode, done.stdout.strip()) == (0, 'postgresql'), \
        done.stderr
    done = run_manage(host_env, 'switch_database', '--show')
    assert done.returncode == 0, done.stderr
    assert 'active profile: postgres (from state file' in done.stdout


BAD_SETTINGS = {
    'ANTHIAS_ROLLBACK_RESTART_TIMEOUT': 'abc',
    'ANTHIAS_BACKUP_TIMEOUT': '-5',
    'ANTHIAS_ROLLBACK_RESTART_COMMAND': 'systemctl restart "anthias',
    'ANTHIAS_ROLLBACK_VERIFY_URLS': '/health http://evil/x',
    'ANTHIAS_ROLLBACK_EXCLUDE': 'nosuchapp.Foo',
    'ANTHIAS_PG_DUMP': '  ',
    'ANTHIAS_BACKUP_DIR': __file__,    # a file, not a directory
    'ANTHIAS_DATA_DIR': __file__,
}


@pytest.mark.parametrize('name,value', BAD_SETTINGS.items(),
                         ids=BAD_SETTINGS.keys())
def test_validate_settings_names_the_bad_setting(settings, name, value):
    setattr(settings, name, value)
    with pytest.raises(ConfigError) as excinfo:
        conf.validate_settings()
    assert name in str(excinfo.value)
    assert '\n' not in str(excinfo.value)


def test_validate_settings_accepts_good_values(settings):
    settings.ANTHIAS_ROLLBACK_RESTART_TIMEOUT = '30'
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = 'systemctl restart x'
    settings.ANTHIAS_ROLLBACK_VERIFY_URLS = ['/health', '/api/v1/x']
    settings.ANTHIAS_ROLLBACK_EXCLUDE = 'sessions, auth.Permission'
    conf.validate_settings()
    assert conf.get_setting('ANTHIAS_ROLLBACK_RESTART_TIMEOUT') == 30.0


def test_bad_timeout_is_a_config_error_at_read(settings):
    """Read after the flip, `float('abc')` was a traceback, exit 1."""
    settings.ANTHIAS_ROLLBACK_RESTART_TIMEOUT = 'abc'
    with pytest.raises(ConfigError, match='ANTHIAS_ROLLBACK_RESTART_'
                       "TIMEOUT='abc' is not a number"):
        conf.get_setting('ANTHIAS_ROLLBACK_RESTART_TIMEOUT')


@DB
def test_bad_app_settings_show_in_check(data_dir, host_env):
    host_env['ANTHIAS_ROLLBACK_RESTART_TIMEOUT'] = 'abc'
    done = run_manage(host_env, 'check')
    assert 'Traceback' not in done.stderr
    assert 'anthias_rollback.W002' in done.stderr
    assert 'ANTHIAS_ROLLBACK_RESTART_TIMEOUT' in done.stderr
    host_env['ANTHIAS_ROLLBACK_RESTART_TIMEOUT'] = '10'
    host_env['ANTHIAS_ROLLBACK_EXCLUDE'] = 'nosuchapp.Foo'
    done = run_manage(host_env, 'check')
    assert 'anthias_rollback.W002' in done.stderr
    assert 'nosuchapp.Foo' in done.stderr


@DB
def test_bad_restart_timeout_refused_before_the_flip(data_dir, host_env):
    host_env['ANTHIAS_ROLLBACK_RESTART_COMMAND'] = 'true'
    host_env['ANTHIAS_ROLLBACK_RESTART_TIMEOUT'] = 'abc'
    done = run_manage(host_env, 'switch_database', '--to', 'sqlite',
                      '--force')
    assert done.returncode == 1
    assert 'ANTHIAS_ROLLBACK_RESTART_TIMEOUT' in one_error_line(done)
    assert not profiles.state_file_path(data_dir).exists()


@pytest.mark.django_db(databases=[])
@pytest.mark.parametrize('names', ['nosuchapp.Foo', 'nosuchapp',
                                   'auth.NoSuchModel', 'anthias_app.asset'])
def test_exclusion_naming_nothing_is_refused(settings, names):
    """It was silently ignored: rows meant to stay were copied."""
    settings.ANTHIAS_ROLLBACK_EXCLUDE = names
    with pytest.raises(ConfigError) as excinfo:
        models_graph.plan_models()
    message = str(excinfo.value)
    assert 'ANTHIAS_ROLLBACK_EXCLUDE' in message and repr(names) in message
    settings.ANTHIAS_ROLLBACK_EXCLUDE = ''
    with pytest.raises(ConfigError, match="names 'nope'"):
        models_graph.plan_models(exclude=['nope'])


@pytest.mark.django_db(databases=[])
def test_real_exclusions_still_exclude(settings):
    settings.ANTHIAS_ROLLBACK_EXCLUDE = 'sessions auth.Permission'
    labels = models_graph.plan_models().labels
    assert 'sessions.Session' not in labels
    assert 'auth.Permission' not in labels and 'auth.User' in labels


@DB
def test_garbage_swap_intent_does_not_block_a_rollback(data_dir, host_env):
    """A garbage intent gave a TypeError on every rollback until deleted
    by hand. It is moved aside (0600) with a warning; the run goes on."""
    done = run_manage(host_env, 'backup_database')
    assert done.returncode == 0, done.stderr
    live = profiles.sqlite_alias_path()
    intent = swap.intent_path(live)
    intent.write_text(json.dumps({'new': 5, 'live': ['?']}))
    live_before = live.read_bytes()
    done = run_manage(host_env, 'rollback_migration', '--source', 'backup',
                      '--dry-run', '--yes')
    assert 'Traceback' not in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert not intent.exists()
    aside = list(live.parent.glob(f'{intent.name}.invalid-*'))
    assert len(aside) == 1 and aside[0].stat().st_mode & 0o777 == 0o600
    assert live.read_bytes() == live_before


@pytest.mark.django_db(databases=['default', 'sqlite', 'postgres'],
                       transaction=True)
def test_a_report_without_phases_is_one_line_not_a_traceback(data_dir,
                                                             host_env):
    """A report cut short (or edited) gave a KeyError traceback to
    export_unapplied_writes and --generate-report."""
    reports = data_dir / 'reports'
    reports.mkdir()
    broken = reports / 'rollback_20260101_000000_000000.json'
    broken.write_text(json.dumps({'source': 'standby', 'outcome': 'x'}))
    for args in (('rollback_migration', '--generate-report'),
                 ('export_unapplied_writes', '--report-file', str(broken))):
        done = run_manage(host_env, *args)
        assert done.returncode == 1, (args, done.stdout + done.stderr)
        assert 'Traceback' not in done.stderr, done.stderr
        assert 'is not a complete rollback report' in done.stderr, \
            done.stderr
