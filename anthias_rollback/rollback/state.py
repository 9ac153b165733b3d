"""What one rollback run is made of: its options (RollbackOptions), its
returned result (RollbackResult, also what a report file holds), the
mutable state the phases share while it runs (RunState, over the shared
PhaseRunner), the vocabularies its reports use (Source, Outcome,
LossStatus: StrEnums, so the JSON holds the same strings), and the small
run-state file (rollback_state.json) that tells the next preflight a run
was interrupted and whether the write fence on PostgreSQL is still up.
Every other module of the package builds on these; this one imports none
of them.
"""
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from anthias_rollback import conf, fsutil, profiles, transfer
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.phases import Deadline, PhaseResult, PhaseRunner
from anthias_rollback.window import journal as window_journal


class Source(StrEnum):
    """Where a rollback's new SQLite file came from."""
    POSTGRES = 'postgres'
    BACKUP = 'backup'
    # PostgreSQL down: the standby replicate_changes kept (auto's choice
    # alone: --source does not offer it).
    STANDBY = 'standby'


class Outcome(StrEnum):
    """How a rollback run ended (RollbackResult.outcome)."""
    ROLLED_BACK = 'rolled back'
    ROLLED_BACK_WITH_A_LOSS = 'rolled back with a loss'
    DRY_RUN = 'dry run'
    FOLLOW_UP_FAILED = 'follow-up failed'
    FAILED = 'failed'


class LossStatus(StrEnum):
    """The loss a run measured (RollbackResult.loss; plan.measured_loss)."""
    PROVEN_NONE = 'proven-none'   # the journal proof found nothing
    NONE = 'none'                 # a backup lacking nothing (compared)
    LOST = 'lost'
    UNPROVEN = 'unproven'         # from PostgreSQL without a journal
    BOUNDED = 'bounded'           # the standby's position bounds it
    UNKNOWN = 'unknown'           # a backup PostgreSQL could not check
    NOT_RUN = 'not-run'           # refused before it started


AUTO = 'auto'
# What --source accepts; auto picks postgres, the standby or a backup.
SOURCE_CHOICES = (AUTO, Source.POSTGRES.value, Source.BACKUP.value)
STATE_NAME = 'rollback_state.json'
LOG_NAME = 'rollback.log'


@dataclass(frozen=True)
class RollbackOptions:
    source: str = AUTO            # one of SOURCE_CHOICES
    source_explicit: bool = False
    live_path: Path | None = None
    backup_path: Path | None = None
    postgres_alias: str = profiles.POSTGRES
    sqlite_alias: str = profiles.SQLITE
    emergency: bool = False
    dry_run: bool = False
    verify: bool = True
    preserve_postgres: bool = False
    fence: bool = True
    timeout_seconds: float = 300.0
    restart: bool = True
    batch_size: int = 5_000
    # From PostgreSQL: copy every row even when the journal's tail on a
    # base (standby or cutover file) would do.
    full: bool = False
    # None: the configured dirs. A drill points them at its sandbox.
    data_dir: Path | None = None
    backup_dir: Path | None = None


@dataclass(frozen=True)
class RollbackResult:
    outcome: Outcome
    exit_code: int
    source: Source | None
    source_reason: str
    live_path: str
    safety_copy: str | None
    backup_used: str | None
    postgres_dump: str | None
    at_risk_file: str | None
    at_risk_rows: dict[str, int] | None
    at_risk_note: str
    resurrected_rows: dict[str, int] | None
    rows: dict[str, int]
    since_cutover: dict[str, Any] | None
    phases: tuple[PhaseResult, ...]
    warnings: tuple[str, ...]
    error: str | None
    started_at: str
    finished_at: str
    seconds: float
    downtime_seconds: float | None
    report_path: str | None = None
    # The measured loss; lost_writes lists what SQLite lacks (model, pk,
    # operation).
    loss: LossStatus = LossStatus.UNPROVEN
    loss_detail: str = ''
    lost_writes: tuple[dict, ...] = ()
    shortfall: dict[str, dict[str, int]] | None = None
    cutover_forced: bool = False
    # Restored from the standby (PostgreSQL down): what it held, i.e.
    # every write committed before position_at (standby.Position).
    standby_bound: dict[str, Any] | None = None
    # How the new file was built from PostgreSQL: {'method': 'incremental'
    # | 'full', 'detail' or 'reason', ...} (rollback.incremental).
    copy: dict[str, Any] | None = None
    # This run finished a run killed after its swap, which started then.
    resumed_from: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rows_at_risk(self) -> int | None:
        if self.at_risk_rows is None:
            return None
        return sum(self.at_risk_rows.values())


