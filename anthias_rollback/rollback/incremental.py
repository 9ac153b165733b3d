"""The incremental build: with PostgreSQL up and the fence raised, the
new SQLite file is a copy of what the device already holds as of a known
PostgreSQL snapshot (the standby replicate_changes keeps, else the
cutover file the switch took) plus the journal's tail since that
snapshot, applied through the replicator's Applier inside the rollback's
own snapshot transaction. Then, still in that snapshot, every changed
key is read back from both sides and compared exactly (the compare's
canonical forms), and PostgreSQL's row counts become the verify phase's
expectation; the loss proof after the swap covers the rest.

The standby is not copied but promoted: under the standby lock (no
replicator has it open), the tail and the checks run in one SQLite
transaction on the standby itself, its position table is dropped in
that transaction, and the closed file is renamed to the new file's name.
Its integrity is the replicator's recorded quick_check of those rows
(window.integrity), else a quick_check run during the build. What stays
O(rows) is PostgreSQL's count per table (the verify phase's expectation
and the cutover accounting's, rollback.accounting)
and, after the swap, the loss proof's scan. A dry run, a standby on
another filesystem or one the replicator holds longer than
PROMOTE_LOCK_WAIT is copied as before.

Whenever it cannot do that safely it raises NotIncremental with the
reason, and the caller takes the full copy: no journal, no usable base,
a base of another window, migrations applied on PostgreSQL since, a
tail so long that the full copy is faster, a changed key that does not
read back equal. A failure before the end leaves a promoted standby as
it was (the transaction is rolled back). Writes only the new file, or
the standby it promotes.
"""
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import DatabaseError, connections, transaction

from anthias_rollback import faults, fields, fsutil, profiles, schema
from anthias_rollback.compare import streams
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.engines import sqlite as lite
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import ReplicationError
from anthias_rollback.fields import is_composite_key
from anthias_rollback.report import first_line
from anthias_rollback.rollback import accounting
from anthias_rollback.rollback.state import RunState, count_rows
from anthias_rollback.window import applier as window_applier
from anthias_rollback.window import integrity
from anthias_rollback.window import standby as window_standby

# A tail longer than this many journal entries (or a quarter of the rows
# at the cutover, whichever is more) is copied whole instead: re-reading
# most keys one chunk at a time is slower than one ordered scan.
MIN_TAIL_LIMIT = 50_000
# Longest the rollback waits for the replicator to finish a round or an
# integrity check before it copies the standby instead of promoting it.
PROMOTE_LOCK_WAIT = 5.0


class NotIncremental(Exception):
    """Why the incremental path cannot be taken (the full copy is)."""


@dataclass(frozen=True)
class Base:
    kind: str           # 'standby' | 'cutover file'
    path: Path
    snapshot: str       # the PostgreSQL snapshot the copy holds
    at: str             # ISO time of that snapshot
    # The standby itself, changed in place and renamed to be the new
    # file (no copy); *checked*: the replicator's integrity record that
    # covers its rows (window.integrity), if any.
    promoted: bool = False
    checked: dict[str, Any] | None = None


def standby_problem(position: window_standby.Position,
                    cutover: dict[str, Any]) -> str | None:
    """Why a standby at *position* cannot be this window's base, or
    None. Shared with the prompt's preview, so both decide alike."""
    if position.window != cutover['txid']:
        return 'belongs to another rollback window'
    if cutover.get('forced') and position.started_from == 'cutover file':
        return 'started from the cutover file of a forced switch'
    return None


def cutover_file_problem(data_dir: Path,
                         cutover: dict[str, Any]) -> str | None:
    """Why the cutover file cannot be this window's base, or None (its
    sha256 is checked when it is copied). Shared with the preview."""
    info = cutover['info'].get('standby_cutover') or {}
    cut = window_standby.cutover_path(data_dir)
    if cutover.get('forced'):
        # --force skipped the check that SQLite held PostgreSQL's rows.
        return ('the switch was forced: the cutover file may not hold '
                'PostgreSQL\'s rows')
    if not info.get('sha256') or info.get('window') != cutover['txid']:
        return (info.get('problem')
                or 'the switch took no cutover file for this window')
    if not cut.exists():
        return f'the cutover file {cut} is missing'
    if any(Path(f'{cut}{side}').exists()
           for side in sqlite_file.SIDE_SUFFIXES):
        return (f'the cutover file {cut} has side files (opened since the '
                'switch)')
    return None


