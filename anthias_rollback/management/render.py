"""Progress events drawn for the operator, the same for every command:
a line per finished phase and per copied model, warnings on stderr, bars
on a terminal (`RollbackCommand.render_events` makes one).
"""
import shutil
from typing import Any

from django.core.management.base import BaseCommand

from anthias_rollback import events
from anthias_rollback.phases import PhaseStatus


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
        paint = {str(PhaseStatus.OK): style.SUCCESS,
                 str(PhaseStatus.FAILED): style.ERROR}.get(
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

        assert self.bars is not None   # bars=True
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
