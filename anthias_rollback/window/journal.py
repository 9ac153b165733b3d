"""The rollback window on PostgreSQL: change journal, write fence, proof.

Opened by `switch_database --to postgres` (journal triggers installed in
the transaction that records the cutover), ended by
`end_rollback_window`. While it is open:

- `take_fence` stops every journaled write, by every role and session,
  and waits for the transactions that already wrote;
- `prove_copy` says, from the journal and the rows' own transaction ids,
  which writes a copy taken in a given snapshot does not hold;
- `account_cutover` checks PostgreSQL against the cutover: rows at the
  cutover + journaled inserts - journaled deletes must be the rows now.

Engine work is in engines.postgres_journal; this module maps tables to
models and decides. It never prints.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import DatabaseError, transaction

from anthias_rollback import faults, models_graph, profiles, schema
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.fields import key_columns
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.window import standby as window_standby


@dataclass(frozen=True)
class WindowState:
    installed: bool
    fence: str | None            # 'up' | 'open' | None (no journal)
    cutover_at: str | None
    forced: bool
    entries: int
    bytes: int
    oldest: str | None
    tables: tuple[str, ...]
    # What makes the window untrustworthy: planned tables without an
    # enabled trigger (writes neither journaled nor fenced), or triggers
    # left without the journal they write to (every write fails).
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class FenceResult:
    taken: bool
    waited_seconds: float
    terminated: tuple[int, ...]
    refused: tuple[int, ...]     # sessions the server would not end
    still_open: tuple[dict, ...]


@dataclass(frozen=True)
class LostWrite:
    model: str
    pk: str | None
    operation: str               # insert | update | delete | truncate


@dataclass(frozen=True)
class LossProof:
    """What a copy in *snapshot* lacks. proven_none only when every check
    ran and found nothing."""
    snapshot: str
    lost: tuple[LostWrite, ...]
    count_differences: dict[str, tuple[int, int]] = field(
        default_factory=dict)      # label -> (rows copied, rows now)
    checked: tuple[str, ...] = ()

    @property
    def proven_none(self) -> bool:
        return not self.lost and not self.count_differences


@dataclass(frozen=True)
class Shortfall:
    model: str
    expected: int                 # cutover rows + inserts - deletes
    found: int


_OPS = {'I': 'insert', 'U': 'update', 'D': 'delete', 'T': 'truncate'}


def _models_by_table() -> dict[str, Any]:
    return {m._meta.db_table: m for m in models_graph.plan_models().models}


def open_window(sqlite_alias: str, postgres_alias: str, *,
                forced: bool = False,
                standby_dir: Path | None = None) -> dict[str, Any]:
    """Install the journal on *postgres_alias* and record the cutover,
    in one transaction with the planned tables locked against writers,
    so the recorded counts are exactly the journal's starting point.
    Also lowers a fence left by a rollback (a new window). With
    *standby_dir*, also snapshots *sqlite_alias*'s file there as the
    cutover file replicate_changes starts from (under the same lock; its
    path is in info['standby_cutover'], or why not). Returns the
    recorded info: per model, rows on each side."""
    plan = list(models_graph.plan_models().models)
    with transaction.atomic(using=postgres_alias):
        pj.postgres_lock_tables(postgres_alias,
                                [m._meta.db_table for m in plan])
        info: dict[str, Any] = {'rows': {}, 'sqlite_rows': {}}
        for model in plan:
            label = model._meta.label
            info['rows'][label] = model._base_manager.using(
                postgres_alias).count()
            info['sqlite_rows'][label] = model._base_manager.using(
                sqlite_alias).count()
        if standby_dir is not None:
            info['standby_cutover'] = window_standby.take_cutover_file(
                profiles.sqlite_alias_path(sqlite_alias), standby_dir,
                window=pj.postgres_current_txid(postgres_alias),
                expected_rows={m._meta.db_table: info['rows'][
                    m._meta.label] for m in plan})
        pj.postgres_install_journal(postgres_alias, plan, info, forced)
    return info


def window_state(alias: str) -> WindowState:
    """The window on *alias* now (reads only), with its problems."""
    parts = pj.postgres_journal_parts(alias)
    remnants = pj.postgres_trigger_tables(alias)
    if not all(parts.values()):
        missing = [name for name, there in parts.items() if not there]
        problems: tuple[str, ...] = ()
        if remnants or any(parts.values()):
            broken = (f'the change journal is broken: {", ".join(missing)} '
                      f'missing, triggers left on {len(remnants)} table(s) '
                      f'({", ".join(remnants[:5])}); writes to them fail. '
                      'Run end_rollback_window to remove what is left')
            problems = (broken,)
        return WindowState(False, None, None, False, 0, 0, None,
                           tuple(remnants), problems)
    cutover = pj.postgres_cutover(alias) or {}
    size = pj.postgres_journal_size(alias)
    journaled = tuple(pj.postgres_journaled_tables(alias))
    existing = set(pj.postgres_existing_tables(alias, _models_by_table()))
    bare = sorted(existing - set(journaled))
    problems = ()
    if bare:
        untracked = (f'{len(bare)} planned table(s) without the journal '
                     f'trigger ({", ".join(bare[:5])}): writes to them are '
                     'neither journaled nor fenced')
        problems = (untracked,)
    return WindowState(
        True, pj.postgres_fence_state(alias),
        cutover['at'].isoformat() if cutover.get('at') else None,
        bool(cutover.get('forced')), size['entries'], size['bytes'] or 0,
        size['oldest'].isoformat() if size['oldest'] else None,
        journaled, problems)


def take_fence(alias: str, timeout: float, terminate: bool = True
               ) -> FenceResult:
    """Raise the fence on *alias* and wait (at most *timeout* seconds)
    until every transaction that wrote a journaled row has ended. Past
    half the budget, ask the server to end those sessions (optional
    help: refused for another role's session without privilege). The
    fence stays up whatever happens; lower_fence undoes it."""
    started = time.monotonic()
    pj.postgres_raise_fence(alias)
    faults.checkpoint('window:fence-raised')
    half = max(0.05, timeout / 2)
    if pj.postgres_wait_for_writers(alias, int(half * 1000)):
        return FenceResult(True, time.monotonic() - started, (), (), ())
    open_now = pj.postgres_open_writers(alias)
    terminated: tuple[int, ...] = ()
    refused: tuple[int, ...] = ()
    if terminate and open_now:
        refused = tuple(pj.postgres_terminate(
            alias, [w['pid'] for w in open_now]))
        terminated = tuple(w['pid'] for w in open_now
                           if w['pid'] not in refused)
    left = max(0.05, timeout - (time.monotonic() - started))
    taken = pj.postgres_wait_for_writers(alias, int(left * 1000))
    still = () if taken else tuple(pj.postgres_open_writers(alias))
    return FenceResult(taken, time.monotonic() - started, terminated,
                       refused, still)


def lower_fence(alias: str) -> None:
    """Let writes through again (a refused rollback changed nothing)."""
    pj.postgres_lower_fence(alias)


def snapshot_transaction(alias: str):
    """Context manager: a REPEATABLE READ READ ONLY transaction on
    *alias* yielding its snapshot; copies read inside it use it."""
    return pj.postgres_snapshot_transaction(alias)


def prove_copy(alias: str, snapshot: str, copied_rows: dict[str, int]
               ) -> LossProof:
    """Which writes committed on *alias* that a copy in *snapshot* does
    not hold: journal entries of transactions invisible to the snapshot,
    rows whose current version such a transaction wrote (xmin: catches
    writes that bypassed the triggers), and row counts now against the
    copy's (catches deletes that bypassed them). Reads only."""
    by_table = _models_by_table()
    lost = list(journaled_after(alias, snapshot))
    seen = {(w.model, w.pk) for w in lost}
    counts = {}
    for table, model in by_table.items():
        label = model._meta.label
        now, written = pj.postgres_table_after(
            alias, table, key_columns(model), snapshot)
        for pk in written:
            if (label, pk) not in seen:
                lost.append(LostWrite(label, pk, 'write'))
        if label in copied_rows and now != copied_rows[label]:
            counts[label] = (copied_rows[label], now)
    return LossProof(snapshot, tuple(lost), counts,
                     ('journal', 'row versions (xmin)', 'row counts'))


def journaled_after(alias: str, snapshot: str) -> tuple[LostWrite, ...]:
    """The journal part of prove_copy alone (one indexed query): what a
    copy in *snapshot* lacks among the journaled writes."""
    by_table = _models_by_table()
    lost = []
    for change in pj.postgres_changes_after(alias, snapshot):
        model = by_table.get(change.table)
        label = model._meta.label if model else change.table
        lost.append(LostWrite(label, change.pk, _OPS[change.op]))
    return tuple(lost)


def account_cutover(alias: str) -> list[Shortfall]:
    """Models whose rows on *alias* are fewer than the cutover's plus the
    journaled inserts minus the journaled deletes: rows PostgreSQL lost
    that no recorded write removed (an emptied or half-loaded database).
    [] when the books balance or there is no journal. Reads only, in one
    REPEATABLE READ snapshot (cutover_shortfall)."""
    with pj.postgres_snapshot_transaction(alias):
        return cutover_shortfall(alias)


def cutover_shortfall(alias: str, counts: dict[str, int] | None = None
                      ) -> list[Shortfall]:
    """account_cutover inside the caller's snapshot transaction on
    *alias*, with the row counts (by label) the caller took in that
    snapshot where given: the cutover, the journal and every count must
    see the same committed writes (read apart, a delete committed between
    the journal read and a count looked like a lost row, and `auto` then
    restored a backup over writes PostgreSQL still held)."""
    cutover = pj.postgres_cutover(alias)
    if cutover is None:
        return []
    promised = cutover['info'].get('sqlite_rows') or cutover[
        'info'].get('rows') or {}
    net = pj.postgres_journal_net(alias)
    faults.checkpoint('window:accounting-journal-read')
    found = []
    for table, model in _models_by_table().items():
        label = model._meta.label
        if label not in promised:
            continue
        moves = net.get(table, {})
        start = 0 if moves.get('truncated') else promised[label]
        expected = start + moves.get('inserted', 0) - moves.get(
            'deleted', 0)
        now = (counts or {}).get(label)
        if now is None:
            now = model._base_manager.using(alias).count()
        if now < expected:
            found.append(Shortfall(label, expected, now))
    return found


def end_window(alias: str) -> WindowState:
    """Remove the triggers, the journal and the fence from *alias*: the
    operator has committed to PostgreSQL. Returns the state before."""
    try:
        schema.check_connection(alias)
        before = window_state(alias)
        with transaction.atomic(using=alias):
            pj.postgres_remove_journal(alias, list(_models_by_table()))
    except DatabaseError as err:
        raise RollbackError(f'cannot end the rollback window on '
                            f'{describe_alias(alias)}: {first_line(err)}'
                            ) from None
    return before
