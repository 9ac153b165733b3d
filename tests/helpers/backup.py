"""Real SQLite files and a real writer process for the backup tests.

`python tests/helpers/backup.py DB LOG [AUTOCHECKPOINT]` runs the writer:
it commits transactions into DB in WAL mode as fast as it can until
killed, and appends to LOG `begin N` before and `commit N` / `rollback N`
after each one (every 7th transaction is rolled back on purpose). Each
transaction inserts PARTS rows and sets the counter, so a torn snapshot
shows up as a short group or a counter that disagrees with the rows.
"""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

PARTS = 3
PAYLOAD = 'x' * 400


def payload(seq: int, part: int) -> str:
    return f'{seq}-{part}-{PAYLOAD}'


def make_writer_db(path: Path, ballast: int = 20000) -> Path:
    conn = sqlite3.connect(path)
    conn.execute('PRAGMA journal_mode=WAL')
    conn.executescript(
        'CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);'
        'CREATE TABLE items (id INTEGER PRIMARY KEY, seq INTEGER, '
        'part INTEGER, payload TEXT, '
        'parent_id INTEGER REFERENCES parent(id));'
        'CREATE TABLE counter (id INTEGER PRIMARY KEY, last INTEGER);'
        'INSERT INTO parent VALUES (1, \'p\');'
        'INSERT INTO counter VALUES (1, 0);'
        'CREATE TABLE ballast (id INTEGER PRIMARY KEY, payload TEXT);')
    # Ballast makes each backup take long enough for the writer to commit
    # many transactions while it runs.
    conn.executemany('INSERT INTO ballast (payload) VALUES (?)',
                     [(f'{i} {PAYLOAD}',) for i in range(ballast)])
    conn.commit()
    conn.close()
    return path


def make_plain_db(path: Path, rows: int = 200, wal: bool = True) -> Path:
    """A small SQLite file with a foreign key and *rows* items."""
    conn = sqlite3.connect(path)
    conn.execute(f'PRAGMA journal_mode={"WAL" if wal else "DELETE"}')
    conn.executescript(
        'CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);'
        'CREATE TABLE items (id INTEGER PRIMARY KEY, payload TEXT, '
        'parent_id INTEGER REFERENCES parent(id));'
        'INSERT INTO parent VALUES (1, \'p\');')
    conn.executemany('INSERT INTO items (payload, parent_id) VALUES (?, 1)',
                     [(f'row {i} {PAYLOAD}',) for i in range(rows)])
    conn.commit()
    conn.close()
    return path


def start_writer(db: Path, log: Path, autocheckpoint: int | None = None
                 ) -> subprocess.Popen:
    args = [sys.executable, __file__, str(db), str(log)]
    if autocheckpoint is not None:
        args.append(str(autocheckpoint))
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 20
    while committed(log)[1] < 20:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError('writer did not start')
        time.sleep(0.02)
    return proc


def stop_writer(proc: subprocess.Popen) -> None:
    """SIGKILL, so the writer never checkpoints its WAL on the way out."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def read_log(log: Path) -> tuple[set[int], int, int]:
    """(committed seqs, last committed seq, last begun seq)."""
    done, last_commit, last_begin = set(), 0, 0
    try:
        text = log.read_text()
    except FileNotFoundError:
        return done, 0, 0
    for line in text.splitlines():
        word, _, number = line.partition(' ')
        if not number.isdigit():
            continue  # a line cut in half by the kill
        seq = int(number)
        if word == 'begin':
            last_begin = max(last_begin, seq)
        elif word == 'commit':
            done.add(seq)
            last_commit = max(last_commit, seq)
    return done, last_commit, last_begin


def committed(log: Path) -> tuple[set[int], int]:
    done, last, _ = read_log(log)
    return done, last


def backup_content(path: Path) -> tuple[dict[int, list], int]:
    """{seq: [(part, payload)...]} and the counter, read from a file."""
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        groups: dict[int, list] = {}
        for seq, part, text in conn.execute(
                'SELECT seq, part, payload FROM items ORDER BY id'):
            groups.setdefault(seq, []).append((part, text))
        counter = conn.execute('SELECT last FROM counter').fetchone()[0]
    finally:
        conn.close()
    return groups, counter


def _write_forever(db: str, log: str, autocheckpoint: str | None) -> None:
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute('PRAGMA journal_mode=WAL')
    conn.execute('PRAGMA synchronous=NORMAL')
    if autocheckpoint is not None:
        conn.execute(f'PRAGMA wal_autocheckpoint={int(autocheckpoint)}')
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    seq = 0
    while True:
        seq += 1
        os.write(fd, f'begin {seq}\n'.encode())
        conn.execute('BEGIN IMMEDIATE')
        for part in range(PARTS):
            conn.execute('INSERT INTO items (seq, part, payload, parent_id) '
                         'VALUES (?, ?, ?, 1)', (seq, part,
                                                 payload(seq, part)))
        if seq % 7 == 0:
            conn.execute('ROLLBACK')
            os.write(fd, f'rollback {seq}\n'.encode())
            continue
        conn.execute('UPDATE counter SET last = ?', (seq,))
        conn.execute('COMMIT')
        os.write(fd, f'commit {seq}\n'.encode())


if __name__ == '__main__':
    _write_forever(sys.argv[1], sys.argv[2],
                   sys.argv[3] if len(sys.argv) > 3 else None)
