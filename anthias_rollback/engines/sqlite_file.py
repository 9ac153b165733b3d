"""File-level SQLite helpers: a database as a file, no Django alias.

Backups, their checks, the drill's sandbox copy and the rollback's swap
read SQLite files that no alias points at (and must not: an alias would
let Django open, and sqlite3 silently create, the file). Everything here
takes paths or raw sqlite3 connections and never writes the file it
reads. The one header check lives here too (`sqlite_file_problem`).
"""
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from anthias_rollback.exceptions import BackupError, SwapError

SQLITE_HEADER = b'SQLite format 3\x00'
# Measured on the 1M-asset bench file: 8 MiB reads keep sha256 at memory
# speed; larger buffers gain nothing.
_HASH_CHUNK = 8 * 1024 * 1024
# SQLite: let the checks read through mmap instead of copying every page
# into the page cache (halves integrity_check time on the bench file).
_MMAP_SIZE = 1 << 30


# --- what the file is -------------------------------------------------------

SIDE_SUFFIXES = ('-wal', '-shm', '-journal')


def remove_sqlite_file(path: Path) -> None:
    """Remove a SQLite file that is nobody's live file, with its side
    files (a stale -wal beside a new file of that name would be applied
    to it)."""
    for candidate in (Path(path), *(Path(f'{path}{s}')
                                    for s in SIDE_SUFFIXES)):
        candidate.unlink(missing_ok=True)


def sqlite_file_problem(path: Path) -> str | None:
    """Why *path* cannot be a source SQLite file, or None if it can.

    Checked before anything opens it: sqlite3 would silently create an
    empty database at a mistyped path. Reads 16 bytes, nothing else.
    """
    path = Path(path)
    if not path.exists():
        return f'SQLite file {path} does not exist'
    if not path.is_file():
        return f'{path} is not a file'
    try:
        with open(path, 'rb') as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as err:
        return f'cannot read {path}: {err.strerror}'
    if header != SQLITE_HEADER:
        what = ('empty file' if not header else
                'no SQLite header: encrypted or another format')
        return f'{path} is not a SQLite database ({what})'
    return None


def sqlite_check_header(path: Path) -> None:
    """BackupError unless *path* is a readable file with a SQLite header
    (the source of a backup: nothing is backed up otherwise)."""
    problem = sqlite_file_problem(path)
    if problem is not None:
        raise BackupError(f'{problem}; nothing was backed up')


def sqlite_is_wal(path: Path) -> bool:
    """SQLite: header bytes 18-19 are 2 for a WAL-mode database."""
    with open(path, 'rb') as handle:
        header = handle.read(20)
    return len(header) == 20 and header[18] == 2 and header[19] == 2


def file_sha256(path: Path) -> tuple[str, int]:
    """sha256 hex digest and size of *path*, read once."""
    digest = hashlib.sha256()
    size = 0
    with open(path, 'rb', buffering=0) as fh:
        for chunk in _chunks(fh):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_state(path: Path) -> list[int]:
    """What changes when the SQLite file's bytes do: [dev, inode, size,
    mtime_ns, the -wal's size] (a -wal with frames counts as a change)."""
    st = os.stat(path)
    try:
        wal = os.stat(f'{path}-wal').st_size
    except FileNotFoundError:
        wal = 0
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, wal]


def _chunks(fh) -> Iterator[memoryview]:
    """The file's bytes in one reused buffer of _HASH_CHUNK (each view is
    valid until the next is read)."""
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        yield view[:n]


def copy_file_sha256(path: Path, target: Path) -> str:
    """Copy the closed file *path* (not live, no -wal beside it: a byte
    copy is then a complete database) into the new file *target*, 0600,
    hashing what was read; returns the sha256 hex digest. One pass: the
    copy and the check of a cutover file cost one read."""
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(path, 'rb', buffering=0) as fh, \
            open(fd, 'wb', buffering=0) as out:
        for chunk in _chunks(fh):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


# --- reading ----------------------------------------------------------------

def _uri_path(path: Path) -> str:
    return quote(str(Path(path).absolute()))


def sqlite_open_readonly(path: Path, timeout: float,
                         immutable: bool = False) -> sqlite3.Connection:
    """A read-only connection: never checkpoints or changes the file."""
    query = 'mode=ro&immutable=1' if immutable else 'mode=ro'
    uri = f'file:{_uri_path(path)}?{query}'
    conn = sqlite3.connect(uri, uri=True, timeout=timeout,
                           isolation_level=None, check_same_thread=False)
    conn.execute(f'PRAGMA mmap_size={_MMAP_SIZE}')
    return conn


def sqlite_connect(path: Path, timeout: float = 5.0) -> sqlite3.Connection:
    """A read-write connection in autocommit mode to the file at *path*
    (sqlite3 creates a missing one: callers pass a file they made)."""
    return sqlite3.connect(path, timeout=timeout, isolation_level=None)


def sqlite_set_wal(conn: sqlite3.Connection) -> None:
    """SQLite: put the file behind *conn* in WAL mode (kept in the file)."""
    conn.execute('PRAGMA journal_mode=WAL')


