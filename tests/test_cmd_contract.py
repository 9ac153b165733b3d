"""The operator's contract, for every command at once (real processes).

--json: one JSON document on stdout for every outcome, with
schema_version, ok, exit_code and error; the verdict is the last stdout
line on every exit code; -v0 prints at most that line; -v3 shows SQL on
stderr; the rollback's phases reach the logging hierarchy; a bad option
value is exit 2 with one line and changes nothing.
"""
import json
import logging
import os
import stat
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connections

from anthias_rollback import exit_codes, phases
from tests.conftest import run_manage
from tests.helpers import pgserver
from tests.helpers.compare import fill_both
from tests.helpers.factories import AssetFactory
from tests.helpers.rollback import seed_device

ALL = ['default', 'sqlite', 'postgres']
ENVELOPE = {'schema_version', 'ok', 'exit_code', 'error'}
# Not UTF-8: reaches the child as the byte 0xff in argv.
BAD_BYTES = os.fsdecode(b'/tmp/caf\xff.db')


def document(done):
    """The one JSON document on stdout (json.loads fails on anything
    before or after it)."""
    data = json.loads(done.stdout)
    assert ENVELOPE <= set(data), sorted(data)
    assert data['schema_version'] == 1
    assert data['exit_code'] == done.returncode, done.stderr
    assert data['ok'] is (done.returncode == 0)
    if done.returncode:
        assert data['error'] and '\n' not in data['error']
        assert done.stderr.strip().splitlines()[-1].endswith(data['error'])
    else:
        assert data['error'] is None
    return data


def pg_dump_env(host_env):
    return dict(host_env, ANTHIAS_PG_DUMP=str(
        pgserver.embedded_bin_dir() / 'pg_dump'))


# (command, args, exit code); run on an empty device (profile sqlite).
JSON_CASES = [
    ('backup_database', [], 0),
    ('backup_database', ['--verify', '/nonexistent/b.db'], 1),
    ('rollback_readiness', [], 3),
    ('migrate_to_postgres', ['--dry-run'], 0),
    ('migrate_to_postgres', ['--sqlite-db', '/nonexistent/x.db'], 1),
    ('validate_migration', ['--no-performance-test'], 0),
    ('validate_migration', ['--sqlite-db', '/nonexistent/x.db'], 1),
    ('switch_database', ['--show'], 0),
    ('switch_database', ['--to', 'postgres', '--no-restart'], 1),
    ('end_rollback_window', ['--force'], 0),
    ('end_rollback_window', [], 1),
    ('rollback_migration', ['--source', 'backup', '--backup-path',
                            '/nonexistent/b.db', '--yes'], 1),
    # Never left SQLite: nothing to roll back, exit 0 (deploy hooks).
    ('rollback_migration', [], 0),
    ('rollback_drill', ['--workdir', '{file}'], 1),
    ('monitor_migration', ['--interval', '0.01', '--max-probes', '1'], 0),
    ('monitor_migration', ['--auto-rollback', '--max-probes', '1'], 1),
    ('replicate_changes', ['--once'], 1),
]


