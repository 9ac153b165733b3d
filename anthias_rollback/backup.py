"""Online SQLite backups with a manifest, verification and retention.

A backup is one consistent snapshot of a live WAL-mode database taken with
SQLite's online backup API in a single step (one read transaction), so it
holds every transaction committed before it began and no half of any
other, while the server, celery and viewer keep writing. It is written
under a temporary name in the backup dir, checked, fsync'd and only then
linked under its final name `anthias_backup_YYYYMMDD_HHMMSS[_N].db`, next
to `<backup>.manifest.json`. Nothing here uses Django connections: these
are files, and the rollback must be able to read them with no alias.
The file-level SQLite helpers are in `engines.sqlite_file`.
"""
import dataclasses
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthias_rollback
from anthias_rollback import events, faults, fsutil
from anthias_rollback.engines.sqlite_file import (
    file_sha256,
    sqlite_applied_migrations,
    sqlite_check_header,
    sqlite_file_problem,
    sqlite_open_readonly,
    sqlite_problems,
    sqlite_reason,
    sqlite_snapshot,
    sqlite_table_counts,
)
from anthias_rollback.exceptions import BackupError, BackupInvalidError
from anthias_rollback.phases import PhaseStatus

TOOL = 'anthias_rollback'
MANIFEST_FORMAT = 1
PREFIX = 'anthias_backup_'
MANIFEST_SUFFIX = '.manifest.json'
_NAME_RE = re.compile(r'^anthias_backup_(\d{8}_\d{6})(?:_(\d+))?\.db$')
_TEMP_GLOB = f'.{PREFIX}*.tmp'
_TEMP_MIN_AGE = timedelta(hours=1)

Progress = events.Progress


@dataclasses.dataclass(frozen=True)
class BackupResult:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    size: int
    sha256: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class BackupVerification:
    path: Path
    valid: bool
    reasons: tuple[str, ...]
    has_manifest: bool
    manifest: dict[str, Any] | None
    size: int = 0
    sha256: str = ''
    row_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def state(self) -> str:
        """'verified', 'invalid' or 'unverified' (checked, no manifest)."""
        if self.valid:
            return 'verified'
        return 'invalid' if self.has_manifest else 'unverified'


@dataclasses.dataclass(frozen=True)
class BackupInfo:
    path: Path
    manifest_path: Path
    created_at: datetime
    size: int
    has_manifest: bool
    manifest: dict[str, Any] | None
    row_counts: dict[str, int]
    verification: BackupVerification | None = None

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.valid

    @property
    def state(self) -> str:
        if self.verification is None:
            return 'not checked'
        return self.verification.state


def manifest_path_for(path: Path) -> Path:
    return Path(str(path) + MANIFEST_SUFFIX)


