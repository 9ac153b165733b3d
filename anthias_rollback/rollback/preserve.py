"""PostgreSQL-side safety during a rollback: pg_dump and a write fence.

PostgreSQL only; every function is named for it.
"""
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from django.db import connections

from anthias_rollback import conf, fsutil
from anthias_rollback.exceptions import ConfigError, RollbackError
from anthias_rollback.report import describe_alias

VERSION_TIMEOUT = 10


@dataclass(frozen=True)
class PgDumpVersion:
    executable: str
    client: str        # pg_dump's own version line
    client_major: int
    server_major: int | None   # None when not asked


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


def pg_dump_client_version(executable: str) -> tuple[str, int]:
    """(`pg_dump --version` line, major version); ConfigError if it does
    not run or says no version."""
    try:
        done = subprocess.run([executable, '--version'], capture_output=True,
                              text=True, timeout=VERSION_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f'ANTHIAS_PG_DUMP={executable} does not run: '
                          f'{err}') from None
    line = done.stdout.strip()
    found = re.search(r'\b(\d+)(?:\.\d+)*', line)
    if done.returncode != 0 or found is None:
        raise ConfigError(f'ANTHIAS_PG_DUMP={executable} --version exited '
                          f'{done.returncode} without a version')
    return line, int(found.group(1))


def postgres_server_major(alias: str) -> int:
    """PostgreSQL: the server's major version (server_version_num)."""
    with connections[alias].cursor() as cursor:
        cursor.execute('SHOW server_version_num')
        return int(cursor.fetchone()[0]) // 10000


def check_pg_dump_version(alias: str | None = None,
                          executable: str | None = None) -> PgDumpVersion:
    """The pg_dump to use can dump *alias*'s server.

    pg_dump refuses a server of a newer major version ("aborting because
    of server version mismatch"), so a rollback would find out only in
    its preserve phase. Reads `pg_dump --version` and, with *alias*, the
    server's server_version_num (one query, no transaction). Raises
    ConfigError naming ANTHIAS_PG_DUMP and both versions; DatabaseError
    when the server cannot be asked.
    """
    executable = executable or find_pg_dump()
    if executable is None:
        raise ConfigError(f'pg_dump not found (ANTHIAS_PG_DUMP='
                          f'{conf.get_setting("ANTHIAS_PG_DUMP")})')
    executable = shutil.which(executable) or executable
    line, client = pg_dump_client_version(executable)
    server = None if alias is None else postgres_server_major(alias)
    if alias is not None and server is not None and client < server:
        raise ConfigError(
            f'ANTHIAS_PG_DUMP={executable} is pg_dump {client} ({line}) '
            f'but {describe_alias(alias)} runs PostgreSQL {server}: '
            f'pg_dump refuses a newer server; install the PostgreSQL '
            f'{server} client tools and point ANTHIAS_PG_DUMP at them')
    return PgDumpVersion(executable, line, client, server)


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