@pytest.mark.django_db(databases=ALL, transaction=True)
@pytest.mark.parametrize('name, args, code', JSON_CASES)
def test_json_is_one_document_for_every_outcome(host_env, tmp_path, name,
                                                args, code):
    a_file = tmp_path / 'a-file'
    a_file.write_text('not a directory')
    args = [str(a_file) if arg == '{file}' else arg for arg in args]
    if name == 'switch_database' and code == 1:
        # PostgreSQL lacks SQLite's rows: the switch is refused.
        AssetFactory.create()
    if name == 'validate_migration' and code == 0:
        fill_both('sqlite', 'postgres', n_assets=3)
    connections['sqlite'].close()
    done = run_manage(pg_dump_env(host_env), name, *args, '--json')
    assert done.returncode == code, done.stdout + done.stderr
    data = document(done)
    if name == 'rollback_migration':
        assert set(data['data_loss']) == {'status', 'detail',
                                          'lost_writes'}
    if name == 'monitor_migration' and code == 0:
        assert data['rounds'] == 1 and data['triggered'] is False


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_rollback_json_has_the_measured_data_loss(settings, host_env):
    seed_device(settings)
    connections['sqlite'].close()
    done = run_manage(pg_dump_env(host_env), 'rollback_migration',
                      '--dry-run', '--json')
    assert done.returncode == 0, done.stderr
    data = document(done)
    assert data['outcome'] == 'dry run'
    assert data['data_loss']['status'] == data['loss']
    assert data['data_loss']['lost_writes'] == []
    assert data['data_loss']['detail']


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_drill_json_document(data_dir):
    out = StringIO()
    call_command('rollback_drill', '--seed', '5', '--no-embedded-postgres',
                 '--json', stdout=out, stderr=StringIO())
    data = json.loads(out.getvalue())
    assert data['ok'] is True and data['exit_code'] == 0
    assert data['schema_version'] == 1 and data['error'] is None


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_verdict_is_the_last_stdout_line_on_every_exit_code(host_env):
    env = pg_dump_env(host_env)
    fill_both('sqlite', 'postgres', n_assets=3)
    connections['sqlite'].close()
    done = run_manage(env, 'validate_migration', '--no-performance-test')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith('PASS: ')
    done = run_manage(env, 'rollback_readiness')
    assert done.returncode == 3
    assert done.stdout.splitlines()[-1] == 'NOT READY'
    assert done.stderr.strip().splitlines()[-1].startswith(
        'CommandError: not ready: ')
    done = run_manage(env, 'backup_database', '--verify', '/nonexistent.db')
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error == f'CommandError: {done.stdout.splitlines()[-1]}'
    AssetFactory.create()
    connections['sqlite'].close()
    done = run_manage(env, 'validate_migration', '--no-performance-test')
    assert done.returncode == 3
    last = done.stdout.splitlines()[-1]
    assert last.startswith('FAIL: integrity')
    assert done.stderr.strip().splitlines()[-1] == f'CommandError: {last}'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_verbosity_0_prints_the_final_line_only(host_env):
    env = pg_dump_env(host_env)
    fill_both('sqlite', 'postgres', n_assets=3)
    connections['sqlite'].close()
    for args, code in ((['rollback_readiness'], 3),
                       (['migrate_to_postgres', '--dry-run'], 0),
                       (['validate_migration', '--no-performance-test'], 0),
                       (['backup_database', '--list'], 0)):
        done = run_manage(env, *args, '-v0')
        assert done.returncode == code, done.stderr
        assert len(done.stdout.splitlines()) == 1, (args, done.stdout)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_verbosity_0_rollback_prints_no_tables(settings, host_env):
    env = pg_dump_env(host_env)
    seed_device(settings)
    connections['sqlite'].close()
    done = run_manage(env, 'rollback_migration', '--dry-run', '-v0')
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [(
        'DRY RUN OK: nothing changed; a rollback from postgres would '
        'succeed')]


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_verbosity_3_logs_sql_on_stderr(host_env):
    fill_both('sqlite', 'postgres', n_assets=3)
    connections['sqlite'].close()
    done = run_manage(host_env, 'validate_migration', '-v3',
                      '--no-performance-test')
    assert done.returncode == 0, done.stderr
    sql = [line for line in done.stderr.splitlines()
           if line.startswith('anthias_rollback.sql DEBUG ')]
    assert any('[sqlite ' in line for line in sql), done.stderr[-2000:]
    assert any('[postgres ' in line for line in sql)
    assert any('SELECT' in line for line in sql)
    assert done.stdout.splitlines()[-1].startswith('PASS: ')
    done = run_manage(host_env, 'validate_migration', '-v2',
                      '--no-performance-test')
    assert 'anthias_rollback.sql' not in done.stderr


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_logging_handler_receives_the_rollback_phases(data_dir,
                                                        settings):
    seed_device(settings)
    package = logging.getLogger('anthias_rollback')
    handler, level = Collect(), package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        call_command('rollback_migration', '--emergency', stdout=StringIO(),
                     stderr=StringIO())
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
    lines = [r.getMessage() for r in handler.records
             if r.name == 'anthias_rollback.rollback']
    assert 'phase-start=preflight' in lines
    assert any(line.startswith('phase=swap status=ok ') for line in lines)
    assert package.propagate is True
    log = data_dir / 'rollback.log'
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert 'phase=swap status=ok' in log.read_text()
    # Detached after the run: the next records do not reach the file.
    size = log.stat().st_size
    logging.getLogger('anthias_rollback.rollback').warning('after')
    assert log.stat().st_size == size