class _Background(threading.Thread):
    """Run *fn* in a thread (hashlib and fsync release the GIL), so the
    hash and the flush overlap SQLite's checks instead of following them."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as err:  # noqa: BLE001 -- re-raised in result()
            self.error = err

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


# --- create -----------------------------------------------------------------

def create_backup(source_path: Path, backup_dir: Path,
                  progress: Progress = None,
                  timeout: float = 20.0) -> BackupResult:
    """Back up the SQLite file at *source_path* into *backup_dir*.

    Reads the source through a read-only connection (no alias; one read
    transaction for the whole copy) and never writes to it. Creates
    *backup_dir* as 0700 if missing. Raises BackupError (source missing,
    not SQLite, locked past *timeout* seconds, backup dir not writable,
    disk full, backup failed its checks); then no file exists under a
    final name and the source is untouched.
    """
    started = time.perf_counter()
    source_path, backup_dir = Path(source_path), Path(backup_dir)
    sqlite_check_header(source_path)
    try:
        fsutil.ensure_private_dir(backup_dir)
        fd, tmp_name = tempfile.mkstemp(dir=backup_dir, prefix=f'.{PREFIX}',
                                        suffix='.db.tmp')
    except OSError as err:
        raise BackupError(f'backup dir {backup_dir} is not writable: '
                          f'{err.strerror}') from None
    tmp = Path(tmp_name)
    manifest_tmp = None
    try:
        os.fchmod(fd, 0o600)
        os.close(fd)
        events.emit(progress, events.PHASE_START, 'copy',
                    detail=str(source_path))
        created_at = sqlite_snapshot(source_path, tmp, timeout)
        faults.checkpoint('backup:after-copy')
        events.emit(progress, events.PHASE_START, 'verify', detail=str(tmp))
        manifest = _check_new_backup(tmp, source_path, created_at)
        manifest['sequence'] = next_sequence(backup_dir)
        manifest_tmp = _write_temp_manifest(backup_dir, manifest)
        faults.checkpoint('backup:before-rename')
        final = _link_under_final_name(tmp, manifest_tmp, backup_dir,
                                       created_at)
    except OSError as err:
        raise BackupError(f'backup of {source_path} into {backup_dir} '
                          f'failed: {err.strerror or err}; no backup was '
                          f'kept') from None
    except sqlite3.Error as err:
        raise BackupError(f'backup of {source_path} failed: '
                          f'{sqlite_reason(err, timeout)}; no backup was '
                          f'kept') from None
    finally:
        for leftover in (tmp, manifest_tmp):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    events.emit(progress, events.PHASE_DONE, 'backup',
                status=PhaseStatus.OK,
                seconds=seconds, detail=str(final))
    return BackupResult(path=final, manifest_path=manifest_path_for(final),
                        manifest=manifest, size=manifest['size'],
                        sha256=manifest['sha256'], seconds=seconds)


def _check_new_backup(tmp: Path, source_path: Path,
                      created_at: datetime) -> dict[str, Any]:
    """Check the copy and build its manifest; hash and fsync overlap the
    SQLite checks in threads."""
    hasher = _Background(lambda: file_sha256(tmp))
    syncer = _Background(lambda: fsutil.fsync_file(tmp))
    conn = sqlite_open_readonly(tmp, timeout=1, immutable=True)
    try:
        problems = sqlite_problems(conn)
        counts = sqlite_table_counts(conn)
        migrations = sqlite_applied_migrations(conn)
    finally:
        conn.close()
    sha256, size = hasher.result()
    syncer.result()
    if problems:
        raise BackupInvalidError(f'the copy of {source_path} failed its '
                                 f'check: {problems[0]}; no backup was kept')
    return {
        'tool': TOOL,
        'tool_version': anthias_rollback.__version__,
        'format': MANIFEST_FORMAT,
        'created_at': created_at.isoformat(),
        'source_path': str(source_path),
        'sqlite_version': sqlite3.sqlite_version,
        'size': size,
        'sha256': sha256,
        'row_counts': counts,
        'migrations': migrations,
    }


def _write_temp_manifest(backup_dir: Path, manifest: dict[str, Any]) -> Path:
    fd, name = tempfile.mkstemp(dir=backup_dir, prefix=f'.{PREFIX}',
                                suffix='.json.tmp')
    text = json.dumps(manifest, indent=2, sort_keys=True) + '\n'
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, 'wb') as fh:
            fh.write(text.encode())
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _link_under_final_name(tmp: Path, manifest_tmp: Path, backup_dir: Path,
                           created_at: datetime) -> Path:
    """Give the checked files their final names, never overwriting.

    link(2) fails if the name exists, so two backups in the same second
    cannot replace each other. The manifest goes first: a crash between
    the two links leaves an orphan manifest (ignored), never a backup
    without one.
    """
    stamp = created_at.strftime('%Y%m%d_%H%M%S')
    for n in range(1000):
        suffix = f'_{n}' if n else ''
        final = backup_dir / f'{PREFIX}{stamp}{suffix}.db'
        if final.exists():
            continue
        try:
            os.link(manifest_tmp, manifest_path_for(final))
        except FileExistsError:
            continue
        try:
            os.link(tmp, final)
        except BaseException:
            manifest_path_for(final).unlink(missing_ok=True)
            if final.exists():
                continue
            raise
        fsutil.fsync_dir(backup_dir)
        return final
    raise BackupError(f'no free backup name for {stamp} in {backup_dir}')


# --- read / verify ----------------------------------------------------------

def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of the backup at *path*; None if it has none.

    Raises BackupError when it exists but cannot be read (I/O error, a
    directory). A malformed manifest comes back as {'_error': reason} so
    that verification can report it as a reason, not a crash.
    """
    mpath = manifest_path_for(path)

    def invalid(data: Any) -> dict[str, str]:
        what = 'valid JSON' if data is None else 'a JSON object'
        return {'_error': f'manifest {mpath.name} is not {what}'}
    return fsutil.read_json(mpath, 'manifest', BackupError,
                            invalid=invalid)


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    if '_error' in manifest:
        return manifest['_error']
    if manifest.get('tool') != TOOL:
        return (f'manifest is from another tool '
                f'({manifest.get("tool") or "unknown"}), not {TOOL}')
    for key in ('sha256', 'size', 'row_counts', 'migrations'):
        if key not in manifest:
            return f'manifest has no {key}'
    return None