def switch_check(info: dict[str, Any]) -> dict[str, Any] | None:
    """The switch's quick_check of the cutover file, as a Base's
    *checked* record, when it passed (None: none recorded)."""
    if info.get('quick_check') != 'ok':
        return None
    return {'result': 'ok', 'checked_at': info.get('taken_at')}


def copy_base(run: RunState, cutover: dict[str, Any], new_path: Path) -> Base:
    """Copy the newest base of this window into *new_path*: the standby
    when it has a position of this window, else the unchanged cutover
    file. Raises NotIncremental when neither is usable."""
    data_dir = run.data_dir
    timeout = max(1.0, min(60.0, run.deadline.remaining() / 3))
    why_not = []
    path = window_standby.standby_path(data_dir)
    if path.exists():
        try:
            # The position is read from the copy: it describes its rows.
            position = window_standby.copy_standby(data_dir, new_path,
                                                   timeout=timeout)
            problem = standby_problem(position, cutover)
        except ReplicationError as err:
            problem = str(err)
        else:
            if problem is None:
                return Base('standby', path, position.snapshot,
                            position.position_at)
            problem = f'the standby {path} {problem}'
        why_not.append(problem)
        sqlite_file.remove_sqlite_file(new_path)
    else:
        why_not.append('no standby')
    cut = window_standby.cutover_path(data_dir)
    problem = cutover_file_problem(data_dir, cutover)
    if problem is None:
        digest = sqlite_file.copy_file_sha256(cut, new_path)
        info = cutover['info']['standby_cutover']
        if digest == info['sha256']:
            # The same bytes the switch checked (its record says so).
            return Base('cutover file', cut, cutover['snapshot'],
                        cutover['at'].isoformat(),
                        checked=switch_check(info))
        sqlite_file.remove_sqlite_file(new_path)
        problem = f'the cutover file {cut} changed since the switch'
    why_not.append(problem)
    raise NotIncremental('; '.join(why_not))


def check_same_migrations(alias: str, pg: str) -> None:
    """NotIncremental when PostgreSQL's applied migrations are not the
    base's: a migration run during the window changed what the journal
    does not describe."""
    here = set(schema.applied_migrations(alias))
    there = set(schema.applied_migrations(pg))
    if here != there:
        extra = sorted(f'{a}.{n}' for a, n in there - here)[:3]
        raise NotIncremental('migrations were applied on PostgreSQL since '
                             'the base was taken'
                             + (f' ({", ".join(extra)})' if extra else ''))


def differing_keys(changed: dict[Any, list[str]], alias: str,
                   pg: str) -> list[str]:
    """'label pk=...' for every changed key whose row reads back
    different on the two sides (canonical rows, exact), or present on
    one side only. Inside the snapshot transaction on *pg*."""
    found = []
    for model, texts in changed.items():
        label = model._meta.label
        unique = sorted(set(texts))
        if is_composite_key(model):
            found += differing_key_tuples(model, unique, alias, pg)
            continue
        for start in range(0, len(unique), streams.KEY_BATCH):
            pg_keys, sqlite_keys = window_applier.keys_for(
                model, unique[start:start + streams.KEY_BATCH], alias)
            left = dict(zip(*streams.rows_for_keys(model, alias,
                                                   sqlite_keys)))
            right = dict(zip(*streams.rows_for_keys(model, pg, pg_keys)))
            for key in sorted(left.keys() | right.keys(), key=str):
                if left.get(key) != right.get(key):
                    found.append(f'{label} pk={key}')
    return found


def _rows_by_key_tuple(model: Any, texts: list[str], alias: str,
                       where: Any) -> dict:
    """Canonical rows (key tuple first) of the composite keys *texts* on
    *alias*, by key; *where* builds the engine's clause."""
    keys = window_applier.key_tuples(model, texts, alias)
    found: dict[Any, tuple] = {}
    for start in range(0, len(keys), streams.KEY_BATCH):
        clause = where(alias, model, keys[start:start + streams.KEY_BATCH])
        for columns in streams.stream_canonical_columns(model, alias,
                                                        where=clause):
            found.update(zip(columns[0], zip(*columns)))
    return found


def differing_key_tuples(model: Any, texts: list[str], alias: str,
                         pg: str) -> list[str]:
    """differing_keys for a composite key: 'label pk=(...)' per key whose
    canonical row differs or is on one side only."""
    left = _rows_by_key_tuple(model, texts, alias,
                              window_applier.sqlite_key_tuples_where)
    right = _rows_by_key_tuple(model, texts, pg,
                               window_applier.postgres_key_tuples_where)
    return [f'{model._meta.label} pk={key}'
            for key in sorted(left.keys() | right.keys(), key=str)
            if left.get(key) != right.get(key)]


