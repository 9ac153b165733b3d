"""The `anthias_rollback` logging hierarchy and its handler plumbing.

Loggers are `anthias_rollback.<part>` (`rollback`, `backup`, `transfer`,
`sql`, ...), made by `get_logger`, which attaches the redacting filter:
no password or DSN credentials reach any handler, the host's included.
The package configures no output of its own (a NullHandler only, no
basicConfig, propagation left on), so Anthias's LOGGING / journald sees
every record; commands add stderr at -v3, runs add their log file.
"""
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from anthias_rollback.report import redact

PACKAGE = 'anthias_rollback'
SQL = 'sql'
# <UTC time> <message>: the rollback log's line format since its first
# release (scripts and tests grep 'phase=swap status=ok').
FILE_FORMAT = '%(asctime)s %(message)s'
STDERR_FORMAT = '%(name)s %(levelname)s %(message)s'
# Longest statement text a -v3 SQL record keeps (a multi-row INSERT of a
# 5000-row batch would otherwise be megabytes per line).
MAX_SQL_CHARS = 2000


class RedactFilter(logging.Filter):
    """Formats the message once and strips secrets from it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


REDACT = RedactFilter()
# A library's loggers end in a NullHandler: without it Python's
# lastResort handler prints WARNING records on stderr a second time
# (the commands already render warnings).
logging.getLogger(PACKAGE).addHandler(logging.NullHandler())


def get_logger(name: str = '') -> logging.Logger:
    """`anthias_rollback.<name>` (the package logger for ''), redacting.

    A logger-level filter, because a record propagating to the host's
    handlers passes no handler filter of ours."""
    logger = logging.getLogger(f'{PACKAGE}.{name}' if name else PACKAGE)
    if REDACT not in logger.filters:
        logger.addFilter(REDACT)
    return logger


class UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord,
                   datefmt: str | None = None) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        return stamp.isoformat(timespec='seconds')


class PrivateFileHandler(logging.FileHandler):
    """A FileHandler whose file is created 0600 (appended, never
    truncated); FileHandler itself would use the umask."""

    def _open(self) -> TextIO:  # type: ignore[override]  # typeshed: TextIOWrapper
        fd = os.open(self.baseFilename,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, 'a', encoding='utf-8',
                         errors='backslashreplace')


@contextmanager
def level_at_most(logger: logging.Logger, level: int) -> Iterator[None]:
    """Let *logger* pass records of *level* for the block: a handler
    never sees what its logger's level dropped (root's default is
    WARNING). Only ever lowers the level; restores the logger's own."""
    previous = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def file_log(logger: logging.Logger, path: Path,
             level: int = logging.INFO) -> Iterator[logging.Handler]:
    """Append *logger*'s records at *level* and above to *path* (0600)
    while the block runs; one line each, flushed per record."""
    handler = PrivateFileHandler(path, delay=True)
    handler.setFormatter(UTCFormatter(FILE_FORMAT))
    handler.addFilter(REDACT)
    handler.setLevel(level)
    with level_at_most(logger, level):
        logger.addHandler(handler)
        try:
            yield handler
        finally:
            logger.removeHandler(handler)
            handler.close()


def _shorten(sql: str) -> str:
    sql = ' '.join(str(sql).split())
    if len(sql) > MAX_SQL_CHARS:
        return f'{sql[:MAX_SQL_CHARS]}... ({len(sql)} chars)'
    return sql


def sql_logger_wrapper() -> Callable[..., Any]:
    """An execute wrapper logging each statement (alias, ms, SQL) at
    DEBUG on `anthias_rollback.sql`; parameters are not logged (rows)."""
    logger = get_logger(SQL)

    def log_sql(execute, sql, params, many, context):
        alias = context['connection'].alias
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            ms = (time.perf_counter() - started) * 1000
            batch = f' x{len(params)}' if many and params else ''
            logger.debug('[%s %.1f ms%s] %s', alias, ms, batch,
                         _shorten(sql))
    return log_sql


@contextmanager
def sql_logging() -> Iterator[None]:
    """Log every statement of every connection while the block runs.

    Every alias in connections.all() gets the wrapper through
    execute_wrapper; connections made later (a temporary alias for a
    backup file, another thread's connection) get it on creation."""
    from django.db import connections
    from django.db.backends.signals import connection_created

    wrapper = sql_logger_wrapper()
    late = []

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        if wrapper not in connection.execute_wrappers:
            connection.execute_wrappers.append(wrapper)
            late.append(connection)

    with ExitStack() as stack:
        for connection in connections.all():
            stack.enter_context(connection.execute_wrapper(wrapper))
        connection_created.connect(on_created, weak=False)
        try:
            yield
        finally:
            connection_created.disconnect(on_created)
            for connection in late:
                if wrapper in connection.execute_wrappers:
                    connection.execute_wrappers.remove(wrapper)


@contextmanager
def command_logging(stream: Any, verbosity: int) -> Iterator[None]:
    """-v3: every record of the hierarchy (phases, warnings, each SQL
    statement) on *stream*; below -v3 nothing is added."""
    if verbosity < 3:
        yield
        return
    handler = logging.StreamHandler(stream)
    # The command's OutputWrapper ends each write with a newline itself.
    handler.terminator = ''
    handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    handler.addFilter(REDACT)
    package = get_logger()
    with level_at_most(package, logging.DEBUG), sql_logging():
        package.addHandler(handler)
        try:
            yield
        finally:
            package.removeHandler(handler)


@contextmanager
def others_counted(level: int = logging.WARNING) -> Iterator[dict[str, int]]:
    """For the block, records of *level* and above from loggers not ours
    are counted per logger name instead of shown (the drill's generated
    writes run other apps' signal handlers in a process whose `default`
    is borrowed: wagtail's search indexer logs a traceback for every
    page there, which production does not see). Ours still pass."""
    counted: dict[str, int] = {}
    # One record goes through its handlers one after the other: counted
    # once (held, so its id cannot be reused by the next record).
    last: list[logging.LogRecord | None] = [None]

    class _Count(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.name == PACKAGE or record.name.startswith(
                    f'{PACKAGE}.') or record.levelno < level:
                return True
            if record is not last[0]:
                last[0] = record
                counted[record.name] = counted.get(record.name, 0) + 1
            return False

    quiet = _Count()
    handlers = set(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers.update(logger.handlers)
    if logging.lastResort is not None:
        handlers.add(logging.lastResort)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield counted
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
