"""One run scaffold: a deadline, timed phases, warnings, a log line each.

The rollback and the drill (and anything long that reports phases) use
`PhaseRunner`; the results land in their reports as `PhaseResult`s and
reach the terminal as `events.ProgressEvent`s. The module never prints.
"""
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from anthias_rollback import events, faults
from anthias_rollback.exceptions import DeadlineError
from anthias_rollback.report import first_line, redact

OK, SKIPPED, WARNING, FAILED = 'ok', 'skipped', 'warning', 'failed'


@dataclass(frozen=True)
class PhaseResult:
    name: str
    status: str   # ok | skipped | warning | failed
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


def append_log_line(path: Path, phase: PhaseResult) -> None:
    """One line per phase in the run's log file (0600, appended)."""
    stamp = datetime.now(timezone.utc).isoformat(timespec='seconds')
    group = f' group={phase.group}' if phase.group else ''
    line = (f'{stamp} phase={phase.name}{group} status={phase.status} '
            f'seconds={phase.seconds:.3f} {phase.detail}').rstrip()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, 'a') as fh:
        fh.write(redact(line) + '\n')


@dataclass
class PhaseRunner:
    """Times phases, collects warnings, forwards events.

    *checkpoint* names the fault-injection points: after each phase,
    `faults.checkpoint(f'{checkpoint}:{name}-done')` (tests kill there).
    """
    deadline: Deadline
    progress: events.Progress = None
    log_path: Path | None = None
    checkpoint: str = ''
    phases: list[PhaseResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def emit(self, kind: str, name: str = '', **fields) -> None:
        events.emit(self.progress, kind, name, **fields)

    def warn(self, message: str) -> None:
        message = redact(message)
        self.warnings.append(message)
        self.emit(events.WARNING, detail=message)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextmanager
    def phase(self, name: str, group: str = '',
              check_deadline: bool = True) -> Iterator[dict[str, str]]:
        """Run one phase: yields a record whose 'status' and 'detail' the
        body may set. An exception marks it failed and propagates."""
        if check_deadline:
            self.deadline.check(name)
        self.emit(events.PHASE_START, name, group=group)
        record = {'status': OK, 'detail': ''}
        started = time.monotonic()
        try:
            yield record
        except BaseException as err:
            record['status'] = FAILED
            record['detail'] = first_line(err)
            raise
        finally:
            done = PhaseResult(name, record['status'],
                               round(time.monotonic() - started, 3),
                               redact(record['detail']), group)
            self.phases.append(done)
            if self.log_path is not None:
                append_log_line(self.log_path, done)
            self.emit(events.PHASE_DONE, name, status=done.status,
                      seconds=done.seconds, detail=done.detail, group=group)
        if self.checkpoint:
            faults.checkpoint(f'{self.checkpoint}:{name}-done')
