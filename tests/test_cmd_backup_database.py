"""backup_database: the command around backup.py, on the test databases."""
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from anthias_rollback import backup
from tests.conftest import run_manage
from tests.helpers import backup as bh
from tests.helpers.factories import AssetFactory, UserFactory


def command(*args):
    out, err = StringIO(), StringIO()
    call_command('backup_database', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def refused(*args):
    with pytest.raises(CommandError) as excinfo:
        command(*args)
    return excinfo.value


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_backup_of_the_live_database(data_dir):
    AssetFactory.create_batch(7)
    UserFactory.create_batch(2)
    out, _ = command()
    path = data_dir / 'backups' / out.splitlines()[-1].split('/')[-1]
    assert out.splitlines()[-1] == str(path)
    assert 'rows in' in out and 'sha256' in out
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    manifest = backup.read_manifest(path)
    assert manifest['row_counts']['assets'] == 7
    assert manifest['row_counts']['auth_user'] == 2
    assert 'anthias_app.0001_initial' in manifest['migrations']
    assert manifest['source_path'] == \
        connections['sqlite'].settings_dict['NAME']
    out, _ = command('--verify', str(path))
    assert out.startswith('valid: ')
    out, _ = command('-v2', '--backup-dir', str(data_dir / 'timed'))
    assert '] copy' in out and '] verify' in out
    # Verbosity 0 prints the path alone.
    out, _ = command('-v0', '--backup-dir', str(data_dir / 'other'))
    assert out.strip().startswith(str(data_dir / 'other'))
    assert len(out.splitlines()) == 1


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_verify_bad_backups_exit_3_and_unreadable_exit_1(data_dir,
                                                         tmp_path):
    AssetFactory.create_batch(3)
    path = backup.create_backup(
        backup.Path(connections['sqlite'].settings_dict['NAME']),
        data_dir / 'backups').path
    flip_byte(path)
    err = refused('--verify', str(path))
    assert err.returncode == 3
    assert 'sha256 checksum mismatch' in str(err)
    assert str(err).startswith('invalid: ')
    with open(path, 'r+b') as fh:
        fh.truncate(4096)
    assert refused('--verify-only', str(path)).returncode == 3
    backup.manifest_path_for(path).unlink()
    err = refused('--verify', str(path))
    assert err.returncode == 3 and 'unverified' in str(err)
    err = refused('--verify', str(tmp_path / 'missing.db'))
    assert err.returncode == 1 and 'missing.db' in str(err)


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_list_and_json(data_dir):
    AssetFactory.create_batch(2)
    first = command('-v0')[0].strip()
    second = command('-v0')[0].strip()
    flip_byte(backup.Path(first))
    out, _ = command('--list')
    lines = out.splitlines()
    assert lines[0].startswith(os.path.basename(second))
    assert 'verified' in lines[0] and 'assets=2' in lines[0]
    assert 'invalid (sha256 checksum mismatch' in lines[1]
    assert lines[-1].startswith('2 backup(s) in ')
    assert lines[-1].endswith(f'1 verified; newest {second}')
    listed = json.loads(command('--list', '--json')[0])['backups']
    assert [b['state'] for b in listed] == ['verified', 'invalid']
    assert listed[0]['row_counts']['assets'] == 2
    made = json.loads(command('--json')[0])
    assert made['path'].startswith(str(data_dir / 'backups'))
    assert made['manifest']['row_counts']['assets'] == 2


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_retention_after_backup(data_dir):
    old = command('-v0')[0].strip()
    manifest = backup.read_manifest(backup.Path(old))
    manifest['created_at'] = '2000-01-01T00:00:00+00:00'
    backup.manifest_path_for(backup.Path(old)).write_text(
        json.dumps(manifest))
    out, _ = command('--retention-days', '7')
    assert f'removed old {old}' in out
    assert not os.path.exists(old)
    assert os.path.exists(out.splitlines()[-1])
    assert refused('--retention-days', '-1').returncode == 2


@pytest.mark.django_db(databases=['sqlite'])
def test_bad_sources_fail_with_one_line(data_dir, tmp_path, readonly_dir):
    garbage = tmp_path / 'garbage.db'
    garbage.write_bytes(os.urandom(4096))
    for source, words in ((tmp_path / 'nope.db', 'does not exist'),
                          (garbage, 'not a SQLite database')):
        err = refused('--source-db', str(source))
        assert err.returncode == 1 and words in str(err)
        assert '\n' not in str(err)
    live = bh.make_plain_db(tmp_path / 'live.db')
    err = refused('--source-db', str(live), '--backup-dir',
                  str(readonly_dir))
    assert err.returncode == 1 and 'not writable' in str(err)
    assert not (data_dir / 'backups').exists()


@pytest.mark.django_db(databases=['sqlite'], transaction=True)
def test_subprocess_exit_codes_with_a_live_writer(host_env, tmp_path):
    db = bh.make_writer_db(tmp_path / 'live.db')
    log = tmp_path / 'writer.log'
    writer = bh.start_writer(db, log)
    paths = []
    try:
        for _ in range(3):
            done = run_manage(host_env, 'backup_database', '--source-db',
                              str(db))
            assert done.returncode == 0, done.stderr
            paths.append(done.stdout.splitlines()[-1])
    finally:
        bh.stop_writer(writer)
    committed, _, _ = bh.read_log(log)
    for path in paths:
        done = run_manage(host_env, 'backup_database', '--verify', path)
        assert done.returncode == 0, done.stderr
        groups, counter = bh.backup_content(path)
        assert set(groups) == {s for s in committed if s <= counter}
    flip_byte(backup.Path(paths[0]))
    done = run_manage(host_env, 'backup_database', '--verify', paths[0])
    assert done.returncode == 3
    assert 'sha256 checksum mismatch' in done.stderr
    done = run_manage(host_env, 'backup_database', '--verify',
                      str(tmp_path / 'missing.db'))
    assert done.returncode == 1
    done = run_manage(host_env, 'backup_database', '--retention-days', 'x')
    assert done.returncode == 2


@pytest.mark.django_db(databases=['sqlite'])
@pytest.mark.parametrize('point', ['backup:after-copy',
                                   'backup:before-rename'])
def test_killed_mid_backup_leaves_no_final_name(host_env, tmp_path, point):
    live = bh.make_plain_db(tmp_path / 'live.db')
    before = live.read_bytes()
    backups = tmp_path / 'backups'
    env = dict(host_env, ANTHIAS_ROLLBACK_KILL_AT=point)
    done = run_manage(env, 'backup_database', '--source-db', str(live),
                      '--backup-dir', str(backups))
    assert done.returncode == -9
    assert not [n for n in os.listdir(backups)
                if n.startswith('anthias_backup_')]
    assert backup.list_backups(backups) == []
    assert live.read_bytes() == before
    # The crashed run's temp files go with a retention pass an hour on.
    assert backup.apply_retention(backups, days=0) == []
    later = datetime.now(UTC) + timedelta(hours=2)
    assert backup.apply_retention(backups, days=0, now=later)
    assert os.listdir(backups) == []


@pytest.mark.django_db(databases=['default', 'sqlite'], transaction=True)
def test_a_missing_source_db_is_refused_not_replaced_by_the_live_file(
        data_dir, host_env, tmp_path):
    missing = tmp_path / 'mistyped.db'
    done = run_manage(host_env, 'backup_database', '--source-db',
                      str(missing))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f'SQLite file {missing} does not exist' in done.stderr
    assert not (data_dir / 'backups').exists() or not any(
        (data_dir / 'backups').iterdir())