def base_quick_check(pool: futures.Executor, path: Path
                     ) -> futures.Future:
    """PRAGMA quick_check of the file at *path* as it is now (the copied
    base), in *pool*: its read transaction has begun when this returns,
    so writes made afterwards (the tail, in WAL) are not what it checks.
    The future's result is quick_check's first line ('ok')."""
    begun = threading.Event()

    future = pool.submit(sqlite_file.sqlite_quick_check_in_snapshot, path,
                         begun.set)
    begun.wait()
    return future


def standby_applied_keys(pg: str, applier: Any, start: str, position: str
                         ) -> dict[Any, list[str]]:
    """The keys, per model, of every write the standby applied between
    *start* (the cutover's snapshot) and its *position*: read inside the
    rollback's snapshot, which holds them all. Tables truncated in that
    span are left to the row counts (no key to re-read)."""
    batch = pj.postgres_batch(pg, start, position)
    found: dict[Any, list[str]] = {}
    for table in batch.tables:
        model = applier.by_table.get(table)
        if model is None or table in batch.truncated:
            continue
        for texts in pj.postgres_batch_keys(pg, start, position, table):
            found.setdefault(model, []).extend(texts)
    return found


def _checkable(model: Any) -> bool:
    """Can the changed keys of *model* be read back one by one (an
    orderable key, or a composite one, read by tuple)?"""
    return fields.key_kind(model) is not None or is_composite_key(model)


def promotable(run: RunState, new_path: Path) -> str | None:
    """Why no base can be promoted in this run (None: it can be tried):
    a dry run keeps them, and the rename into the live file's directory
    must not cross a filesystem."""
    if run.options.dry_run:
        return 'a dry run leaves the standby in place'
    folder = window_standby.standby_dir(run.data_dir)
    if not folder.is_dir():
        return 'no standby'
    if folder.stat().st_dev != new_path.parent.stat().st_dev:
        return (f'the standby dir {folder} is on another filesystem than '
                f'{new_path.parent}')
    return None


def lock_base(run: RunState, cutover: dict[str, Any],
              stack: contextlib.ExitStack) -> Base | None:
    """Take the standby lock (held until *stack* closes) and this
    window's base to be changed in place and promoted: the standby, else
    the cutover file when it is byte for byte what the switch took and
    checked (inode, size, mtime; no sha256 pass over it). None, the
    reason in run.promote_problem, when neither can be."""
    data_dir = run.data_dir
    try:
        stack.enter_context(integrity.standby_lock(
            data_dir, min(PROMOTE_LOCK_WAIT, run.deadline.remaining() / 4)))
    except ReplicationError as err:
        run.promote_problem = first_line(err)
        return None
    path = window_standby.standby_path(data_dir)
    try:
        position = (window_standby.read_position(path) if path.exists()
                    else None)
    except sqlite3.Error as err:
        run.promote_problem = first_line(err)
        position = None
    if position is not None:
        problem = standby_problem(position, cutover)
        if problem is None:
            return Base('standby', path, position.snapshot,
                        position.position_at, promoted=True,
                        checked=integrity.recorded_check(data_dir, position))
        run.promote_problem = f'the standby {path} {problem}'
    elif path.exists() and run.promote_problem is None:
        run.promote_problem = f'the standby {path} has no position'
    if cutover_file_problem(data_dir, cutover) is not None:
        return None
    cut = window_standby.cutover_path(data_dir)
    info = cutover['info']['standby_cutover']
    checked = switch_check(info)
    if checked is None or info.get('file') != sqlite_file.file_state(cut):
        # Not provably the checked bytes: copied, its sha256 checked.
        return None
    return Base('cutover file', cut, cutover['snapshot'],
                cutover['at'].isoformat(), promoted=True, checked=checked)


def promote(base: Base, new_path: Path) -> None:
    """Rename the promoted base (closed, its tail committed) to
    *new_path* beside the live file. The replicator builds no new
    standby while the rollback holds its operation lock
    (Replicator.ensure)."""
    side = [s for s in sqlite_file.SIDE_SUFFIXES
            if Path(f'{base.path}{s}').exists()]
    if side:
        # Closed by its last connection, SQLite removes them; left over,
        # they are another process's open connection.
        sqlite_file.sqlite_checkpoint_truncate(base.path)
        for suffix in side:
            Path(f'{base.path}{suffix}').unlink(missing_ok=True)
    # Its bytes are fsynced by swap_in before its name becomes the live
    # one; until then it is a scratch file a rerun removes.
    os.rename(base.path, new_path)
    fsutil.fsync_dir(new_path.parent)
    fsutil.fsync_dir(base.path.parent)
    faults.checkpoint('rollback:standby-promoted')