def verify_backup(path: Path) -> BackupVerification:
    """Check the backup file at *path* against its manifest.

    Checks sha256 and size, PRAGMA integrity_check and foreign_key_check,
    row counts and applied migrations. Opens the file read-only and
    immutable (no alias, no lock). Returns valid=False with the reasons
    (first = most telling) for a bad backup or one without a manifest;
    raises BackupError only when it cannot check (unreadable path).
    """
    path = Path(path)
    if path.is_dir():
        raise BackupError(f'cannot check {path}: it is a directory')
    try:
        sha256, size = file_sha256(path)
    except OSError as err:
        raise BackupError(f'cannot read backup {path}: '
                          f'{err.strerror}') from None
    manifest = read_manifest(path)
    reasons: list[str] = []
    usable = None
    if manifest is None:
        reasons.append(f'no manifest ({manifest_path_for(path).name}): '
                       f'checked as far as possible, unverified')
    else:
        problem = _manifest_problem(manifest)
        if problem:
            reasons.append(problem)
        else:
            usable = manifest
    if usable is not None:
        if usable['sha256'] != sha256:
            reasons.append(f'sha256 checksum mismatch: file has '
                           f'{sha256[:16]}..., manifest says '
                           f'{str(usable["sha256"])[:16]}...')
        if usable['size'] != size:
            reasons.append(f'size mismatch: file has {size} bytes, '
                           f'manifest says {usable["size"]}')
    counts: dict[str, int] = {}
    if sqlite_file_problem(path) is not None:
        reasons.append('not a SQLite database (bad header)')
    else:
        counts = _verify_sqlite(path, usable, reasons)
    return BackupVerification(
        path=path, valid=not reasons, reasons=tuple(reasons),
        has_manifest=manifest is not None,
        manifest=manifest if manifest is None or '_error' not in manifest
        else None,
        size=size, sha256=sha256, row_counts=counts)


def _verify_sqlite(path: Path, manifest: dict[str, Any] | None,
                   reasons: list[str]) -> dict[str, int]:
    try:
        conn = sqlite_open_readonly(path, timeout=1, immutable=True)
    except sqlite3.Error as err:
        reasons.append(f'cannot open as SQLite: {err}')
        return {}
    try:
        reasons.extend(sqlite_problems(conn))
        counts = sqlite_table_counts(conn)
        migrations = sqlite_applied_migrations(conn)
    except sqlite3.Error as err:
        reasons.append(f'SQLite cannot read it: {err}')
        return {}
    finally:
        conn.close()
    if manifest is not None:
        expected = manifest['row_counts']
        for table in sorted(set(expected) | set(counts)):
            if expected.get(table) != counts.get(table):
                reasons.append(f'row count of {table}: file has '
                               f'{counts.get(table)}, manifest says '
                               f'{expected.get(table)}')
                break
        if sorted(manifest['migrations']) != migrations:
            reasons.append('applied migrations differ from the manifest')
    ahead = _unknown_migrations(migrations)
    if ahead:
        reasons.append(ahead)
    return counts


def _unknown_migrations(migrations: list[str]) -> str:
    """A reason when the file records migrations this code does not know
    (made by a newer release): the rollback refuses such a file, so
    backup_database and the readiness must not call it verified. A file
    only BEHIND the code is fine: the rollback migrates its copy forward.
    The same check as the rollback's (schema.migration_state)."""
    from anthias_rollback import schema

    unknown = schema.migration_state(schema.parse_labels(migrations)).unknown
    if not unknown:
        return ''
    more = f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''
    return (f'records migrations this code does not know '
            f'({", ".join(unknown[:5])}{more}): made by a newer release, '
            'it cannot be restored by this one')


# --- list / retention -------------------------------------------------------

