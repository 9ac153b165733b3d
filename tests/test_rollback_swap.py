import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from anthias_rollback.exceptions import SwapError
from anthias_rollback.rollback import swap
from tests.conftest import ROOT


def make_db(path, rows, wal=True, checkpoint=True):
    conn = sqlite3.connect(path, isolation_level=None)
    if wal:
        conn.execute('PRAGMA journal_mode=WAL')
        # Keep commits in the -wal, as a live device has them.
        conn.execute('PRAGMA wal_autocheckpoint=0')
    conn.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)')
    conn.executemany('INSERT INTO t (v) VALUES (?)',
                     [(f'{rows}-{i}',) for i in range(rows)])
    return conn  # left open: its WAL holds the commits


def read_rows(path):
    conn = sqlite3.connect(path)
    try:
        assert conn.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        return conn.execute('SELECT COUNT(*) FROM t').fetchone()[0]
    finally:
        conn.close()


def test_swap_keeps_wal_commits_in_safety_copy(tmp_path):
    live, new = tmp_path / 'live.db', tmp_path / 'live.db.new'
    holder = make_db(live, 50)
    assert (tmp_path / 'live.db-wal').stat().st_size > 0
    make_db(new, 7, wal=False).close()
    result = swap.swap_in(new, live)
    holder.close()
    assert read_rows(live) == 7
    assert read_rows(result.safety_copy) == 50
    assert not new.exists()
    assert not swap.intent_path(live).exists()


def test_stale_wal_would_corrupt_without_swap(tmp_path):
    """Why the order matters: renaming over a live file whose -wal stays
    makes SQLite replay the old WAL into the new file."""
    live, new = tmp_path / 'live.db', tmp_path / 'new.db'
    holder = make_db(live, 50)
    make_db(new, 7, wal=False).close()
    wal = (tmp_path / 'live.db-wal').read_bytes()
    holder.close()
    # Simulate a naive rollback: copy of the WAL survives next to the new
    # main file (a crash before SQLite's own cleanup).
    os.replace(new, live)
    (tmp_path / 'live.db-wal').write_bytes(wal)
    conn = sqlite3.connect(live)
    try:
        result = conn.execute('SELECT COUNT(*) FROM t').fetchone()[0]
    except sqlite3.DatabaseError:
        result = 'corrupt'
    conn.close()
    assert result != 7


def test_refuses_new_file_with_side_files(tmp_path):
    live, new = tmp_path / 'live.db', tmp_path / 'n.db'
    make_db(live, 3).close()
    open_new = make_db(new, 2)  # WAL mode and still open: has -wal
    with pytest.raises(SwapError, match='has a -wal file'):
        swap.swap_in(new, live)
    open_new.close()
    assert read_rows(live) == 3


def test_refuses_other_directory(tmp_path):
    (tmp_path / 'a').mkdir()
    live, new = tmp_path / 'live.db', tmp_path / 'a' / 'n.db'
    make_db(live, 3).close()
    make_db(new, 2, wal=False).close()
    with pytest.raises(SwapError, match='same directory'):
        swap.swap_in(new, live)
    assert read_rows(live) == 3


SCRIPT = '''
import sys
from anthias_rollback.rollback import swap
swap.swap_in(sys.argv[1], sys.argv[2])
'''


@pytest.mark.parametrize('point', ['atomic-write:before-rename',
                                   'swap:intent-written',
                                   'swap:checkpointed',
                                   'swap:safety-linked',
                                   'swap:side-files-removed',
                                   'swap:renamed'])
def test_killed_swap_leaves_old_or_new_and_rerun_finishes(tmp_path, point):
    live, new = tmp_path / 'live.db', tmp_path / 'live.db.new'
    holder = make_db(live, 50)
    make_db(new, 7, wal=False).close()
    env = dict(os.environ, ANTHIAS_ROLLBACK_KILL_AT=point,
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, '-c', SCRIPT, str(new),
                           str(live)], env=env, check=False)
    holder.close()
    assert done.returncode == -9
    # The live path is whole: the old 50 rows or the new 7, never torn.
    assert read_rows(live) in (50, 7)
    recovery = swap.recover_interrupted_swap(live)
    # Killed before the intent landed: nothing had started.
    assert recovery.found == (point != 'atomic-write:before-rename')
    assert read_rows(live) == (7 if recovery.swapped else 50)
    if not recovery.swapped:
        if not new.exists():
            make_db(new, 7, wal=False).close()
        swap.swap_in(new, live)
    assert read_rows(live) == 7
    assert not swap.intent_path(live).exists()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_safety_copy_is_0600_and_live_keeps_its_mode(tmp_path):
    """A hard link shares the inode, so the safety copy once kept the
    live file's 0644. It becomes 0600 only after the rename, when its
    inode is no longer live; still a link: no byte copied."""
    live, new = tmp_path / 'live.db', tmp_path / 'live.db.new'
    make_db(live, 50).close()
    os.chmod(live, 0o644)
    old_inode = os.stat(live).st_ino
    make_db(new, 7, wal=False).close()
    os.chmod(new, 0o600)
    result = swap.swap_in(new, live)
    assert mode(result.safety_copy) == 0o600
    assert mode(live) == 0o644        # the host processes still open it
    assert os.stat(result.safety_copy).st_ino == old_inode   # not copied
    assert read_rows(result.safety_copy) == 50 and read_rows(live) == 7


