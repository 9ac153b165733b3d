"""Every verdict the rollback prints can fail, in real processes:

- "data loss: none (proven ...)" rests on three checks (journal, row
  versions, row counts); each is made to fail here on its own;
- a cutover without a journal is "not proven", exit 4;
- the fence: refused when a writer stays open past the budget and cannot
  be ended (another role's session), lowered after the refusal, a writer
  of our own role ended with pg_terminate_backend, lifted by
  `switch_database --to postgres`, and `end_rollback_window` refuses
  while it is up;
- no password in any output, log or report, against a server that
  checks a real password (the suite's server trusts everyone).
"""
import contextlib
import json
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import psycopg2
import pytest
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback import profiles
from anthias_rollback.window import journal as window_journal
from tests.conftest import ROOT, run_manage
from tests.helpers.pg import pg_session
from tests.helpers.rollback import file_digest, seed_device

ALL = ['default', 'sqlite', 'postgres']
ROLE = 'anthias_pw_role'
# Distinctive, with characters a URL must encode.
PASSWORD = 'Pw-9f3@zQ!x'


@contextlib.contextmanager
def password_role(superuser: bool = False):
    """A role that must give its password (scram): pg_hba gets a rule for
    it ahead of the server's trust rules. Not a superuser unless asked
    (a superuser owns the window's tables as the app's role does)."""
    admin = pg_session()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('SHOW hba_file')
        hba = Path(cur.fetchone()[0])
        cur.execute(f'DROP ROLE IF EXISTS {ROLE}')
        cur.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s"
                    + (' SUPERUSER' if superuser else ''), [PASSWORD])
        cur.execute(f'GRANT pg_read_all_data, pg_write_all_data TO {ROLE}')
        cur.execute(f'GRANT ALL ON SCHEMA public TO {ROLE}')
    before = hba.read_text()
    rules = (f'local all {ROLE} scram-sha-256\n'
             f'host all {ROLE} all scram-sha-256\n')
    hba.write_text(rules + before)
    with admin.cursor() as cur:
        cur.execute('SELECT pg_reload_conf()')
    try:
        yield
    finally:
        hba.write_text(before)
        with admin.cursor() as cur:
            cur.execute('SELECT pg_reload_conf()')
            cur.execute('SELECT pg_terminate_backend(pid) FROM '
                        'pg_stat_activity WHERE usename = %s', [ROLE])
            cur.execute(f'REVOKE ALL ON SCHEMA public FROM {ROLE}')
            cur.execute(f'REVOKE pg_read_all_data, pg_write_all_data '
                        f'FROM {ROLE}')
            cur.execute(f'DROP OWNED BY {ROLE}')
            cur.execute(f'DROP ROLE {ROLE}')
        admin.close()


def role_url(password: str = PASSWORD) -> str:
    s = connections['postgres'].settings_dict
    auth = f'{ROLE}:{urllib.parse.quote(password, safe="")}@'
    host = s.get('HOST') or ''
    if host.startswith('/'):
        return (f'postgresql://{auth}/{s["NAME"]}?'
                + urllib.parse.urlencode({'host': host}))
    return f'postgresql://{auth}{host}:{s["PORT"]}/{s["NAME"]}'


def everything_written(data_dir: Path, *outputs: str) -> str:
    """Every output and every file the tool wrote under *data_dir*."""
    texts = list(outputs)
    for path in data_dir.rglob('*'):
        if path.is_file():
            texts.append(path.read_bytes().decode('utf-8', 'replace'))
    return '\n'.join(texts)


