"""The operator's contract every command keeps, in one place.

Commands subclass `RollbackCommand` and implement `run()`. Around it,
`handle()` keeps the promises every command makes:
- any RollbackError becomes one line on stderr and exit code 1 (or the
  code the CommandError carries), never a traceback;
- `--json` prints exactly one JSON document on stdout for every outcome
  (schema_version, ok, exit_code, error, then the command's data from
  `set_json()`), `--report PATH` writes the same document (0600);
- without --json the last stdout line is the verdict, also on failure
  (the CommandError line still goes to stderr for scripts);
- -v3 adds every record of the `anthias_rollback` loggers and every SQL
  statement on stderr;
- every plan the command makes leaves out the tables that differ
  between the engines (engine_tables.py), named once on stderr and in
  the JSON document (`left_out`).
Progress events are drawn by management.render; the argparse types of
the options are in management.types.
"""
import argparse
import atexit
import contextlib
import functools
import json
import os
import stat
import sys
import threading
from typing import Any, NoReturn

from django.core.management.base import BaseCommand, CommandError

from anthias_rollback import conf, engine_tables, exit_codes, logs, profiles
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.management.render import EventRenderer
from anthias_rollback.management.types import path_arg
from anthias_rollback.report import first_line, redact, write_json_report

SCHEMA_VERSION = 1
JSON_STDOUT = '-'


class RollbackCommand(BaseCommand):
    # Checks need no database; our own warnings still show under `check`.
    requires_system_checks: tuple = ()

    def create_parser(self, prog_name: str, subcommand: str,
                      **kwargs: Any) -> argparse.ArgumentParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.add_argument(
            '--json', nargs='?', const=JSON_STDOUT, default=None,
            metavar='PATH', type=path_arg,
            help='print one JSON document on stdout and nothing else, for '
                 'every outcome (schema_version, ok, exit_code, error and '
                 'the data); a PATH after it is deprecated: use --report')
        parser.add_argument(
            '--report', metavar='PATH', type=path_arg,
            help='also write that JSON document to PATH (0600), for '
                 'every outcome')
        parser.error = functools.partial(usage_error, parser)
        return parser

    def run_from_argv(self, argv: list[str]) -> NoReturn:
        """From the command line: the command, then `exit_now` (Django
        has closed its connections by then), not the interpreter's
        teardown."""
        try:
            super().run_from_argv(argv)
        except SystemExit as done:
            exit_now(done.code)
        exit_now(0)

    def handle(self, *args: Any, **options: Any) -> None:
        self.as_json, self.report_path = self.output_mode(options)
        options.update(json=self.as_json, report=self.report_path)
        self.json_data: dict[str, Any] = {}
        self.verdict_written = False
        with logs.command_logging(self.stderr, options['verbosity']):
            self.raise_pending_fence()
            self.register_engine_tables()
            try:
                self.run_concluding(*args, **options)
            finally:
                engine_tables.unregister()

    def run_concluding(self, *args: Any, **options: Any) -> None:
        try:
            self.run_reporting_errors(*args, **options)
        except CommandError as err:
            self.conclude(err.returncode, one_line(err))
            raise
        except Exception as err:
            # A crash (a bug) still leaves one document on stdout; the
            # traceback follows on stderr.
            self.conclude(exit_codes.FAILED, first_line(err))
            raise
        self.conclude(exit_codes.OK, None)

    def register_engine_tables(self) -> None:
        """Every plan of this command leaves out the tables that differ
        between the two profiles' schemas, found at its first plan; the
        list is named once (stderr; `left_out` in the JSON document)."""
        try:
            data_dir = conf.data_dir()
        except RollbackError:
            data_dir = None

        def named(found: engine_tables.EngineTables) -> None:
            line = found.line()
            if line and not self.as_json:
                self.stderr.write(self.style.WARNING(line))

        engine_tables.register_aliases(profiles.SQLITE, profiles.POSTGRES,
                                       data_dir, named)

    def raise_pending_fence(self) -> None:
        """Every command is a first chance to fence a PostgreSQL that a
        standby or backup restore left unfenced (it was down then). Only
        reads the run state unless a fence is pending; never fails the
        command (a bad setting is the command's own to report)."""
        from anthias_rollback.rollback import state

        try:
            done = state.raise_pending_fence(conf.data_dir(),
                                             profiles.POSTGRES)
        except Exception:  # noqa: BLE001 - a side duty; the command runs
            return
        if done:
            self.stderr.write(done)

    def run_reporting_errors(self, *args: Any, **options: Any) -> None:
        try:
            self.run(*args, **options)
        except RollbackError as err:
            raise CommandError(redact(str(err)),
                               returncode=exit_codes.FAILED) from err
        except KeyboardInterrupt:
            raise CommandError('interrupted; nothing was changed unless '
                               'reported above',
                               returncode=exit_codes.FAILED) from None

    def run(self, *args: Any, **options: Any) -> None:
        raise NotImplementedError

    def output_mode(self, options: dict[str, Any]) -> tuple[bool, Any]:
        """(JSON on stdout?, report path or None) from --json/--report."""
        value, report = options.get('json'), options.get('report')
        if value in (None, False):
            return False, report
        if value is True or value == JSON_STDOUT:
            return True, report
        # `--json PATH` (migrate_to_postgres, validate_migration before
        # --report existed) keeps working for one release.
        self.stderr.write(self.style.WARNING(
            'warning: --json PATH is deprecated and will be removed in the '
            'next release: use --report PATH (--json alone prints the JSON '
            'document on stdout)'))
        return False, report or value

    def set_json(self, data: dict[str, Any]) -> None:
        """The command's data for the JSON document, which handle()
        prints (--json) and writes (--report) once, at the end."""
        self.json_data = dict(data)

    def document(self, code: int, error: str | None) -> dict[str, Any]:
        found = engine_tables.current()
        left_out = found.as_dict() if found and found.tables else None
        return {'left_out': left_out, **self.json_data,
                'schema_version': SCHEMA_VERSION,
                'ok': code == exit_codes.OK, 'exit_code': code,
                'error': error}

    def conclude(self, code: int, error: str | None) -> None:
        """Write the report, then the JSON document or the verdict line.

        A report that cannot be written turns a success into exit 1 (the
        caller asked for the file); after a failure it is one more line
        on stderr and the failure's code stands."""
        unwritten = self.write_report(code, error)
        if unwritten and code != exit_codes.OK:
            self.stderr.write(self.style.ERROR(unwritten))
            unwritten = None
        elif unwritten:
            code, error = exit_codes.FAILED, unwritten
        if self.as_json:
            self.stdout.write(json.dumps(redact(self.document(code, error)),
                                         indent=2, default=str,
                                         sort_keys=True))
        elif code != exit_codes.OK and not self.verdict_written:
            self.write_verdict(error or 'failed', ok=False)
        if unwritten:
            raise CommandError(unwritten, returncode=code)

    def write_report(self, code: int, error: str | None) -> str | None:
        """--report PATH: the document (0600); the error line if not."""
        if not self.report_path:
            return None
        try:
            write_json_report(self.report_path, self.document(code, error))
        except (OSError, RollbackError) as err:
            return redact(f'could not write the report {self.report_path}: '
                          f'{first_line(err)}')
        return None

    def write_verdict(self, line: str, ok: bool = True) -> None:
        """The final stdout line (the verdict); handle() adds none after
        it when the command then fails."""
        style = self.style.SUCCESS if ok else self.style.ERROR
        self.stdout.write(style(redact(line)))
        self.verdict_written = True

    def is_tty(self) -> bool:
        stream = getattr(self.stdout, '_out', sys.stdout)
        return hasattr(stream, 'isatty') and stream.isatty()

    def fail(self, message: str, code: int = exit_codes.FAILED) -> NoReturn:
        raise CommandError(redact(message), returncode=code)

    def render_events(self, verbosity: int) -> EventRenderer | None:
        """The progress callable for a core function (None below -v1)."""
        if verbosity < 1:
            return None
        return EventRenderer(self, verbosity, bars=self.is_tty())


