"""Shared plumbing for the commands: errors to CommandError, JSON output,
and the one renderer of progress events.

Commands subclass `RollbackCommand` and implement `run()`; any
RollbackError it raises becomes one line on stderr and exit code 1 (or the
code the error carries), never a traceback.
"""
import argparse
import json
import shutil
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from anthias_rollback import events, exit_codes
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.report import redact


class RollbackCommand(BaseCommand):
    # Checks need no database; our own warnings still show under `check`.
    requires_system_checks: tuple = ()

    def handle(self, *args: Any, **options: Any) -> None:
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

    def write_json(self, data: Any) -> None:
        """The JSON document alone on stdout (secrets redacted)."""
        self.stdout.write(json.dumps(redact(data), indent=2, default=str,
                                     sort_keys=True))

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


def positive_int(value: str) -> int:
    """argparse type: a whole number >= 1 (else a usage error, exit 2)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a whole '
                                         'number') from None
    if number < 1:
        raise argparse.ArgumentTypeError('must be at least 1')
    return number


def positive_float(value: str) -> float:
    """argparse type: a number > 0 (else a usage error, exit 2)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a number') \
            from None
    if number <= 0:
        raise argparse.ArgumentTypeError('must be greater than 0')
    return number