def test_swap_of_a_large_file_copies_nothing(tmp_path):
    """Measured: the swap's time does not grow with the file (a link and
    a rename), here a ~64 MB database."""
    live, new = tmp_path / 'live.db', tmp_path / 'live.db.new'
    conn = make_db(live, 1, wal=False)
    conn.execute('CREATE TABLE big (b BLOB)')
    conn.executemany('INSERT INTO big VALUES (zeroblob(1048576))',
                     [()] * 64)
    conn.close()
    make_db(new, 7, wal=False).close()
    old_inode, new_inode = live.stat().st_ino, new.stat().st_ino
    result = swap.swap_in(new, live)
    assert result.safety_copy.stat().st_size > 64 * 10**6
    # No byte copied, whatever the size: the safety copy is the old
    # file's own inode (a link) and the live path the new file's (a
    # rename). Its time is measured in bench/, not asserted here.
    assert result.safety_copy.stat().st_ino == old_inode
    assert live.stat().st_ino == new_inode


@pytest.mark.parametrize('point', ['swap:safety-linked', 'swap:renamed'])
def test_crash_around_the_rename_settles_the_safety_copy(tmp_path, point):
    """Killed before the rename: the safety name is a second link to the
    live inode (not a copy) and goes. After it: the old database stays,
    made 0600 by the recovery."""
    live, new = tmp_path / 'live.db', tmp_path / 'live.db.new'
    make_db(live, 50).close()
    os.chmod(live, 0o644)
    make_db(new, 7, wal=False).close()
    env = dict(os.environ, ANTHIAS_ROLLBACK_KILL_AT=point,
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, '-c', SCRIPT, str(new),
                           str(live)], env=env, check=False)
    assert done.returncode == -9
    intent = json.loads(swap.intent_path(live).read_text())
    safety = Path(intent['safety_copy'])
    recovery = swap.recover_interrupted_swap(live)
    assert mode(live) == 0o644
    if point == 'swap:safety-linked':
        assert not safety.exists() and safety in recovery.removed
        assert read_rows(live) == 50
    else:
        assert mode(safety) == 0o600 and read_rows(safety) == 50
        assert read_rows(live) == 7


GARBAGE_INTENTS = {
    'binary': b'\x00\xff\xfe SQLite format 3\x00',
    'json-list': b'["new", "live"]',
    'new-not-a-path': b'{"new": 5, "live": 7}',
    'empty-object': b'{}',
    'empty-file': b'',
}


@pytest.mark.parametrize('content', GARBAGE_INTENTS.values(),
                         ids=GARBAGE_INTENTS.keys())
def test_garbage_intent_is_moved_aside_not_a_crash(tmp_path, content):
    """It gave a TypeError and blocked every rollback until deleted by
    hand. Nothing usable in it, and the live file is complete whatever
    the swap did: it is renamed aside (0600) with a warning."""
    live = tmp_path / 'live.db'
    make_db(live, 5).close()
    before = live.read_bytes()
    intent = swap.intent_path(live)
    intent.write_bytes(content)
    recovery = swap.recover_interrupted_swap(live)
    assert recovery.found and not recovery.swapped
    aside = recovery.moved_aside
    assert aside.name.startswith(f'{intent.name}.invalid-')
    assert aside.read_bytes() == content and mode(aside) == 0o600
    assert not intent.exists()
    assert str(aside) in recovery.warning
    assert live.read_bytes() == before
    assert swap.recover_interrupted_swap(live).found is False


def test_unreadable_intent_is_one_clear_error(tmp_path):
    live = tmp_path / 'live.db'
    make_db(live, 5).close()
    swap.intent_path(live).mkdir()    # EISDIR: cannot be read at all
    with pytest.raises(SwapError) as excinfo:
        swap.recover_interrupted_swap(live)
    message = str(excinfo.value)
    assert str(swap.intent_path(live)) in message
    assert 'move it aside' in message and '\n' not in message
    assert swap.intent_path(live).is_dir()   # left for the operator
