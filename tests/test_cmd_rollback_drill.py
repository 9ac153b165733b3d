"""rollback_drill as an operator runs it: output, exit codes, --json."""
import json
import urllib.parse
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from anthias_rollback.drill import history as drill_history
from tests.conftest import postgres_url_for, run_manage
from tests.kitchensink.models import Category
from tests.test_drill_run import (
    closed_port,
    fingerprint_dir,
    make_live_database,
)

ALL = ['default', 'sqlite', 'postgres']


def drill_cmd(*args):
    out, err = StringIO(), StringIO()
    call_command('rollback_drill', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def live_env(host_env, data_dir):
    """The child process's live database is data_dir/anthias.db."""
    return dict(host_env, ANTHIAS_SQLITE_PATH=str(data_dir / 'anthias.db'))


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_embedded_seed_1000_passes_in_a_real_process(data_dir, host_env):
    """The README's main job: exit 0, a PASS line, data dir unchanged."""
    make_live_database(data_dir)
    before = fingerprint_dir(data_dir)

    done = run_manage(live_env(host_env, data_dir), 'rollback_drill',
                      '--embedded-postgres', '--seed', '1000',
                      timeout=300)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith('PASS: rollback drill passed')
    for step in ('preflight', 'seed', 'backup', 'transfer', 'validate',
                 'writes', 'rollback', 'verify', 'cleanup'):
        assert any(line.split()[:2] == ['ok', step] for line in lines), step
    assert 'Traceback' not in done.stderr
    assert fingerprint_dir(data_dir) == before
    summary = drill_history.last_drill(data_dir)
    assert summary.passed and summary.server == 'embedded'
    assert summary.rows >= 1000 and summary.rollback_seconds > 0


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_json_prints_the_report_only(data_dir):
    out, _ = drill_cmd('--seed', '50', '--no-embedded-postgres', '--json')
    data = json.loads(out)
    assert data['outcome'] == 'PASS' and data['exit_code'] == 0
    assert data['server'] == 'configured'
    assert [s['name'] for s in data['steps']][-1] == 'cleanup'
    assert data['report_path'].startswith(str(data_dir / 'drills'))


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_failed_transfer_exits_3_naming_the_step(data_dir, settings):
    # A value PostgreSQL refuses (a NUL in text) in the live file.
    Category.objects.using('sqlite').create(name='bad\x00name')
    out = StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command('rollback_drill', stdout=out, stderr=StringIO())
    assert excinfo.value.returncode == 3
    last = out.getvalue().splitlines()[-1]
    assert last.startswith('FAIL: rollback drill failed at step transfer')
    assert 'failed   transfer' in out.getvalue()
    assert drill_history.last_drill(data_dir).outcome == 'FAIL'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_unreachable_postgres_and_no_embedded_exits_1(data_dir, host_env):
    make_live_database(data_dir)
    before = fingerprint_dir(data_dir)
    env = live_env(host_env, data_dir)
    env['ANTHIAS_POSTGRES_URL'] = (f'postgresql://anthias:secret-pw@'
                                   f'127.0.0.1:{closed_port()}/anthias')
    done = run_manage(env, 'rollback_drill', '--seed', '10',
                      '--no-embedded-postgres')
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert 'does not answer' in error and '--embedded-postgres' in error
    assert 'secret-pw' not in done.stdout + done.stderr
    assert 'Traceback' not in done.stderr
    assert fingerprint_dir(data_dir) == before


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_scratch_name_clash_exits_1(data_dir, host_env):
    url = urllib.parse.urlsplit(postgres_url_for('postgres'))
    clash = url._replace(path='/anthias_drill_live').geturl()
    env = dict(host_env, ANTHIAS_POSTGRES_URL=clash)
    done = run_manage(env, 'rollback_drill', '--seed', '10')
    assert done.returncode == 1
    assert "refusing to run: the configured database 'anthias_drill_live'" \
        in done.stderr


def test_usage_errors_exit_2(host_env):
    done = run_manage(host_env, 'rollback_drill', '--seed', '0')
    assert done.returncode == 2
    assert 'must be at least 1' in done.stderr


def test_help_lists_the_exit_codes():
    from anthias_rollback.management.commands import rollback_drill

    text = rollback_drill.Command.help
    assert '0 PASS' in text and '3 FAIL' in text and '1 could not run' \
        in text
    assert 'Exit codes' in rollback_drill.__doc__