@dataclass
class RunState:
    """Mutable state of one run; turned into a RollbackResult at the end.
    Phases, warnings and the deadline are the shared PhaseRunner's."""
    options: RollbackOptions
    data_dir: Path
    runner: PhaseRunner
    live_path: Path | None = None
    source: Source | None = None
    source_reason: str = ''
    safety_copy: Path | None = None
    backup_used: Path | None = None
    dump_path: Path | None = None
    at_risk_file: Path | None = None
    at_risk_rows: dict[str, int] | None = None
    at_risk_note: str = ''
    resurrected_rows: dict[str, int] | None = None
    rows: dict[str, int] = field(default_factory=dict)
    expected_rows: dict[str, int] = field(default_factory=dict)
    since_cutover: dict[str, Any] | None = None
    flipped_at: float | None = None
    fenced: bool = False
    swapped: bool = False
    journal: window_journal.WindowState | None = None
    snapshot: str | None = None
    proof: window_journal.LossProof | None = None
    shortfall: list[window_journal.Shortfall] = field(default_factory=list)
    # PostgreSQL's row counts in the build's snapshot, which the cutover
    # accounting checked (by label): the cutover summary reports them
    # instead of counting again.
    source_counts: dict[str, int] = field(default_factory=dict)
    standby_bound: dict[str, Any] | None = None
    copy: dict[str, Any] | None = None
    # Set when this run finishes one that was killed after its swap:
    # that run's recorded state (rollback.steps.interrupted_after_swap).
    resumed: dict[str, Any] | None = None
    # quick_check of an incremental build's copied base, run while its
    # tail was applied (rollback.incremental); the verify phase uses it.
    base_quick_check: str | None = None
    # What that check was (the verify phase's line): of the copied base
    # during the build, or recorded by the replicator for the standby's
    # rows when the standby itself was promoted.
    base_check_note: str | None = None
    # Why the standby was not promoted (rollback.incremental), if not.
    promote_problem: str | None = None

    @property
    def cutover_forced(self) -> bool:
        if self.resumed is not None:
            return bool(self.resumed['facts'].get('cutover_forced'))
        return bool(self.journal and self.journal.forced)

    @property
    def live_file(self) -> Path:
        """The live SQLite file (preflight sets live_path first)."""
        assert self.live_path is not None
        return self.live_path

    @property
    def deadline(self) -> Deadline:
        return self.runner.deadline

    @property
    def backup_dir(self) -> Path:
        return Path(self.options.backup_dir or conf.backup_dir())

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / 'reports'

    def phase(self, name: str, check_deadline: bool = True
              ) -> AbstractContextManager[dict[str, Any]]:
        return self.runner.phase(name, check_deadline=check_deadline)

    def warn(self, message: str) -> None:
        self.runner.warn(message)


def count_rows(alias: str) -> dict[str, int]:
    """Row count per label of every model the transfer moves (including
    `django_migrations`) on *alias*."""
    return {m._meta.label: m._base_manager.using(alias).count()
            for m in transfer.transfer_models()}


# What a run killed after its swap leaves for the rerun that finishes it
# (JSON: paths as text, the shortfall as dicts, the phases so far).
_FACTS = ('source', 'source_reason', 'at_risk_rows', 'at_risk_note',
          'resurrected_rows', 'rows', 'expected_rows', 'since_cutover',
          'fenced', 'snapshot', 'standby_bound', 'copy')
