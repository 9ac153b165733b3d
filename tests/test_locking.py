"""locking.py: one operation at a time, across processes, crash-safe."""
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from anthias_rollback import locking
from anthias_rollback.exceptions import LockHeldError
from tests.conftest import ROOT

HOLDER = '''
import sys, time
from anthias_rollback.locking import operation_lock
with operation_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
'''


@pytest.fixture
def child_holder(tmp_path):
    """Start a real child process holding the lock; yields (proc, dir)."""
    started = []

    def start(data_dir, operation='rollback_migration'):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, '-c', HOLDER, str(data_dir), operation],
            env=env, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        started.append(proc)
        line = proc.stdout.readline()
        assert line == 'held\n', proc.stderr.read()
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_free_lock_has_no_holder(tmp_path):
    assert locking.read_lock_holder(tmp_path) is None   # no file yet
    with locking.operation_lock(tmp_path, 'backup_database'):
        pass
    assert locking.lock_path(tmp_path).exists()
    assert locking.read_lock_holder(tmp_path) is None   # file, unlocked


def test_holder_recorded_while_held_and_cleared_after(tmp_path):
    data_dir = tmp_path / 'new' / 'data'   # created on demand
    with locking.operation_lock(data_dir, 'migrate_to_postgres') as path:
        assert path == locking.lock_path(data_dir)
        holder = locking.read_lock_holder(data_dir)
        assert holder['operation'] == 'migrate_to_postgres'
        assert holder['pid'] == os.getpid()
        assert holder['host'] == socket.gethostname()
        assert holder['started_at']
    assert locking.read_lock_holder(data_dir) is None
    assert path.read_text() == ''


def test_lock_file_is_0600(tmp_path):
    with locking.operation_lock(tmp_path, 'rollback_migration') as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_second_holder_in_same_process_refused(tmp_path):
    with locking.operation_lock(tmp_path, 'rollback_migration'):
        with (pytest.raises(LockHeldError) as excinfo,
              locking.operation_lock(tmp_path, 'backup_database')):
            pytest.fail('two holders at once')
        message = str(excinfo.value)
        assert 'rollback_migration' in message
        assert f'pid {os.getpid()}' in message
        # The refused attempt did not clobber the holder's record.
        assert (locking.read_lock_holder(tmp_path)['operation']
                == 'rollback_migration')


def test_released_when_block_raises(tmp_path):
    with (pytest.raises(RuntimeError),
          locking.operation_lock(tmp_path, 'rollback_migration')):
        raise RuntimeError('boom')
    assert locking.read_lock_holder(tmp_path) is None
    with locking.operation_lock(tmp_path, 'backup_database'):
        pass


def test_other_process_excluded_and_named(tmp_path, child_holder):
    proc = child_holder(tmp_path, 'rollback_migration')
    holder = locking.read_lock_holder(tmp_path)
    assert holder['operation'] == 'rollback_migration'
    assert holder['pid'] == proc.pid
    with (pytest.raises(LockHeldError) as excinfo,
          locking.operation_lock(tmp_path, 'migrate_to_postgres')):
        pytest.fail('lock taken while another process holds it')
    message = str(excinfo.value)
    assert str(locking.lock_path(tmp_path)) in message
    assert 'rollback_migration' in message
    assert f'(pid {proc.pid}, since {holder["started_at"]})' in message
    assert proc.poll() is None   # the holder was not disturbed


def test_sigkilled_holder_releases_lock(tmp_path, child_holder):
    proc = child_holder(tmp_path)
    with (pytest.raises(LockHeldError),
          locking.operation_lock(tmp_path, 'backup_database')):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    # The dead holder never cleared its record, but the kernel released
    # the flock: nobody holds it, and the next operation gets it.
    assert locking.read_lock_holder(tmp_path) is None
    with locking.operation_lock(tmp_path, 'backup_database'):
        holder = locking.read_lock_holder(tmp_path)
        assert holder['operation'] == 'backup_database'
        assert holder['pid'] == os.getpid()


def test_child_refused_while_parent_holds(tmp_path):
    """The other direction, through the real exit of a refused process."""
    code = ('import sys\n'
            'from anthias_rollback.exceptions import LockHeldError\n'
            'from anthias_rollback.locking import operation_lock\n'
            'try:\n'
            '    with operation_lock(sys.argv[1], "child"):\n'
            '        sys.exit(0)\n'
            'except LockHeldError as err:\n'
            '    print(err)\n'
            '    sys.exit(3)\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with locking.operation_lock(tmp_path, 'swap'):
        done = subprocess.run([sys.executable, '-c', code, str(tmp_path)],
                              env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert f'swap (pid {os.getpid()}' in done.stdout
    done = subprocess.run([sys.executable, '-c', code, str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


LIVE_HOLDER = '''
import sys, time
from anthias_rollback.locking import operation_lock
with operation_lock(sys.argv[1], sys.argv[2], live_path=sys.argv[3]):
    print("held", flush=True)
    time.sleep(120)
'''

LIVE_TRY = '''
import sys
from anthias_rollback.exceptions import LockHeldError
from anthias_rollback.locking import operation_lock
try:
    with operation_lock(sys.argv[1], "rollback_migration",
                        live_path=sys.argv[2]):
        sys.exit(0)
except LockHeldError as err:
    print(err)
    sys.exit(3)
'''


def test_two_data_dirs_sharing_one_live_file_are_refused(tmp_path):
    """Two real processes, two data dirs, one ANTHIAS_SQLITE_PATH: the
    per-data-dir lock let both run, and the second deleted the first's
    new file mid-swap. The live file's own lock refuses the second."""
    live_dir = tmp_path / 'shared'
    live_dir.mkdir()
    live = live_dir / 'anthias.db'
    live.write_bytes(b'')
    # The second process names the live file through a symlink: the
    # lock follows the resolved file, not the spelling.
    (tmp_path / 'alias.db').symlink_to(live)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first = subprocess.Popen(
        [sys.executable, '-c', LIVE_HOLDER, str(tmp_path / 'one'),
         'rollback_migration', str(live)], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == 'held\n', first.stderr.read()
        lock = locking.live_lock_path(live)
        assert lock == live_dir / '.anthias.db.anthias-rollback.lock'
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        for spelling in (live, tmp_path / 'alias.db'):
            done = subprocess.run(
                [sys.executable, '-c', LIVE_TRY, str(tmp_path / 'two'),
                 str(spelling)], env=env, cwd=ROOT, capture_output=True,
                text=True, timeout=60, check=False)
            assert done.returncode == 3, done.stdout + done.stderr
            assert str(lock) in done.stdout
            assert f'rollback_migration (pid {first.pid}' in done.stdout
        # The refused run left its own data dir's lock free.
        assert locking.read_lock_holder(tmp_path / 'two') is None
    finally:
        first.kill()
        first.wait(timeout=10)
        first.stdout.close()
        first.stderr.close()
    # Killed holder: the kernel released both locks.
    done = subprocess.run([sys.executable, '-c', LIVE_TRY,
                           str(tmp_path / 'two'), str(live)], env=env,
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_live_lock_without_live_folder_is_skipped(tmp_path):
    """No folder, no file to race on: the caller's own check refuses."""
    with locking.operation_lock(tmp_path, 'rollback_migration',
                                live_path=tmp_path / 'nope' / 'a.db'):
        assert not (tmp_path / 'nope').exists()
