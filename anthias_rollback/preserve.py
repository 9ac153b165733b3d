"""PostgreSQL-side safety during a rollback: pg_dump and a write fence.

PostgreSQL only; every function is named for it.
"""
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from django.db import connections

from anthias_rollback import conf, fsutil
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.report import describe_alias


@dataclass(frozen=True)
class DumpResult:
    path: Path
    size: int
    seconds: float


def find_pg_dump() -> str | None:
    """The pg_dump to use (setting ANTHIAS_PG_DUMP), or None if missing."""
    candidate = str(conf.get_setting('ANTHIAS_PG_DUMP'))
    if os.sep in candidate:
        return candidate if os.access(candidate, os.X_OK) else None
    return shutil.which(candidate)


def postgres_dump(alias: str, dest: Path, timeout: float) -> DumpResult:
    """pg_dump (custom format) of *alias*'s database into *dest* (0600).

    The password travels in PGPASSWORD, never on the command line (other
    users can read argv). Written under a temporary name and renamed, so
    a failed dump leaves no file under the final name. Raises
    RollbackError naming host:port and pg_dump's first error line.
    """
    executable = find_pg_dump()
    if executable is None:
        raise RollbackError(f'pg_dump not found (ANTHIAS_PG_DUMP='
                            f'{conf.get_setting("ANTHIAS_PG_DUMP")})')
    s = connections[alias].settings_dict
    env = dict(os.environ, PGCONNECT_TIMEOUT='10')
    if s.get('PASSWORD'):
        env['PGPASSWORD'] = str(s['PASSWORD'])
    args = [executable, '--format=custom', '--no-owner',
            f'--dbname={s["NAME"]}']
    if s.get('HOST'):
        args.append(f'--host={s["HOST"]}')
    if s.get('PORT'):
        args.append(f'--port={s["PORT"]}')
    if s.get('USER'):
        args.append(f'--username={s["USER"]}')
    fsutil.ensure_private_dir(dest.parent)
    tmp = dest.with_name(f'.{dest.name}.tmp')
    started = time.monotonic()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, 'wb') as out:
            done = subprocess.run(args + ['--no-password'], stdout=out,
                                  stderr=subprocess.PIPE, env=env,
                                  timeout=timeout, check=False)
            out.flush()
            os.fsync(out.fileno())
        if done.returncode != 0:
            reason = done.stderr.decode(errors='replace').strip()
            raise RollbackError(
                f'pg_dump of {describe_alias(alias)} failed: '
                f'{reason.splitlines()[0] if reason else done.returncode}')
        os.replace(tmp, dest)
        fsutil.fsync_dir(dest.parent)
    except subprocess.TimeoutExpired:
        raise RollbackError(f'pg_dump of {describe_alias(alias)} took '
                            f'longer than {timeout:.0f}s') from None
    finally:
        tmp.unlink(missing_ok=True)
    return DumpResult(dest, dest.stat().st_size,
                      time.monotonic() - started)
