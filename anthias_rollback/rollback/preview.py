"""What a rollback would do, measured before it starts, for the operator
who must confirm it: the source `auto` picks now (the same decision the
run makes), how the new file would be built and from how many rows or
journal entries, what happens to PostgreSQL, and the loss to expect.

Reads only (PostgreSQL, the backup dir, the standby); never prints. The
run itself decides again: the answer can change between the prompt and
the fence (a server that dies meanwhile).
"""
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from django.db import DatabaseError

from anthias_rollback import conf, phases, profiles
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.engines import sqlite_file
from anthias_rollback.rollback import incremental
from anthias_rollback.rollback.sources import choose_source
from anthias_rollback.rollback.state import (
    RollbackOptions,
    RunState,
    Source,
    count_rows,
)
from anthias_rollback.window import standby as window_standby


@dataclass(frozen=True)
class RollbackPreview:
    live_path: str
    source: Source | None
    reason: str
    build: str
    postgres: str
    loss: str

    def lines(self) -> list[str]:
        return [f'  live file:   {self.live_path} (kept as a safety copy)',
                f'  source:      {self.source} ({self.reason})',
                f'  new file:    {self.build}',
                f'  PostgreSQL:  {self.postgres}',
                f'  data loss:   {self.loss}']


def _base(run: RunState, pg: str) -> tuple[str, str] | None:
    """(what, snapshot) of the base an incremental build would use, by
    the build's own rules (incremental.standby_problem and
    cutover_file_problem)."""
    cutover = pj.postgres_cutover(pg)
    if cutover is None:
        return None
    path = window_standby.standby_path(run.data_dir)
    try:
        position = (window_standby.read_position(path) if path.exists()
                    else None)
    except sqlite3.Error:      # unreadable: the run falls back too
        position = None
    if position is not None and \
            incremental.standby_problem(position, cutover) is None:
        return f'the standby as of {position.position_at}', \
            position.snapshot
    if incremental.cutover_file_problem(run.data_dir, cutover) is None:
        return (f'the cutover file as of {cutover["at"].isoformat()}',
                cutover['snapshot'])
    return None


def _from_postgres(run: RunState) -> tuple[str, str, str]:
    opts = run.options
    pg = opts.postgres_alias
    rows = sum(count_rows(pg).values())
    journal = run.journal is not None and run.journal.installed
    base = _base(run, pg) if journal and not opts.full else None
    if base is not None:
        pending = pj.postgres_pending_entries(pg, base[1])
        build = (f'incremental: {base[0]} plus {pending} journal '
                 f'entr{"y" if pending == 1 else "ies"} ({rows} rows on '
                 'PostgreSQL; a full copy if the tail cannot be applied)')
    else:
        build = f'full copy of {rows} rows from PostgreSQL' + (
            ' (--full)' if opts.full else '')
    dump = ' after a pg_dump into the backup dir' if \
        opts.preserve_postgres else ''
    if journal and opts.fence:
        what = (f'kept as it is{dump}; from the fence on it refuses every '
                'write (until switch_database --to postgres)')
        loss = ('none expected: every write committed before the fence is '
                'copied, and this is proven after the swap')
    else:
        what = f'kept as it is{dump}; writes are NOT stopped'
        loss = ('cannot be proven: ' + ('no change journal' if not journal
                                        else '--no-fence') +
                '; writes made during the rollback are lost')
    return build, what, loss


def preview(options: RollbackOptions) -> RollbackPreview:
    """Measure what run_rollback(*options*) would do (module docstring).
    Raises what choose_source raises for a setting to fix or no source."""
    data_dir = Path(options.data_dir or conf.data_dir())
    runner = phases.PhaseRunner(
        phases.Deadline(min(60.0, options.timeout_seconds), '{what}'), None)
    run = RunState(options, data_dir, runner)
    live = options.live_path or profiles.sqlite_alias_path(
        options.sqlite_alias)
    choose_source(run)
    if run.source == Source.POSTGRES:
        try:
            build, what, loss = _from_postgres(run)
        except DatabaseError as err:
            build = what = loss = f'not measured ({err})'.splitlines()[0]
    elif run.source == Source.STANDBY:
        position, _ = window_standby.usable_standby(data_dir)
        at = position.position_at if position else 'unknown'
        build = f'the standby as of {at}'
        what = 'not answering; nothing is done to it'
        loss = f'at most the writes after {at} (bounded, not zero)'
    else:
        assert run.backup_used is not None   # chosen with the source
        path = Path(run.backup_used)
        taken = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        conn = sqlite_file.sqlite_open_readonly(path, 5.0)
        try:
            rows = sum(sqlite_file.sqlite_table_counts(conn).values())
        finally:
            conn.close()
        build = f'backup {path} ({rows} rows, written {taken.isoformat()})'
        what = 'not changed'
        loss = ('every write since the backup was taken; the rows '
                'PostgreSQL holds that the backup lacks are exported when '
                'it answers')
    return RollbackPreview(str(live), run.source, run.source_reason, build,
                           what, loss)