def sqlite_table_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per user table (SQLite's own sqlite_* tables left out)."""
    names = [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name")]
    return {name: conn.execute(
        f'SELECT count(*) FROM "{name.replace(chr(34), chr(34) * 2)}"'
    ).fetchone()[0] for name in names}


def sqlite_applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """`app.name` of Django migrations recorded in the file, sorted."""
    try:
        rows = conn.execute('SELECT app, name FROM django_migrations')
        return sorted(f'{app}.{name}' for app, name in rows)
    except sqlite3.OperationalError as err:
        if 'no such table' in str(err):
            return []
        raise


def sqlite_reason(err: sqlite3.Error, timeout: float) -> str:
    """An operator's reading of a sqlite3 error met while copying."""
    text = str(err)
    if 'locked' in text or 'busy' in text:
        return f'the database stayed locked for more than {timeout:g}s'
    if 'not a database' in text or 'encrypted' in text:
        return 'the file is not a SQLite database (encrypted or damaged)'
    return text


# --- checks -----------------------------------------------------------------

def sqlite_problems(conn: sqlite3.Connection) -> list[str]:
    """integrity_check and foreign_key_check findings ([] = sound)."""
    problems = []
    rows = [r[0] for r in conn.execute('PRAGMA integrity_check(20)')]
    if rows != ['ok']:
        problems.append('integrity_check failed: ' + '; '.join(rows[:3]))
    fk = conn.execute('PRAGMA foreign_key_check').fetchall()
    if fk:
        tables = sorted({row[0] for row in fk})
        problems.append(f'foreign_key_check found {len(fk)} broken '
                        f'reference(s) in {", ".join(tables)}')
    return problems


def sqlite_quick_check(path: Path) -> str:
    """PRAGMA quick_check's first line for the file at *path* ('ok')."""
    conn = sqlite3.connect(path)
    try:
        return quick_check_line(conn)
    finally:
        conn.close()


def quick_check_line(conn: sqlite3.Connection) -> str:
    """PRAGMA quick_check's first line on *conn* ('ok'). A page too
    broken to report on makes SQLite raise instead: that is the
    answer too, not an error of the caller's."""
    try:
        return conn.execute('PRAGMA quick_check').fetchone()[0]
    except sqlite3.DatabaseError as err:
        return str(err)


def sqlite_quick_check_in_snapshot(path: Path, begun: Callable[[], None]
                                   ) -> str:
    """quick_check's first line for the file at *path* as it is when the
    check's read transaction begins; *begun* is called once it has (or
    once opening it failed), so a caller may write on meanwhile (WAL)."""
    conn = sqlite3.connect(path, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute('BEGIN')
        conn.execute('SELECT count(*) FROM sqlite_master').fetchone()
        begun()
        return quick_check_line(conn)
    except sqlite3.DatabaseError as err:
        return str(err)      # its schema page unreadable: the answer
    finally:
        begun()
        conn.close()


def sqlite_full_check(path: Path) -> list[str]:
    """integrity_check and foreign_key_check problems (empty if fine)."""
    conn = sqlite3.connect(path)
    try:
        return sqlite_problems(conn)
    finally:
        conn.close()


def sqlite_checkpoint_truncate(path: Path, attempts: int = 20,
                               wait: float = 0.25) -> None:
    """SQLite: move every WAL frame into the main file and empty the WAL.

    Retries while readers hold old snapshots; SwapError if the WAL stays
    busy, with the live file untouched.
    """
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        for _ in range(attempts):
            busy, _log, _done = conn.execute(
                'PRAGMA wal_checkpoint(TRUNCATE)').fetchone()
            if not busy:
                return
            time.sleep(wait)
    finally:
        conn.close()
    raise SwapError(f'cannot checkpoint {path}: other processes keep its '
                    'WAL busy; stop the app processes and rerun')


# --- copying ----------------------------------------------------------------

def sqlite_snapshot(source_path: Path, target: Path,
                    timeout: float) -> datetime:
    """Copy *source_path* into the (empty) file *target* in one backup
    step; return when the snapshot began (UTC).

    One step = one read transaction: with pages>0 a write by another
    process between steps restarts the copy, which under three busy
    writers may never finish (https://sqlite.org/c3ref/backup_finish.html).
    """
    source = sqlite_open_readonly(source_path, timeout)
    try:
        dest = sqlite3.connect(target, isolation_level=None)
        try:
            # The file is fsync'd once at the end; a journal on a file
            # nobody else sees would only double the writes.
            dest.execute('PRAGMA journal_mode=OFF')
            dest.execute('PRAGMA synchronous=OFF')
            source.execute('BEGIN')
            # Forces the read lock now, so created_at is the snapshot time.
            source.execute('SELECT count(*) FROM sqlite_master').fetchone()
            created_at = datetime.now(UTC)
            source.backup(dest, pages=-1)
            source.execute('COMMIT')
            # The copy keeps the source's WAL flag; a backup is one
            # self-contained file, so make it a rollback-journal file.
            dest.execute('PRAGMA journal_mode=DELETE')
        finally:
            dest.close()
    finally:
        source.close()
    return created_at


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def sqlite_copy_readonly(live: Path, dest: Path, timeout: float) -> str:
    """SQLite: copy *live* into *dest* with the backup API, reading only.

    A WAL database nobody has open (no -wal file) is read as immutable:
    a mode=ro reader would leave new -wal/-shm files beside it (seen
    with SQLite 3.40). If its file changed meanwhile (a checkpoint) the
    copy is redone under a normal read lock. Returns how it was read.
    """
    wal = Path(f'{live}-wal')
    if sqlite_is_wal(live) and not wal.exists():
        before = _stat_key(live)
        source = sqlite_open_readonly(live, timeout, immutable=True)
        try:
            target = sqlite3.connect(dest)
            try:
                source.backup(target)
                target.execute('PRAGMA journal_mode=DELETE')
            finally:
                target.close()
        finally:
            source.close()
        if not wal.exists() and _stat_key(live) == before:
            return 'immutable read, no side files'
        dest.unlink()
    sqlite_snapshot(live, dest, timeout)
    return 'read-only snapshot'
