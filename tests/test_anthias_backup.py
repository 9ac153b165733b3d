"""Anthias's own backup (/api/v2/backup, "Get backup") and restore
("Recover") carry our files along: what restoring one does to the profile.

Anthias (src/anthias_server/lib/backup_helper.py) tars $HOME/.anthias
and $HOME/anthias_assets whole, with no excludes, and its recover()
extracts every regular file and directory under those two names over
$HOME (tarfile, `filter='data'`), adding and overwriting, never deleting.
`archive` and `recover` below do the same with the standard library.
"""
import json
import sqlite3
import tarfile
from pathlib import Path

from anthias_rollback import locking, profiles
from anthias_rollback.window import cutover as window_cutover
from tests.conftest import run_manage

DIRECTORIES = ('.anthias', 'anthias_assets')


def archive(home: Path, target: Path) -> Path:
    with tarfile.open(target, 'w:gz', compresslevel=1) as tar:
        for name in DIRECTORIES:
            tar.add(home / name, arcname=name)
    return target


def recover(archive_path: Path, home: Path) -> None:
    with tarfile.open(archive_path, 'r:gz') as tar:
        for member in tar.getmembers():
            assert member.name.split('/')[0] in DIRECTORIES
            assert member.isfile() or member.isdir()
            tar.extract(member, path=home, filter='data')


def device(root: Path, rows: list[str]) -> Path:
    """A device's $HOME: .anthias with a live SQLite file holding
    *rows*, anthias_assets. Returns the data dir."""
    data = root / '.anthias'
    data.mkdir(parents=True)
    (root / 'anthias_assets').mkdir()
    conn = sqlite3.connect(data / 'anthias.db')
    with conn:
        conn.execute('CREATE TABLE assets (name TEXT)')
        conn.executemany('INSERT INTO assets VALUES (?)',
                         [(r,) for r in rows])
    conn.close()
    return data


def names(data_dir: Path) -> list[str]:
    conn = sqlite3.connect(f'file:{data_dir / "anthias.db"}?mode=ro',
                           uri=True)
    try:
        return [r[0] for r in conn.execute('SELECT name FROM assets')]
    finally:
        conn.close()


def test_archive_takes_every_file_of_ours(tmp_path):
    """What an Anthias backup holds of ours: all of the data dir."""
    data = device(tmp_path / 'a', ['a1'])
    profiles.write_active_profile(data, 'postgres')
    ours = [profiles.STATE_FILE_NAME, window_cutover.RECORD_NAME,
            locking.LOCK_FILE_NAME, 'rollback_state.json', 'rollback.log',
            'monitor_baseline.json', 'backups/anthias_backup_x.db',
            'reports/rollback_x.json', 'drills/history.jsonl',
            'standby/standby.db', 'anthias.db.pre-rollback-x']
    for name in ours[1:]:
        (data / name).parent.mkdir(exist_ok=True)
        (data / name).write_text('x')
    with tarfile.open(archive(tmp_path / 'a', tmp_path / 'b.tar.gz')) as tar:
        members = set(tar.getnames())
    assert {f'.anthias/{name}' for name in ours} <= members


def test_restored_on_another_device_the_profile_is_not_obeyed(
        tmp_path, host_env):
    """Device A is on postgres; its backup is restored on device B, which
    runs on SQLite. B kept running on A's decision (postgres, B's own
    server or none). Now B runs on sqlite and every check and command
    says, in one line, that the state file is a copy and what to do."""
    a = device(tmp_path / 'a', ['a1', 'a2'])
    profiles.write_active_profile(a, 'postgres')
    backup = archive(tmp_path / 'a', tmp_path / 'anthias-backup.tar.gz')
    b = device(tmp_path / 'b', ['b1'])
    recover(backup, tmp_path / 'b')
    state = profiles.state_file_path(b)
    assert json.loads(state.read_text())['profile'] == 'postgres'
    assert names(b) == ['a1', 'a2']   # Anthias's restore: A's content
    restored = (b / 'anthias.db').read_bytes()

    env = dict(host_env, ANTHIAS_DATA_DIR=str(b),
               ANTHIAS_SQLITE_PATH=str(b / 'anthias.db'))
    done = run_manage(env, 'shell', '--no-imports', '-c',
                      'from django.db import connections; '
                      'print(connections["default"].vendor)')
    assert (done.returncode, done.stdout.strip()) == (0, 'sqlite'), \
        done.stderr
    done = run_manage(env, 'check')
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr
    assert 'anthias_rollback.E001' in done.stderr
    assert f'profile state file {state} is a copy' in done.stderr
    done = run_manage(env, 'switch_database', '--show')
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'is a copy' in lines[0], done.stderr
    assert "its profile 'postgres'" in lines[0]
    assert 'delete it to run on sqlite' in lines[0]
    assert (b / 'anthias.db').read_bytes() == restored

    # The fix for a device that runs on SQLite: delete the copy.
    state.unlink()
    done = run_manage(env, 'check')
    assert done.returncode == 0, done.stderr
    done = run_manage(env, 'switch_database', '--show')
    assert done.returncode == 0, done.stderr
    assert 'active profile: sqlite (from default' in done.stdout
    assert (b / 'anthias.db').read_bytes() == restored


def test_restore_over_a_device_with_its_own_state_file(tmp_path):
    """B had switched itself (its own file, its own inode): the restore
    truncates that file in place and writes A's content into it."""
    a = device(tmp_path / 'a', ['a1'])
    profiles.write_active_profile(a, 'postgres')
    backup = archive(tmp_path / 'a', tmp_path / 'backup.tar.gz')
    b = device(tmp_path / 'b', ['b1'])
    own = profiles.write_active_profile(b, 'sqlite')
    inode = own.stat().st_ino
    recover(backup, tmp_path / 'b')
    assert own.stat().st_ino == inode
    dbs = profiles.build_databases(data_dir=b, env={})
    assert dbs['default']['ENGINE'].endswith('sqlite3')
    assert 'is a copy' in dbs['default'][profiles.PROFILE_PROBLEM_KEY]


def test_restore_on_the_same_device(tmp_path):
    """Its own backup, profile unchanged since: the same file, obeyed.
    After a later switch, an older backup's decision is refused."""
    a = device(tmp_path / 'a', ['a1'])
    profiles.write_active_profile(a, 'postgres')
    backup = archive(tmp_path / 'a', tmp_path / 'backup.tar.gz')
    recover(backup, tmp_path / 'a')
    assert profiles.resolve_active_profile(a, {}).name == 'postgres'

    profiles.write_active_profile(a, 'sqlite')   # a rollback, say
    recover(backup, tmp_path / 'a')
    dbs = profiles.build_databases(data_dir=a, env={})
    assert dbs['default']['ENGINE'].endswith('sqlite3')
    assert "its profile 'postgres'" in dbs['default'][
        profiles.PROFILE_PROBLEM_KEY]
