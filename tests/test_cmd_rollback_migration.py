import json
import os
import pty
import subprocess
import sys

import pytest
from django.db import connections

from anthias_rollback import profiles
from tests.conftest import ROOT, postgres_stopped, run_manage
from tests.helpers.rollback import (
    fingerprint_postgres,
    fingerprint_sqlite,
    normalise,
    seed_device,
    write_on_postgres,
)

ALL = ['default', 'sqlite', 'postgres']


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_real_process_exit_codes_and_json(data_dir, settings, host_env):
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    done = run_manage(host_env, 'rollback_migration', '--timeout-minutes',
                      '0')
    assert done.returncode == 2
    assert 'must be greater than 0' in done.stderr
    done = run_manage(host_env, 'rollback_migration', '--source', 'backup',
                      '--backup-path', str(data_dir / 'nope.db'), '--yes')
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        'CommandError: backup ')
    assert 'Traceback' not in done.stderr
    # Unattended without --yes/--emergency: refused, nothing changed.
    done = run_manage(host_env, 'rollback_migration')
    assert done.returncode == 1
    assert 'unattended' in done.stderr
    done = run_manage(host_env, 'rollback_migration', '--emergency',
                      '--json')
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result['outcome'] == 'rolled back'
    assert result['source'] == 'postgres'
    connections['postgres'].close()
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_password_never_printed_with_runbook_flags(data_dir, settings,
                                                   host_env):
    seed_device(settings)
    connections['sqlite'].close()
    done = run_manage(host_env, 'rollback_migration', '--emergency',
                      '--source', 'postgres', '--postgres-host',
                      '127.0.0.1', '--postgres-port', '1',
                      '--postgres-password', 'hunter2')
    assert done.returncode == 1
    assert 'hunter2' not in done.stdout + done.stderr
    assert '127.0.0.1:1' in done.stderr
    assert 'visible to other users' in done.stderr
    for report in (data_dir / 'reports').glob('*'):
        assert 'hunter2' not in report.read_text()
    log = (data_dir / 'rollback.log').read_text()
    assert 'hunter2' not in log
    connections['postgres'].close()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_verbose_rollback_prints_a_line_per_copied_model(data_dir, settings,
                                                         host_env):
    # The copy's per-model events reach the command (they once went
    # missing: 'model_done' sent, 'model-done' listened for).
    device = seed_device(settings, n_assets=12)
    write_on_postgres(device)
    connections['sqlite'].close()
    done = run_manage(host_env, 'rollback_migration', '--emergency', '-v2',
                      '--full')
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    done_lines = [line for line in lines
                  if line.startswith('  anthias_app.Asset: 12 rows in ')]
    assert len(done_lines) == 1, lines
    # -v2 also shows the batches
    assert '  anthias_app.Asset: 12/12 rows' in done.stdout
    assert any(line.startswith('-> build') for line in lines)
    assert any(line.startswith('  auth.User: ') for line in lines)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_report_of_a_refused_run_is_never_resolved_and_notice_names_who(
        data_dir, settings, host_env):
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    done = run_manage(host_env, 'rollback_migration', '--emergency',
                      '--source', 'backup', '--backup-path',
                      str(data_dir / 'nope.db'))
    assert done.returncode == 1
    shown = run_manage(host_env, 'rollback_migration', '--generate-report')
    assert 'Rollback Completed' not in shown.stdout
    assert 'NOT RESOLVED' in shown.stdout and 'failed' in shown.stdout
    done = run_manage(host_env, 'rollback_migration', '--emergency',
                      '--trigger', 'monitor_migration: error rate 40 %')
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Triggered by: monitor_migration: error rate 40 %' in done.stdout
    shown = run_manage(host_env, 'rollback_migration', '--generate-report')
    assert 'RESOLVED: Database Migration Rollback Completed' in shown.stdout
    # A deploy hook's rerun: exit 0, one line, nothing redone.
    again = run_manage(host_env, 'rollback_migration', '--emergency')
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip().startswith('already on SQLite since ')
    assert 'URGENT' not in again.stdout
    # Under --json, stdout holds the JSON document alone.
    again = run_manage(host_env, 'rollback_migration', '--emergency',
                       '--json')
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)['already'] is True


