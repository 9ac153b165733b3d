import os
import sqlite3
import subprocess
import sys

import pytest

from anthias_rollback import swap
from anthias_rollback.exceptions import SwapError
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
from anthias_rollback import swap
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
