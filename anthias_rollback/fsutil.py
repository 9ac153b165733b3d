"""Durable file writes: temp file, fsync, rename, fsync the directory.

A crash at any instant leaves either the old file or the new one under the
final name, never an empty or partial one (POSIX rename is atomic; the
directory fsync makes the rename itself survive power loss).
"""
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anthias_rollback import faults


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    """fsync a file written elsewhere (e.g. by SQLite) before it is
    renamed into place."""
    _fsync(path, os.O_RDONLY)


def ensure_private_dir(path: Path) -> Path:
    """Create *path* (and parents) as 0700 if missing; return it."""
    path = Path(path)
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    return path


def atomic_write_bytes(path: Path, data: bytes | Callable[[int], bytes],
                       mode: int = 0o600, durable: bool = True) -> None:
    """Write *data* to *path* atomically with permissions *mode*. *data*
    may be a function of the file's inode (the rename keeps it), for a
    file that names its own identity. *durable*=False skips the fsync:
    for a record written every second whose readers ignore it when it is
    torn or old (an SD card's wear), never for state a decision needs.

    Raises OSError (e.g. directory not writable, disk full); in that case
    the previous content of *path*, if any, is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.',
                               suffix='.tmp')
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb') as fh:
            if callable(data):
                data = data(os.fstat(fh.fileno()).st_ino)
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        faults.checkpoint('atomic-write:before-rename')
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, mode: int = 0o600,
                      inode_key: str | None = None,
                      durable: bool = True) -> None:
    """atomic_write_bytes of *data* as JSON; with *inode_key*, the file's
    own inode is recorded under that key (read_json's with_inode)."""
    def text(inode: int) -> bytes:
        document = dict(data, **{inode_key: inode}) if inode_key else data
        return (json.dumps(document, indent=2, sort_keys=True, default=str)
                + '\n').encode()

    atomic_write_bytes(path, text, mode, durable)


def read_json(path: Path, what: str, error: type[Exception],
              fix: str = '', kind: type = dict,
              invalid: Callable[[Any], Any] | None = None,
              with_inode: bool = False) -> Any | None:
    """The JSON document in the state file *path*: None if the file does
    not exist; *error* naming *what* and the path if it cannot be read,
    is not UTF-8 JSON, or is not a *kind* (a list where a dict belongs).
    *fix* says how to repair it. With *invalid*, a bad document is not an
    error: *invalid*(parsed value, or None if unparsable) is returned.
    *with_inode*: (document, the inode it was read from), both from one
    open file (a rename between a stat and a read cannot mix two files).
    The one reader of our state files."""
    path = Path(path)
    try:
        with open(path, 'rb') as fh:
            inode = os.fstat(fh.fileno()).st_ino
            raw = fh.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise error(f'cannot read {what} {path}: {err.strerror}') from None
    parsed = True
    try:
        data = json.loads(raw.decode('utf-8'))
    except ValueError:   # includes UnicodeDecodeError: a binary file
        data, parsed = None, False
    if not isinstance(data, kind):
        if invalid is not None:
            return invalid(data if parsed else None)
        raise error(f'{what} {path} is not valid'
                    + (f'; {fix}' if fix else ''))
    return (data, inode) if with_inode else data
