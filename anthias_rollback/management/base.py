"""Shared plumbing for the commands: the operator's contract, in one place.

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
  statement on stderr.
Argparse types for the options are at the bottom: a bad value is exit 2
with one line, before anything changed.
"""
import argparse
import functools
import json
import math
import shutil
import sys
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from anthias_rollback import events, exit_codes, logs
from anthias_rollback.exceptions import RollbackError
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

    def handle(self, *args: Any, **options: Any) -> None:
        self.as_json, self.report_path = self.output_mode(options)
        options.update(json=self.as_json, report=self.report_path)
        self.json_data: dict[str, Any] = {}
        self.verdict_written = False
        with logs.command_logging(self.stderr, options['verbosity']):
            try:
                self.run_reporting_errors(*args, **options)
            except CommandError as err:
                self.conclude(err.returncode, one_line(err))
                raise
            except Exception as err:
                # A crash (a bug) still leaves one document on stdout;
                # the traceback follows on stderr.
                self.conclude(exit_codes.FAILED, first_line(err))
                raise
            self.conclude(exit_codes.OK, None)

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
        return {**self.json_data, 'schema_version': SCHEMA_VERSION,
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

    def fail(self, message: str, code: int = exit_codes.FAILED) -> None:
        raise CommandError(redact(message), returncode=code)

    def render_events(self, verbosity: int) -> 'EventRenderer | None':
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


class EventRenderer:
    """Renders `events.ProgressEvent`s for every command alike.

    -v1: a line per finished phase and per copied model, warnings on
    stderr; -v2 adds phase starts and batches. On a terminal, models get
    a progress bar instead of lines (as dumpdata: bars only on a tty).
    """

    def __init__(self, command: BaseCommand, verbosity: int,
                 bars: bool = False) -> None:
        self.command = command
        self.verbosity = verbosity
        self.bars: dict[str, Any] | None = {} if bars else None

    def __call__(self, event: events.ProgressEvent) -> None:
        out, style = self.command.stdout, self.command.style
        if event.kind == events.WARNING:
            self.command.stderr.write(style.WARNING(event.detail))
        elif event.kind == events.PHASE_START:
            if self.verbosity >= 2:
                out.write(f'-> {event.name}')
        elif event.kind == events.PHASE_DONE:
            self.phase_line(event)
        elif self.bars is not None:
            self.draw_bar(event)
        elif event.kind == events.MODEL_DONE and event.seconds:
            # (a scan without timing, e.g. the dry run's preflight, is
            # not a copy: no line)
            out.write(f'  {event.name}: {event.rows} rows in '
                      f'{event.seconds:.1f}s')
        elif event.kind == events.BATCH and self.verbosity >= 2:
            out.write(f'  {event.name}: {event.rows}/{event.total} rows '
                      f'({event.seconds:.1f}s)')

    def phase_line(self, event: events.ProgressEvent) -> None:
        style = self.command.style
        paint = {'ok': style.SUCCESS, 'failed': style.ERROR}.get(
            event.status, style.WARNING)
        line = (f'{event.name:<12} {event.status:<8} '
                f'{event.seconds:7.3f}s  {event.detail}').rstrip()
        if event.group and event.group not in ('setup', 'loop'):
            # A phase of an inner run (the drill's rollback): -v2 only.
            if self.verbosity < 2:
                return
            line = f'{"":13}{event.group} {line}'
        self.command.stdout.write(paint(line))

    def draw_bar(self, event: events.ProgressEvent) -> None:
        from tqdm import tqdm

        bar = self.bars.get(event.name)
        if event.kind == events.MODEL_START:
            # A pty that reports a 0x0 size (script(1), some CI runners)
            # gets no bar at all from tqdm; shutil falls back to 80x24.
            size = shutil.get_terminal_size()
            self.bars[event.name] = tqdm(
                total=event.total, desc=event.name, unit='rows',
                leave=False, file=self.command.stdout._out,
                ncols=size.columns, nrows=size.lines)
        elif bar is not None:
            bar.update(event.rows - bar.n)
            if event.kind == events.MODEL_DONE:
                self.bars.pop(event.name).close()

    def close(self) -> None:
        for bar in (self.bars or {}).values():
            bar.close()


# ------------------------------------------------------- argparse types
# Upper bounds keep a typo (30 digits) from reaching timedelta or a
# deadline as an OverflowError after work was done: exit 2 instead.
MAX_COUNT = 10**9
MAX_BATCH = 1_000_000
MAX_SECONDS = 7 * 24 * 3600.0
MAX_MINUTES = MAX_SECONDS / 60
MAX_HOURS = 10 * 366 * 24.0
MAX_DAYS = 100 * 366.0


def _shown(value: str) -> str:
    """A bad value for the error line: quoted, shortened, ASCII-safe."""
    text = value if len(value) <= 24 else f'{value[:20]}...'
    return ascii(text)


def whole_number(minimum: int = 1, maximum: int = MAX_COUNT
                 ) -> Callable[[str], int]:
    """argparse type: an int from *minimum* to *maximum*."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'{_shown(value)} is not a whole number') from None
        if number < minimum:
            raise argparse.ArgumentTypeError(
                f'must be at least {minimum}, not {_shown(value)}')
        if number > maximum:
            raise argparse.ArgumentTypeError(
                f'must be at most {maximum}, not {_shown(value)}')
        return number
    parse.__name__ = 'whole number'
    return parse


def number(minimum: float = 0.0, maximum: float = MAX_SECONDS,
           above_minimum: bool = True) -> Callable[[str], float]:
    """argparse type: a finite float up to *maximum*, greater than
    *minimum* (or equal to it, when not *above_minimum*)."""
    def parse(value: str) -> float:
        try:
            parsed = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'{_shown(value)} is not a number') from None
        if not math.isfinite(parsed):
            raise argparse.ArgumentTypeError(
                f'must be a finite number, not {_shown(value)}')
        if above_minimum and parsed <= minimum:
            raise argparse.ArgumentTypeError(
                f'must be greater than {minimum:g}, not {_shown(value)}')
        if parsed < minimum:
            raise argparse.ArgumentTypeError(
                f'must be {minimum:g} or more, not {_shown(value)}')
        if parsed > maximum:
            raise argparse.ArgumentTypeError(
                f'must be at most {maximum:g}, not {_shown(value)}')
        return parsed
    parse.__name__ = 'number'
    return parse


positive_int = whole_number(1, MAX_COUNT)
non_negative_int = whole_number(0, MAX_COUNT)
batch_size = whole_number(1, MAX_BATCH)
positive_float = number(0.0, MAX_SECONDS)
positive_ms = number(0.0, MAX_SECONDS * 1000)
non_negative_float = number(0.0, MAX_SECONDS, above_minimum=False)
percent = number(0.0, 100.0, above_minimum=False)
percent_above_zero = number(0.0, 100.0)
positive_minutes = number(0.0, MAX_MINUTES)
positive_hours = number(0.0, MAX_HOURS)
non_negative_days = number(0.0, MAX_DAYS, above_minimum=False)


def text_arg(value: str) -> str:
    """argparse type: text that is valid UTF-8.

    A non-UTF-8 argv byte arrives as a lone surrogate (surrogateescape)
    and would raise UnicodeEncodeError later, when printed or opened."""
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        raw = value.encode('utf-8', 'surrogateescape')
        raise argparse.ArgumentTypeError(
            f'{ascii(raw)[1:]} is not valid UTF-8') from None
    return value


def path_arg(value: str) -> str:
    """argparse type: a non-empty path that is valid UTF-8."""
    if not value:
        raise argparse.ArgumentTypeError('the path is empty')
    return text_arg(value)


def http_url(value: str) -> str:
    """argparse type: an http:// or https:// URL."""
    text_arg(value)
    if not value.startswith(('http://', 'https://')):
        raise argparse.ArgumentTypeError(
            f'{_shown(value)} must start with http:// or https://')
    return value