_PATH_FACTS = ('live_path', 'safety_copy', 'backup_used', 'dump_path',
               'at_risk_file')


def run_facts(run: RunState) -> dict[str, Any]:
    facts = {name: getattr(run, name) for name in _FACTS}
    facts.update({name: str(getattr(run, name))
                  if getattr(run, name) is not None else None
                  for name in _PATH_FACTS})
    facts['shortfall'] = [asdict(s) for s in run.shortfall]
    facts['cutover_forced'] = run.cutover_forced
    facts['phases'] = [asdict(p) for p in run.runner.phases]
    facts['warnings'] = list(run.runner.warnings)
    return facts


def restore_facts(run: RunState, recorded: dict[str, Any]) -> None:
    """Put a killed run's recorded facts (run_facts) into *run*."""
    facts = recorded['facts']
    for name in _FACTS:
        setattr(run, name, facts.get(name))
    for name in _PATH_FACTS:
        setattr(run, name, Path(facts[name]) if facts.get(name) else None)
    run.rows = run.rows or {}
    run.expected_rows = run.expected_rows or {}
    run.fenced = bool(run.fenced)
    run.shortfall = [window_journal.Shortfall(**s)
                     for s in facts.get('shortfall') or []]
    run.runner.phases[:0] = [PhaseResult(**p) for p in facts.get('phases')
                             or []]
    run.runner.warnings[:0] = list(facts.get('warnings') or [])
    run.swapped = True
    run.resumed = recorded


def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_NAME


def read_run_state(data_dir: Path) -> dict[str, Any]:
    """The last run's recorded state ({} when none or unreadable: it only
    tells preflight that a run was interrupted)."""
    try:
        return fsutil.read_json(state_path(data_dir), 'rollback state',
                                RollbackError) or {}
    except RollbackError:
        return {}


# The run state's `fence` after a rollback that could not fence
# PostgreSQL (a standby or backup restore while it was down).
FENCE_PENDING = 'pending'


def fence_pending(data_dir: Path) -> bool:
    """Did the last rollback leave PostgreSQL unfenced (reads only)?"""
    return read_run_state(data_dir).get('fence') == FENCE_PENDING


def raise_pending_fence(data_dir: Path, alias: str) -> str | None:
    """After a rollback that could not fence *alias* (it was down), raise
    the fence the first time one of our processes reaches it: stale app
    processes must not write into the abandoned database once it is
    back. Only while the active profile is still sqlite. Returns what
    was done, or None (nothing pending, or PostgreSQL still down). Never
    raises for a database problem; writes the run state."""
    from django.db import DatabaseError, connections

    from anthias_rollback import schema
    from anthias_rollback.engines import postgres_journal as pj

    state = read_run_state(data_dir)
    if state.get('fence') != FENCE_PENDING:
        return None
    try:
        if profiles.resolve_active_profile(data_dir).name != profiles.SQLITE:
            return None
        schema.check_connection(alias)
        if pj.postgres_journal_installed(alias):
            pj.postgres_raise_fence(alias)
            fence, done = 'up', ('raised the write fence on PostgreSQL '
                                 'left unfenced by the rollback')
        else:
            fence, done = 'none', ('PostgreSQL has no change journal: '
                                   'there is no fence to raise')
    except (RollbackError, DatabaseError):
        connections[alias].close()
        return None
    kept = {k: v for k, v in state.items() if k not in ('status', 'at')}
    write_run_state(data_dir, state.get('status', 'done'),
                    **{**kept, 'fence': fence})
    return done


def write_run_state(data_dir: Path, status: str, **extra: Any) -> None:
    state = {'status': status,
             'at': datetime.now(UTC).isoformat(), **extra}
    fsutil.atomic_write_json(state_path(data_dir), state, mode=0o600)
