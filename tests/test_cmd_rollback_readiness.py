"""rollback_readiness: table/JSON output and exit codes."""
import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import run_manage


def command(*args):
    out, err = StringIO(), StringIO()
    call_command('rollback_readiness', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def refused(*args):
    out = StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command('rollback_readiness', *args, stdout=out,
                     stderr=StringIO())
    return excinfo.value, out.getvalue()


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_not_ready_then_ready(data_dir):
    err, out = refused()
    assert err.returncode == 3
    assert 'not ready: backup_age, backup_integrity' in str(err)
    assert out.splitlines()[-1] == 'NOT READY'
    assert 'FAIL  backup_age' in out
    call_command('backup_database', verbosity=0, stdout=StringIO())
    out, _ = command()
    assert out.splitlines()[-1] == 'READY'
    assert 'ok    postgres_reachable' in out
    report = json.loads(command('--json')[0])
    assert report['ready'] is True
    names = [c['name'] for c in report['checks']]
    assert names == ['backup_age', 'backup_integrity', 'disk_space',
                     'sqlite_writable', 'postgres_reachable', 'pg_dump',
                     'lock', 'last_drill', 'cutover', 'window', 'standby']
    window = report['checks'][-2]
    assert 'no change journal on PostgreSQL' in window['reason']
    assert report['latest_backup'].startswith(str(data_dir / 'backups'))


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_check_that_cannot_run_exits_1(data_dir):
    not_a_dir = data_dir / 'file'
    not_a_dir.write_text('x')
    err, _ = refused('--backup-dir', str(not_a_dir))
    assert err.returncode == 1 and 'cannot list backup dir' in str(err)


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_subprocess_exit_codes(host_env):
    done = run_manage(host_env, 'rollback_readiness')
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines()[-1] == 'NOT READY'
    done = run_manage(host_env, 'backup_database')
    assert done.returncode == 0, done.stderr
    done = run_manage(host_env, 'rollback_readiness', '--json')
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)['ready'] is True
    done = run_manage(host_env, 'rollback_readiness', '--max-age-hours',
                      'soon')
    assert done.returncode == 2


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_window_and_a_fence_left_up_are_reported(data_dir):
    from anthias_rollback.window import journal as window_journal

    call_command('backup_database', verbosity=0, stdout=StringIO())
    window_journal.open_window('sqlite', 'postgres', forced=True)
    window_journal.take_fence('postgres', timeout=5)
    report = json.loads(command('--json')[0])
    reason = {c['name']: c['reason'] for c in report['checks']}['window']
    assert 'fence up' in reason and 'refuses writes' in reason
    assert 'FORCED' in reason
    window_journal.lower_fence('postgres')
    report = json.loads(command('--json')[0])
    reason = {c['name']: c['reason'] for c in report['checks']}['window']
    assert 'fence open' in reason
