"""Take a consistent online backup of the live SQLite database, verify,
list or prune backups.

    python manage.py backup_database --retention-days 14
    python manage.py backup_database \
        --verify backups/anthias_backup_20250101_030000.db

The backup uses SQLite's online backup API (one snapshot, safe while the
server, celery and viewer write), is checked, fsync'd and then named
anthias_backup_YYYYMMDD_HHMMSS.db with a .manifest.json beside it (0600).
The last line of normal output is the new backup's path (or the
verdict, on failure); --json prints one JSON document instead.

Exit codes: 0 backup made / backup valid / listed; 1 could not do it or
could not check (nothing kept under a final name); 2 usage error; 3 the
backup checked is not valid (or has no manifest); 4 backup made, but
removing old backups failed.
"""
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from anthias_rollback import backup, conf, events, exit_codes, profiles
from anthias_rollback.exceptions import BackupError
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import (
    non_negative_days,
    non_negative_float,
    path_arg,
)


def verification_of(info: backup.BackupInfo) -> backup.BackupVerification:
    """The verification list_backups(verify=True) attached to *info*."""
    assert info.verification is not None
    return info.verification

class Command(RollbackCommand):
    help = ('Back up the SQLite database online (consistent, verified, '
            'with a manifest); --verify PATH checks a backup, --list shows '
            'them. Exit codes: 0 ok/valid, 1 could not do it or could not '
            'check, 2 usage, 3 backup not valid, 4 backup made but '
            'retention failed.')

    def add_arguments(self, parser):
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument('--verify', '--verify-only', dest='verify',
                          metavar='PATH', type=path_arg,
                          help='check a backup against its manifest')
        mode.add_argument('--list', action='store_true',
                          help='list backups newest first, verifying each')
        parser.add_argument('--source-db', metavar='PATH', type=path_arg,
                            help='SQLite file to back up (default: the '
                                 'sqlite alias\'s file)')
        parser.add_argument('--backup-dir', metavar='DIR', type=path_arg,
                            help='default ANTHIAS_BACKUP_DIR, else '
                                 '$ANTHIAS_DATA_DIR/backups')
        parser.add_argument('--retention-days', type=non_negative_days,
                            metavar='N',
                            help='after the backup, remove backups older '
                                 'than N days (never the newest verified)')
        parser.add_argument('--timeout', type=non_negative_float,
                            metavar='SECONDS',
                            help='wait this long for a locked source '
                                 '(default ANTHIAS_BACKUP_TIMEOUT, 20)')

    def run(self, *args, **options):
        conf.validate_settings()   # before the first file is written
        backup_dir = Path(options['backup_dir'] or conf.backup_dir())
        as_json = options['json']
        if options['verify']:
            return self.verify(Path(options['verify']), as_json)
        if options['list']:
            return self.list(backup_dir, as_json, options['verbosity'])
        source = Path(options['source_db'] or profiles.sqlite_alias_path())
        timeout = options['timeout']
        if timeout is None:
            timeout = float(conf.get_setting('ANTHIAS_BACKUP_TIMEOUT'))
        days = options['retention_days']
        if days is not None and days < 0:
            self.fail('--retention-days must be 0 or more', exit_codes.USAGE)
        verbose = options['verbosity'] >= 1 and not as_json
        self.timings = options['verbosity'] >= 2
        self.started = time.perf_counter()
        result = backup.create_backup(
            source, backup_dir, timeout=timeout,
            progress=self.progress if verbose else None)
        removed, retention_error = [], None
        if days is not None:
            try:
                removed = backup.apply_retention(backup_dir, days)
            except BackupError as err:
                retention_error = str(err)
        data = asdict(result)
        data['removed'] = [str(p) for p in removed]
        data['retention_error'] = retention_error
        self.set_json(data)
        if not as_json:
            if verbose:
                counts = result.manifest['row_counts']
                self.stdout.write(
                    f'{result.size / 1e6:.1f} MB, {sum(counts.values())} '
                    f'rows in {len(counts)} tables, sha256 '
                    f'{result.sha256[:16]}..., {result.seconds:.2f}s')
                for path in removed:
                    self.stdout.write(f'removed old {path}')
            self.stdout.write(str(result.path))
        if retention_error:
            self.fail(f'backup {result.path} made, but retention failed: '
                      f'{retention_error}', exit_codes.FOLLOW_UP)

    def progress(self, event: events.ProgressEvent) -> None:
        started = event.kind == events.PHASE_START
        if self.timings:
            elapsed = time.perf_counter() - self.started
            self.stdout.write(f'[{elapsed:7.2f}s] '
                              f'{event.name if started else "done"}')
        if started and event.name == 'copy':
            self.stdout.write(f'backing up {event.detail} (online '
                              f'backup API)')
        elif started and event.name == 'verify':
            self.stdout.write('checking the copy: integrity, foreign keys, '
                              'row counts, sha256')

    def verify(self, path: Path, as_json: bool) -> None:
        result = backup.verify_backup(path)
        data = asdict(result)
        data['state'] = result.state
        self.set_json(data)
        if result.valid and not as_json:
            self.stdout.write(self.style.SUCCESS(
                f'valid: {path} (sha256, integrity, foreign keys, row '
                f'counts and migrations match its manifest)'))
        elif not as_json:
            for reason in result.reasons[1:]:
                self.stderr.write(f'also: {reason}')
        if not result.valid:
            self.fail(f'{result.state}: {path}: {result.reasons[0]}',
                      exit_codes.NO)

    def list(self, backup_dir: Path, as_json: bool, verbosity: int) -> None:
        infos = backup.list_backups(backup_dir, verify=True)
        now = datetime.now(UTC)
        self.set_json({'backup_dir': str(backup_dir), 'backups': [{
            'path': str(i.path), 'created_at': i.created_at.isoformat(),
            'age_hours': round((now - i.created_at).total_seconds()
                               / 3600, 2),
            'size': i.size, 'row_counts': i.row_counts,
            'state': i.state,
            'reasons': list(verification_of(i).reasons)} for i in infos]})
        if as_json:
            return
        if not infos:
            self.stdout.write(f'no backups in {backup_dir}')
            return
        for i in infos if verbosity >= 1 else ():
            hours = (now - i.created_at).total_seconds() / 3600
            counts = i.row_counts or verification_of(i).row_counts
            rows = ', '.join(f'{t}={n}' for t, n in sorted(counts.items())
                             if n)
            state = i.state
            if not i.verified:
                state = f'{state} ({verification_of(i).reasons[0]})'
            self.stdout.write(f'{i.path.name}  {hours:7.1f}h  '
                              f'{i.size / 1e6:8.1f} MB  {state}  {rows}')
        verified = sum(1 for i in infos if i.verified)
        self.stdout.write(f'{len(infos)} backup(s) in {backup_dir}, '
                          f'{verified} verified; newest {infos[0].path}')