def count_rows_in_snapshot(alias: str, exported: str) -> dict[str, int]:
    """count_rows in a session of this thread's own that imports the
    PostgreSQL snapshot *exported* by another: the same counts, taken
    while the exporting session goes on with the build's other reads."""
    try:
        with pj.postgres_imported_snapshot(alias, exported):
            return count_rows(alias)
    finally:
        connections[alias].close()


def build_incremental(run: RunState, new_path: Path) -> dict[str, Any]:
    """Fill *new_path* from a base plus the journal's tail (module
    docstring). Sets run.snapshot and run.expected_rows; returns what the
    report says about it. Raises NotIncremental (nothing to clean up
    but *new_path*, which the caller removes; a promoted standby is left
    as it was unless the build completed)."""
    opts = run.options
    pg = opts.postgres_alias
    if opts.full:
        raise NotIncremental('asked for (--full)')
    if run.journal is None or not run.journal.installed:
        raise NotIncremental('PostgreSQL has no change journal')
    cutover = pj.postgres_cutover(pg)
    if cutover is None:
        raise NotIncremental('no cutover is recorded on PostgreSQL')
    with contextlib.ExitStack() as stack:
        run.promote_problem = promotable(run, new_path)
        base = (lock_base(run, cutover, stack)
                if run.promote_problem is None else None)
        run.snapshot = stack.enter_context(
            pj.postgres_snapshot_transaction(pg))
        faults.checkpoint('rollback:snapshot-taken')
        # Exited first: its threads end while the snapshot is still held.
        pool = stack.enter_context(futures.ThreadPoolExecutor(2))
        # PostgreSQL counts every model in the snapshot (the verify
        # phase's expectation and the accounting's) from a second session
        # while this one applies the tail and reads the changed keys
        # back; the base is copied (local I/O, sqlite3 outside the GIL)
        # meanwhile too when it is not promoted.
        counting = pool.submit(count_rows_in_snapshot, pg,
                               pj.postgres_export_snapshot(pg))
        if base is not None:
            target = base.path
        else:
            base = pool.submit(copy_base, run, cutover, new_path).result()
            target = new_path
        faults.checkpoint('rollback:base-copied')

        def account() -> None:
            # Inside the SQLite transaction, before it commits: a
            # shortfall rolls the tail back and leaves a promoted standby
            # as it was.
            run.expected_rows = counting.result()
            accounting.account_in_snapshot(run, run.expected_rows)

        with profiles.sqlite_file_alias(target) as alias:
            # WAL: the quick_check reads the base while the tail is
            # written, neither waiting for the other.
            lite.sqlite_use_wal(alias)
            applied, changed, applied_before = _apply_tail(
                run, cutover, base, alias, pg, target, account)
        if base.promoted:
            # Committed, not yet renamed: a standby with no position,
            # which a rerun does not promote and the replicator rebuilds.
            faults.checkpoint('rollback:tail-committed')
            promote(base, new_path)
    keys = sum(len(set(t)) for t in changed.values())
    truncated = list(applied.batch.truncated)
    unverified = [m._meta.label for m in changed if not _checkable(m)]
    how = ' (promoted in place, not copied)' if base.promoted else ''
    # Why the standby was copied, or passed over for the cutover file.
    passed_over = ''
    if run.promote_problem and base.kind == 'standby':
        passed_over = f'; standby not promoted: {run.promote_problem}'
    elif run.promote_problem and base.promoted:
        passed_over = f'; standby not used: {run.promote_problem}'
    detail = (f'{base.kind}{how} as of {base.at} + '
              f'{applied.batch.entries} journal '
              f'entries; {keys} changed key(s) re-read and checked equal to '
              'PostgreSQL' + (f', and {applied_before} key(s) the standby '
                              'applied since the cutover'
                              if applied_before else '')
              + (f'; tables re-read whole after a TRUNCATE: '
                              f'{", ".join(truncated)}' if truncated else '')
              + (f'; not compared key by key (no orderable key): '
                 f'{", ".join(unverified)}' if unverified else '')
              + passed_over)
    return {'method': 'incremental', 'base': base.kind,
            'promoted': base.promoted,
            'base_path': str(base.path), 'base_at': base.at,
            'journal_entries': applied.batch.entries, 'changed_keys': keys,
            'truncated_tables': truncated, 'detail': detail}


