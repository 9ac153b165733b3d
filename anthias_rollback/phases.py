"""One run scaffold: a deadline, timed phases, warnings, a log line each.

The rollback and the drill (and anything long that reports phases) use
`PhaseRunner`; the results land in their reports as `PhaseResult`s and
reach the terminal as `events.ProgressEvent`s. Every phase start, phase
end and warning is also a record on the run's logger
(`anthias_rollback.<checkpoint or name>`), and with a log_path a line in
that file. The module never prints.
"""
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from anthias_rollback import events, faults, logs
from anthias_rollback.exceptions import DeadlineError
from anthias_rollback.report import first_line, redact


class PhaseStatus(StrEnum):
    """How a phase ended (reports and JSON hold the value)."""
    OK = 'ok'
    SKIPPED = 'skipped'
    WARNING = 'warning'
    FAILED = 'failed'


@dataclass(frozen=True)
class PhaseResult:
    name: str
    status: PhaseStatus
    seconds: float
    detail: str
    group: str = ''   # the drill's 'setup' | 'loop'; '' elsewhere


class Deadline:
    """One deadline for a whole run; phases check it before they start.

    *expired* is the error text, formatted with `seconds` and `what`.
    """

    def __init__(self, seconds: float,
                 expired: str = 'deadline of {seconds:.0f}s reached during '
                                '{what}') -> None:
        self.seconds = seconds
        self.expired = expired
        self.ends = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def check(self, what: str) -> None:
        if self.remaining() <= 0:
            raise DeadlineError(self.expired.format(seconds=self.seconds,
                                                    what=what))


def phase_line(phase: PhaseResult) -> str:
    """The log line of a finished phase (without the time stamp)."""
    group = f' group={phase.group}' if phase.group else ''
    return (f'phase={phase.name}{group} status={phase.status} '
            f'seconds={phase.seconds:.3f} {phase.detail}').rstrip()


# A phase's record level by status: journald filters on it.
LEVELS = {PhaseStatus.OK: logging.INFO, PhaseStatus.SKIPPED: logging.INFO,
          PhaseStatus.WARNING: logging.WARNING,
          PhaseStatus.FAILED: logging.ERROR}


@dataclass
class PhaseRunner:
    """Times phases, collects warnings, forwards events.

    *checkpoint* names the fault-injection points: after each phase,
    `faults.checkpoint(f'{checkpoint}:{name}-done')` (tests kill there).
    It (else *name*, else 'run') also names the logger. *log_path* gets
    the records while the runner is entered (`with runner:`, the whole
    run) or, when it is not, while each phase or warning is logged.
    """
    deadline: Deadline
    progress: events.Progress = None
    log_path: Path | None = None
    checkpoint: str = ''
    name: str = ''
    phases: list[PhaseResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat())
    _log_files: list[ExitStack] = field(default_factory=list, init=False,
                                        repr=False)

    @property
    def logger(self) -> logging.Logger:
        return logs.get_logger(self.checkpoint or self.name or 'run')

    def __enter__(self) -> None:
        self._open_log()

    def __exit__(self, *exc_info: object) -> None:
        self._close_log()

    def _open_log(self) -> None:
        stack = ExitStack()
        # Only the outermost entry opens the file: nested phases share it.
        if self.log_path is not None and not self._log_files:
            stack.enter_context(logs.file_log(self.logger, self.log_path))
        self._log_files.append(stack)

    def _close_log(self) -> None:
        self._log_files.pop().close()

    @contextmanager
    def attached_log(self) -> Iterator[logging.Logger]:
        """The run's logger, with the log file attached meanwhile."""
        self._open_log()
        try:
            yield self.logger
        finally:
            self._close_log()

    def emit(self, kind: str, name: str = '', **fields) -> None:
        events.emit(self.progress, kind, name, **fields)

    def warn(self, message: str) -> None:
        message = redact(message)
        self.warnings.append(message)
        with self.attached_log() as log:
            log.warning('warning: %s', message)
        self.emit(events.WARNING, detail=message)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextmanager
    def phase(self, name: str, group: str = '',
              check_deadline: bool = True) -> Iterator[dict[str, Any]]:
        """Run one phase: yields a record whose 'status' and 'detail' the
        body may set. An exception marks it failed and propagates."""
        if check_deadline:
            self.deadline.check(name)
        with self.attached_log() as log:
            log.info('phase-start=%s%s', name,
                     f' group={group}' if group else '')
            self.emit(events.PHASE_START, name, group=group)
            record: dict[str, Any] = {'status': PhaseStatus.OK,
                                      'detail': ''}
            started = time.monotonic()
            try:
                yield record
            except BaseException as err:
                record['status'] = PhaseStatus.FAILED
                record['detail'] = first_line(err)
                raise
            finally:
                done = PhaseResult(name, record['status'],
                                   round(time.monotonic() - started, 3),
                                   redact(record['detail']), group)
                self.phases.append(done)
                log.log(LEVELS.get(done.status, logging.INFO),
                        phase_line(done))
                self.emit(events.PHASE_DONE, name, status=done.status,
                          seconds=done.seconds, detail=done.detail,
                          group=group)
        if self.checkpoint:
            faults.checkpoint(f'{self.checkpoint}:{name}-done')