def one_line(err: BaseException) -> str:
    """A CommandError's message as the one line scripts read."""
    text = str(err).strip()
    return text if '\n' not in text else first_line(err)


def usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit 2 with one line (argparse would print the usage first); under
    call_command a CommandError carrying the same code 2."""
    if not getattr(parser, 'called_from_command_line', False):
        raise CommandError(f'Error: {message}', returncode=exit_codes.USAGE)
    parser.exit(exit_codes.USAGE, f'{parser.prog}: error: {message} (see '
                                  f'--help)\n')


def exit_now(code: str | int | None) -> NoReturn:
    """End the process with *code* as `sys.exit` would, without freeing
    every object first.

    After a rollback at 1,000,000 rows the interpreter's teardown took
    0.17-0.25 s of the operator's wait (bench/bench_incremental.py) and
    did nothing the device needs once the command's files are closed.
    What `sys.exit` would still do is done here: the atexit handlers run
    (logging's flush and close among them), stdout and stderr are
    flushed; a failed stdout flush exits 120, as CPython's does. If a
    file is still open for writing (an SQLite connection left to the
    garbage collector: closing it may checkpoint) or another non-daemon
    thread still runs, the interpreter's own exit is taken instead."""
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive()
           for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()   # each runs once: the call clears the list
    if _file_open_for_writing() is not False:
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        status = status or 120
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(status)


def _file_open_for_writing() -> bool | None:
    """Whether this process holds a regular file open for writing, other
    than stdin, stdout and stderr (None: cannot tell, no /proc)."""
    try:
        fds = [int(fd) for fd in os.listdir('/proc/self/fd')]
        for fd in fds:
            if fd <= 2:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                with open(f'/proc/self/fdinfo/{fd}') as info:
                    flags = next(int(line.split()[1], 8) for line in info
                                 if line.startswith('flags:'))
            except (OSError, StopIteration):
                continue   # closed meanwhile (the listing's own fd)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                return True
    except OSError:
        return None
    return False