def _apply_tail(run: RunState, cutover: dict[str, Any], base: Base,
                alias: str, pg: str, path: Path,
                before_commit: Callable[[], None]
                ) -> tuple[Any, dict[Any, list[str]], int]:
    """Apply the journal's tail since *base* to the file *path* (*alias*)
    and check every changed key, in ONE SQLite transaction that is
    rolled back when anything fails (a promoted standby is then left as
    it was); *before_commit* runs last in it. Returns (the Applier's
    result, changed keys per model, keys the standby applied itself and
    that were re-read too)."""
    pg_snapshot = run.snapshot
    assert pg_snapshot is not None   # the caller's snapshot transaction
    check_same_migrations(alias, pg)
    tail = pj.postgres_batch(pg, base.snapshot, pg_snapshot)
    at_cutover = sum((cutover['info'].get('rows') or {}).values())
    limit = max(MIN_TAIL_LIMIT, at_cutover // 4)
    if tail.entries > limit:
        raise NotIncremental(f'{tail.entries} journal entries since the '
                             f'{base.kind}: a full copy is faster')
    changed: dict[Any, list[str]] = {}

    def on_keys(model: Any, texts: list[str]) -> None:
        changed.setdefault(model, []).extend(texts)
        run.deadline.check('the incremental build')

    applier = window_applier.Applier(pg, alias)
    with futures.ThreadPoolExecutor(1) as pool:
        checking = None
        if base.checked is not None and base.checked.get('result') == 'ok':
            run.base_quick_check = 'ok'
            when = base.checked.get('checked_at')
            run.base_check_note = (
                f'quick_check (of the standby\'s rows, by replicate_changes '
                f'at {when})' if base.kind == 'standby' else
                f'quick_check (of the cutover file, by the switch at {when}; '
                + ('the same inode, size and mtime since)' if base.promoted
                   else 'the same sha256 now)'))
        else:
            checking = base_quick_check(pool, path)
        try:
            with transaction.atomic(using=alias):
                applied = applier.apply(base.snapshot, pg_snapshot, on_keys,
                                        batch=tail)
                # Every sequence, not only the changed tables': the base
                # may predate ids PostgreSQL handed out and rolled back.
                applier.raise_sequences()
                faults.checkpoint('rollback:tail-applied')
                if checking is not None:
                    run.base_quick_check = checking.result()
                    run.base_check_note = (
                        'quick_check (of the standby, during the build)'
                        if base.promoted else None)
                    if run.base_quick_check != 'ok':
                        raise NotIncremental(
                            f'the {base.kind} fails quick_check: '
                            f'{run.base_quick_check}')
                to_check = {m: list(t) for m, t in changed.items()}
                applied_before = 0
                if base.kind == 'standby':
                    # What the standby applied itself is re-read too: a
                    # standby whose recorded position is newer than its rows
                    # (edited by hand, or restored torn from an archive) read
                    # "proven" with stale rows. O(changes in the window).
                    for model, texts in standby_applied_keys(
                            pg, applier, cutover['snapshot'],
                            base.snapshot).items():
                        to_check.setdefault(model, []).extend(texts)
                        applied_before += len(texts)
                differing = differing_keys(
                    {m: t for m, t in to_check.items() if _checkable(m)},
                    alias, pg)
                if differing:
                    shown = ', '.join(differing[:5])
                    run.warn(f'incremental build: {len(differing)} changed '
                             f'key(s) read back different from PostgreSQL '
                             f'({shown}); taking the full copy')
                    raise NotIncremental(f'{len(differing)} changed key(s) '
                                         'did not read back equal')
                if base.promoted:
                    table = window_standby.POSITION_TABLE
                    connections[alias].cursor().execute(
                        f'DROP TABLE IF EXISTS {table}')
                before_commit()
        except (DatabaseError, sqlite3.DatabaseError):
            # A base too broken to write or read (a spoiled page): its
            # quick_check says so, and the full copy is taken instead.
            if checking is not None and checking.result() != 'ok':
                raise NotIncremental(f'the {base.kind} fails quick_check: '
                                     f'{checking.result()}') from None
            raise
    for model, texts in changed.items():
        run.runner.emit('model-done', model._meta.label,
                        rows=len(set(texts)))
    return applied, changed, applied_before