def start_rollback(env, *args):
    return subprocess.Popen(
        [sys.executable, str(ROOT / 'manage.py'), 'rollback_migration',
         '--emergency', '--yes', *args], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(flag: Path, proc, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, 'the pause was never reached'
        time.sleep(0.05)


def paused_env(host_env, data_dir, point):
    flag = data_dir / 'paused.flag'
    return dict(host_env, ANTHIAS_ROLLBACK_PAUSE_AT=f'{point}:5',
                ANTHIAS_ROLLBACK_PAUSED_FLAG=str(flag)), flag


# --- the proof's three checks, each failing alone ---------------------------

@pytest.mark.django_db(databases=ALL, transaction=True)
def test_no_fence_a_journaled_write_during_the_copy_is_named_by_the_journal(
        data_dir, settings, host_env):
    """--no-fence: an ordinary write lands while the copy runs; only the
    journal check names its operation ('update'); exit 4."""
    device = seed_device(settings)
    connections['sqlite'].close()
    env, flag = paused_env(host_env, data_dir,
                           'rollback:copied-anthias_app.Asset')
    proc = start_rollback(env, '--full', '--no-fence')
    wait_for(flag, proc)
    target = device.asset_ids[4]
    writer = pg_session()
    writer.autocommit = True
    with writer.cursor() as cur:
        cur.execute("UPDATE assets SET name = 'late' WHERE asset_id = %s",
                    [target])
    writer.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, out + err
    last = out.strip().splitlines()[-1]
    assert f'anthias_app.Asset pk={target} update' in last, last
    assert 'data loss: 1 write(s) not in SQLite' in last


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_delete_that_bypassed_the_triggers_is_caught_by_the_row_counts(
        data_dir, settings, host_env):
    """A delete made with the triggers off leaves no journal entry and no
    row version to see: only the row-count comparison catches it."""
    device = seed_device(settings)
    connections['sqlite'].close()
    env, flag = paused_env(host_env, data_dir,
                           'rollback:copied-anthias_app.Asset')
    proc = start_rollback(env, '--full')
    wait_for(flag, proc)
    sneaky = pg_session()
    sneaky.autocommit = True
    with sneaky.cursor() as cur:
        cur.execute('SET session_replication_role = replica')
        cur.execute('DELETE FROM assets WHERE asset_id = %s',
                    [device.asset_ids[5]])
    sneaky.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, out + err
    last = out.strip().splitlines()[-1]
    assert 'anthias_app.Asset: 30 rows copied, 29 on PostgreSQL' in last, \
        last


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_cutover_without_the_journal_is_not_proven_exit_4(
        data_dir, settings, host_env):
    seed_device(settings)
    # The journal removed (end_rollback_window --force), the profile left
    # on PostgreSQL: what a cutover made without a journal looks like.
    done = run_manage(host_env, 'end_rollback_window', '--force')
    assert done.returncode == 0, done.stdout + done.stderr
    assert not window_journal.window_state('postgres').installed
    connections['sqlite'].close()
    done = run_manage(host_env, 'rollback_migration', '--emergency',
                      '--yes')
    assert done.returncode == 4, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert 'not proven: PostgreSQL has no change journal' in last, last
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'


# --- the fence ---------------------------------------------------------------

@pytest.mark.django_db(databases=ALL, transaction=True)
def test_an_unendable_writer_refuses_the_rollback_and_lowers_the_fence(
        data_dir, settings, host_env):
    """The rollback runs as a non-superuser role; a superuser's session
    holds an uncommitted write past the budget and cannot be ended by
    that role: refused, exit 1, nothing changed, the fence lowered."""
    device = seed_device(settings)
    connections['sqlite'].close()
    before = file_digest(device.live)
    holder = pg_session()
    with password_role():
        with holder.cursor() as cur:
            cur.execute("UPDATE assets SET name = 'held' WHERE asset_id = %s",
                        [device.asset_ids[0]])
        env = dict(host_env, ANTHIAS_POSTGRES_URL=role_url())
        # A 6 s deadline: the fence's budget is a third of it.
        done = run_manage(env, 'rollback_migration', '--emergency', '--yes',
                          '--timeout-minutes', '0.1')
        holder.rollback()
        holder.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'hold uncommitted writes' in done.stderr, done.stderr
    assert 'nothing was changed' in done.stderr
    assert file_digest(device.live) == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    assert window_journal.window_state('postgres').fence == 'open'
    # Writes go through again.
    connections['postgres'].close()
    Asset.objects.using('postgres').filter(
        pk=device.asset_ids[1]).update(name='after the refusal')


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_writer_of_our_own_role_is_ended_and_its_write_is_not_kept(
        data_dir, settings, host_env):
    device = seed_device(settings)
    connections['sqlite'].close()
    with password_role():
        holder = psycopg2.connect(role_url())
        with holder.cursor() as cur:
            cur.execute("UPDATE assets SET name = 'held' WHERE asset_id = %s",
                        [device.asset_ids[0]])
        env = dict(host_env, ANTHIAS_POSTGRES_URL=role_url())
        done = run_manage(env, 'rollback_migration', '--emergency', '--yes',
                          '--timeout-minutes', '0.2', '--json')
        with pytest.raises(psycopg2.Error), holder.cursor() as cur:
            cur.execute('SELECT 1')
        holder.close()
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    fence = next(p for p in data['phases'] if p['name'] == 'fence')
    assert 'ended 1 session(s)' in fence['detail'], fence
    assert Asset.objects.using('sqlite').get(
        pk=device.asset_ids[0]).name != 'held'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_fence_stays_until_switch_to_postgres_and_blocks_ending_the_window(
        data_dir, settings, host_env):
    seed_device(settings)
    connections['sqlite'].close()
    done = run_manage(host_env, 'rollback_migration', '--emergency', '--yes')
    assert done.returncode == 0, done.stdout + done.stderr
    assert window_journal.window_state('postgres').fence == 'up'
    ended = run_manage(host_env, 'end_rollback_window')
    assert ended.returncode == 1
    assert 'the active profile is sqlite' in ended.stderr
    # Even run as if on PostgreSQL (the variable overrides the state
    # file), the fence keeps the window.
    ended = run_manage(dict(host_env, ANTHIAS_DB_PROFILE='postgres'),
                       'end_rollback_window')
    assert ended.returncode == 1
    assert 'the write fence is up' in ended.stderr
    assert window_journal.window_state('postgres').installed
    # Back to PostgreSQL: the copy first (SQLite took no write, so the
    # switch's checks pass), then the switch opens a new window.
    switched = run_manage(host_env, 'switch_database', '--to', 'postgres')
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert window_journal.window_state('postgres').fence == 'open'
    connections['postgres'].close()
    Asset.objects.using('postgres').update(play_order=3)


# --- secrets -----------------------------------------------------------------

@pytest.mark.django_db(databases=ALL, transaction=True)
def test_no_password_anywhere_on_the_success_paths(data_dir, settings,
                                                   host_env):
    """validate, a rollback with --preserve-postgres (pg_dump gets the
    password too), and switching back, all as a role whose password the
    server checks: the password is in no output, log, report or dump."""
    seed_device(settings)
    connections['sqlite'].close()
    outputs = []
    with password_role(superuser=True):
        env = dict(host_env, ANTHIAS_POSTGRES_URL=role_url())
        wrong = run_manage(dict(env, ANTHIAS_POSTGRES_URL=role_url('nope')),
                           'validate_migration')
        # The server really checks it: a wrong one is refused.
        assert wrong.returncode == 1
        assert 'password authentication failed' in wrong.stderr
        for args in (('validate_migration',),
                     ('rollback_migration', '--emergency', '--yes',
                      '--preserve-postgres'),
                     ('switch_database', '--to', 'postgres')):
            done = run_manage(env, *args)
            assert done.returncode == 0, (args, done.stdout + done.stderr)
            outputs += [done.stdout, done.stderr]
    written = everything_written(data_dir, *outputs)
    assert 'pg_dump' in written          # the dump's path was reported
    assert PASSWORD not in written
    assert urllib.parse.quote(PASSWORD, safe='') not in written


# --- a journal broken by hand -----------------------------------------------

@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_dropped_journal_table_is_detected_and_repaired(data_dir, settings,
                                                         host_env):
    """Dropping anthias_rb_journal by hand makes every app write fail
    (the triggers write into it). Readiness says so, not ready; then
    end_rollback_window removes the triggers and writes go through."""
    device = seed_device(settings)
    admin = pg_session()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('DROP TABLE anthias_rb_journal')
    connections['postgres'].close()
    with pytest.raises(Exception, match='anthias_rb_journal'):
        Asset.objects.using('postgres').filter(
            pk=device.asset_ids[0]).update(name='x')
    connections['postgres'].close()
    ready = run_manage(host_env, 'rollback_readiness')
    assert ready.returncode == 3, ready.stdout + ready.stderr
    assert 'the change journal is broken' in ready.stdout
    done = run_manage(host_env, 'end_rollback_window')
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith('REPAIRED')
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE "
                    "'anthias_rb_%'")
        assert cur.fetchone()[0] == 0
    admin.close()
    Asset.objects.using('postgres').filter(
        pk=device.asset_ids[0]).update(name='writes again')
    state = window_journal.window_state('postgres')
    assert not state.installed and state.problems == ()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_planned_table_without_its_trigger_is_named_by_readiness(
        data_dir, settings, host_env):
    seed_device(settings)
    admin = pg_session()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute('ALTER TABLE assets DISABLE TRIGGER anthias_rb_journal')
    admin.close()
    ready = run_manage(host_env, 'rollback_readiness')
    assert ready.returncode == 3, ready.stdout + ready.stderr
    assert ('1 planned table(s) without the journal trigger (assets)'
            in ready.stdout), ready.stdout