def _created_at(path: Path, manifest: dict[str, Any] | None) -> datetime:
    if manifest and isinstance(manifest.get('created_at'), str):
        try:
            value = datetime.fromisoformat(manifest['created_at'])
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value
        except ValueError:
            pass
    match = _NAME_RE.match(path.name)
    if match:
        return datetime.strptime(match.group(1), '%Y%m%d_%H%M%S').replace(
            tzinfo=UTC)
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def manifest_sequence(manifest: dict[str, Any] | None) -> int | None:
    """The backup's place in its dir's order (None: an older manifest)."""
    value = (manifest or {}).get('sequence')
    return value if isinstance(value, int) and value > 0 else None


def next_sequence(backup_dir: Path) -> int:
    """One more than any sequence in *backup_dir*: the order of backups
    made here, which no clock can fake (a Raspberry Pi has no RTC; a
    backup made while the clock ran two days ahead stayed "newest" by its
    date and was restored over a truly newer one)."""
    found = [manifest_sequence(info.manifest)
             for info in list_backups(backup_dir)]
    return max([n for n in found if n is not None], default=0) + 1


def _sort_key(info: BackupInfo) -> tuple:
    match = _NAME_RE.match(info.path.name)
    sequence = manifest_sequence(info.manifest)
    # Sequenced backups are newer than any made before sequences existed;
    # among those older ones the date decides, as it did.
    return (sequence is not None, sequence or 0, info.created_at,
            int(match.group(2) or 0) if match else 0)


def list_backups(backup_dir: Path, verify: bool = False) -> list[BackupInfo]:
    """Backups in *backup_dir*, newest first; [] if the dir is missing.

    With verify=True each one is checked (verify_backup). Raises
    BackupError if the dir exists but cannot be listed.
    """
    backup_dir = Path(backup_dir)
    try:
        names = sorted(os.listdir(backup_dir))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise BackupError(f'cannot list backup dir {backup_dir}: '
                          f'{err.strerror}') from None
    found = []
    for name in names:
        path = backup_dir / name
        if not _NAME_RE.match(name) or not path.is_file():
            continue
        try:
            manifest = read_manifest(path)
        except BackupError:
            manifest = {'_error': 'manifest unreadable'}
        good = manifest if manifest and '_error' not in manifest else None
        counts = good.get('row_counts', {}) if good else {}
        found.append(BackupInfo(
            path=path, manifest_path=manifest_path_for(path),
            created_at=_created_at(path, good), size=path.stat().st_size,
            has_manifest=manifest is not None, manifest=good,
            row_counts=dict(counts) if isinstance(counts, dict) else {},
            verification=verify_backup(path) if verify else None))
    found.sort(key=_sort_key, reverse=True)
    return found


def latest_verified_backup(backup_dir: Path,
                           skip: int = 0) -> BackupInfo | None:
    """The newest backup that passes verify_backup, or None; *skip*
    leaves out that many of the newest (already found invalid)."""
    for info in list_backups(backup_dir)[skip:]:
        verification = verify_backup(info.path)
        if verification.valid:
            return dataclasses.replace(info, verification=verification)
    return None


def apply_retention(backup_dir: Path, days: float,
                    now: datetime | None = None) -> list[Path]:
    """Remove backups (and manifests) older than *days*, never the newest
    verified backup (when none verifies, never the newest backup: a
    damaged copy may still hold rows nothing else has), plus temp files
    of crashed runs older than *days* (and at least an hour old).

    Returns the removed paths. Raises BackupError if a file cannot be
    removed (the ones listed before it are gone).
    """
    backup_dir = Path(backup_dir)
    if days < 0:
        raise BackupError(f'retention must be 0 days or more, not {days}')
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    keep = latest_verified_backup(backup_dir)
    backups = list_backups(backup_dir)
    if keep is None and backups:
        keep = backups[0]
    keep_path = keep.path if keep else None
    removed: list[Path] = []
    targets: list[Path] = []
    for info in backups:
        if info.created_at < cutoff and info.path != keep_path:
            targets += [info.path, info.manifest_path]
    # A temp file younger than an hour may belong to a backup running now.
    tmp_cutoff = min(cutoff, (now or datetime.now(UTC))
                     - _TEMP_MIN_AGE)
    for tmp in backup_dir.glob(_TEMP_GLOB):
        mtime = datetime.fromtimestamp(tmp.stat().st_mtime, UTC)
        if mtime < tmp_cutoff:
            targets.append(tmp)
    for path in targets:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise BackupError(f'cannot remove old backup {path}: '
                              f'{err.strerror}') from None
        removed.append(path)
    if removed:
        fsutil.fsync_dir(backup_dir)
    return removed