def prompted(env: dict, answer: str) -> subprocess.CompletedProcess:
    """rollback_migration on a terminal (a pty as stdin), answering."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / 'manage.py'), 'rollback_migration'],
            env=env, cwd=ROOT, stdin=follower, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        os.write(leader, answer.encode() + b'\n')
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_prompt_states_the_facts_and_no_changes_nothing(
        data_dir, settings, host_env):
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    before = fingerprint_sqlite(device.live)
    done = prompted(host_env, 'n')
    assert done.returncode == 1, done.stdout + done.stderr
    facts = done.stdout
    assert 'About to roll back onto SQLite:' in facts
    assert f'live file:   {device.live}' in facts
    assert 'source:      postgres (' in facts
    # write_on_postgres: 3 asset writes, a user created, one changed.
    assert 'new file:    incremental: the cutover file as of' in facts
    assert 'plus 5 journal entries' in facts
    assert 'from the fence on it refuses every write' in facts
    assert 'data loss:   none expected' in facts
    # (A pipe, not the terminal, gets the prompt: no echoed newline.)
    assert done.stdout.strip().splitlines()[-1].endswith(
        'cancelled; nothing changed')
    assert fingerprint_sqlite(device.live) == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    done = prompted(host_env, 'y')
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'ROLLED BACK' in done.stdout.strip().splitlines()[-1]


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_prompt_names_the_backup_and_its_loss(data_dir, settings,
                                                  host_env):
    device = seed_device(settings)
    connections['sqlite'].close()
    with postgres_stopped():
        done = prompted(host_env, 'no')
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'source:      backup (PostgreSQL not usable' in done.stdout
    assert f'new file:    backup {device.backup}' in done.stdout
    assert 'data loss:   every write since the backup was taken' in \
        done.stdout


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_rerun_after_a_failed_follow_up_answers_with_that_result(
        data_dir, settings, host_env):
    """Post-verification failed (a URL that 404s): exit 4, the swap
    stays. A hook's retry gets the same answer and exit 4, not 'nothing
    to roll back' (exit 1) and not a second rollback."""
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    env = dict(host_env, ANTHIAS_ROLLBACK_VERIFY_URLS='/no-such-page/')
    done = run_manage(env, 'rollback_migration', '--emergency')
    assert done.returncode == 4, done.stdout + done.stderr
    assert '/no-such-page/ -> HTTP 404' in done.stdout + done.stderr
    after = fingerprint_sqlite(device.live)
    again = run_manage(env, 'rollback_migration', '--emergency')
    assert again.returncode == 4, again.stdout + again.stderr
    last = again.stdout.strip().splitlines()[-1]
    assert last.startswith('already on SQLite since'), last
    assert 'URGENT' not in again.stdout
    assert fingerprint_sqlite(device.live) == after


@pytest.mark.django_db(databases=['default', 'sqlite', 'postgres'],
                       transaction=True)
def test_a_device_that_never_left_sqlite_has_nothing_to_roll_back(
        data_dir, host_env):
    """Idempotent for deploy hooks: exit 0, one line, no banner, and a
    JSON document saying nothing happened."""
    import json

    from tests.conftest import run_manage

    done = run_manage(host_env, 'rollback_migration', '--emergency')
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines() == [
        ('already on sqlite (profile from default), nothing to roll back; '
        'nothing changed')]
    assert 'URGENT' not in done.stdout + done.stderr
    as_json = run_manage(host_env, 'rollback_migration', '--emergency',
                         '--json')
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data['ok'] and data['exit_code'] == 0
    assert data['loss'] == 'none' and data['source'] is None
    assert data['data_loss']['status'] == 'none'
    assert data['data_loss']['detail'].startswith('nothing happened')
    assert not (data_dir / 'reports').exists()
