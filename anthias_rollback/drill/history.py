"""The drill's records: its JSON report, one history line per drill, and
the newest line read back (what readiness reports).

The drill's result (DrillResult) is defined here, beside the records it
becomes, so that drill.run imports this module and not the other way
round; readiness, which only reads the history, does not import the
drill and everything it runs.
"""
import json
import os
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anthias_rollback import fsutil
from anthias_rollback.exceptions import DrillError
from anthias_rollback.phases import PhaseResult
from anthias_rollback.report import redact, write_json_report

DRILLS_DIR_NAME = 'drills'
HISTORY_NAME = 'history.jsonl'
PASS, FAIL, ERROR = 'PASS', 'FAIL', 'ERROR'


@dataclass(frozen=True)
class DrillResult:
    outcome: str              # PASS | FAIL | ERROR
    exit_code: int            # 0 | 3 | 1
    failed_step: str | None
    error: str | None
    steps: tuple[PhaseResult, ...]   # group: setup | loop
    source: str               # what the sandbox was made from
    rows: dict[str, int]      # rows per model in the sandbox
    server: str               # configured | embedded | ''
    postgres: str             # describe_alias() of the scratch database
    scratch_database: str
    writes: dict[str, dict[str, int]]
    rollback_seconds: float | None
    downtime_seconds: float | None
    rollback: dict[str, Any] | None
    sandbox: str
    kept: bool
    warnings: tuple[str, ...]
    started_at: str
    finished_at: str
    seconds: float
    report_path: str | None = None

    @property
    def passed(self) -> bool:
        return self.outcome == PASS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DrillSummary:
    """One line of the drill history: what readiness reports."""
    finished_at: datetime
    outcome: str
    seconds: float
    rollback_seconds: float | None
    downtime_seconds: float | None
    failed_step: str | None
    error: str | None
    rows: int
    server: str
    report_path: str | None

    @property
    def passed(self) -> bool:
        return self.outcome == PASS


def drills_dir(data_dir: Path) -> Path:
    """<data dir>/drills: the drill's reports and history."""
    return Path(data_dir) / DRILLS_DIR_NAME


def history_path(data_dir: Path) -> Path:
    return drills_dir(data_dir) / HISTORY_NAME


def append_history(data_dir: Path, result: DrillResult) -> Path:
    """One JSON line per drill in <data dir>/drills/history.jsonl (0600).

    Appended with O_APPEND and fsync'd: a crash leaves at worst a torn
    last line, which `last_drill` skips.
    """
    path = history_path(data_dir)
    fsutil.ensure_private_dir(path.parent)
    line = json.dumps(redact({
        'finished_at': result.finished_at, 'outcome': result.outcome,
        'seconds': result.seconds,
        'rollback_seconds': result.rollback_seconds,
        'downtime_seconds': result.downtime_seconds,
        'failed_step': result.failed_step, 'error': result.error,
        'rows': sum(result.rows.values()), 'server': result.server,
        'report_path': result.report_path}), sort_keys=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + '\n').encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def record_drill(data_dir: Path, result: DrillResult) -> DrillResult:
    """Write *result* as <data dir>/drills/drill_<stamp>.json (0600) and
    append it to the history; returns it with its report_path."""
    stamp = datetime.now(UTC).strftime('%Y%m%d_%H%M%S_%f')
    path = drills_dir(data_dir) / f'drill_{stamp}.json'
    result = replace(result, report_path=str(path))
    write_json_report(path, result.as_dict())
    append_history(data_dir, result)
    return result


def _summary(data: dict[str, Any]) -> DrillSummary:
    finished = datetime.fromisoformat(data['finished_at'])
    return DrillSummary(
        finished_at=finished, outcome=str(data['outcome']),
        seconds=float(data['seconds']),
        rollback_seconds=data.get('rollback_seconds'),
        downtime_seconds=data.get('downtime_seconds'),
        failed_step=data.get('failed_step'), error=data.get('error'),
        rows=int(data.get('rows') or 0), server=str(data.get('server', '')),
        report_path=data.get('report_path'))


def last_drill(data_dir: Path) -> DrillSummary | None:
    """The newest drill in <data dir>/drills/history.jsonl, or None when
    no drill ever ran. Reads only; a torn or foreign line is skipped.
    Raises DrillError when the history exists but cannot be read."""
    path = history_path(data_dir)
    try:
        lines = path.read_text(errors='replace').splitlines()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DrillError(f'cannot read the drill history {path}: '
                         f'{err.strerror}') from None
    for line in reversed(lines):
        try:
            return _summary(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue
    return None