def test_phase_runner_log_file_redacts_and_closes(tmp_path, settings):
    settings.DATABASES['postgres']['PASSWORD'] = 'hunter2'
    path = tmp_path / 'run.log'
    runner = phases.PhaseRunner(phases.Deadline(60), log_path=path,
                                name='test-run')
    with runner:
        with runner.phase('one') as record:
            record['detail'] = 'postgres://u:hunter2@h/db'
        runner.warn('password hunter2 in a warning')
    text = path.read_text()
    assert 'hunter2' not in text
    assert 'phase-start=one' in text and 'phase=one status=ok' in text
    assert 'warning: password *** in a warning' in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert runner.logger.name == 'anthias_rollback.test-run'
    assert runner.logger.handlers == []


HUGE = '1' * 30
BAD_VALUES = [
    ('backup_database', ['--retention-days', HUGE]),
    ('backup_database', ['--retention-days', 'nan']),
    ('backup_database', ['--timeout', '-1']),
    ('backup_database', ['--source-db', BAD_BYTES]),
    ('rollback_readiness', ['--max-age-hours', 'nan']),
    ('rollback_readiness', ['--max-age-hours', '-1']),
    ('rollback_migration', ['--timeout-minutes', 'nan']),
    ('rollback_migration', ['--timeout-minutes', '1e308']),
    ('rollback_migration', ['--timeout-minutes', '0']),
    ('rollback_migration', ['--backup-path', BAD_BYTES]),
    ('rollback_drill', ['--timeout-minutes', 'inf']),
    ('migrate_to_postgres', ['--batch-size', HUGE]),
    ('validate_migration', ['--sqlite-db', BAD_BYTES]),
    ('validate_migration', ['--min-integrity', 'nan']),
    ('monitor_migration', ['--interval', 'nan']),
    ('monitor_migration', ['--max-probes', HUGE]),
]


@pytest.mark.parametrize('name, args', BAD_VALUES)
def test_bad_option_value_is_exit_2_one_line_nothing_changed(
        host_env, data_dir, name, args):
    done = run_manage(host_env, name, *args)
    assert done.returncode == exit_codes.USAGE, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert 'Traceback' not in done.stderr
    assert f'argument {args[0]}: ' in done.stderr
    assert done.stdout == ''
    assert list(data_dir.iterdir()) == []


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_report_option_and_deprecated_json_path(host_env, tmp_path):
    report = tmp_path / 'r' / 'migrate.json'
    done = run_manage(host_env, 'migrate_to_postgres', '--dry-run',
                      '--json', str(report))
    assert done.returncode == 0, done.stderr
    assert '--json PATH is deprecated' in done.stderr
    assert done.stdout.splitlines()[-1].startswith('plan: ')
    data = json.loads(report.read_text())
    assert data['ok'] is True and data['schema_version'] == 1
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    # --report on a failure: the same document, with the failure.
    report = tmp_path / 'verify.json'
    done = run_manage(host_env, 'backup_database', '--verify',
                      '/nonexistent.db', '--report', str(report))
    assert done.returncode == 1
    data = json.loads(report.read_text())
    assert data['ok'] is False and data['exit_code'] == 1
    assert data['error'] == done.stdout.splitlines()[-1]
    # The monitor keeps its stream under --json-lines.
    done = run_manage(host_env, 'monitor_migration', '--interval', '0.01',
                      '--max-probes', '2', '--json-lines')
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)['event'] for line in done.stdout.splitlines()]
    assert kinds == ['probe', 'probe', 'result']
