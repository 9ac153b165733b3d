"""The cutover accounting of a rollback from PostgreSQL, in the build's
snapshot: rows at the cutover + journaled inserts - journaled deletes
must be the rows PostgreSQL holds (window.journal.cutover_shortfall).

It runs after the fence, on the counts the build takes anyway for the
verify phase, and the cutover summary reports the same counts: every
table is counted once, not three times (the source phase, the summary,
the snapshot), and at 1,000,000 rows a count is a quarter of a second.
A shortfall means PostgreSQL lost rows that no recorded write removed
(emptied, half-loaded): with `auto` the build raises PostgresLostRows
and the caller restores a backup instead; with `--source postgres` it
goes on, warned, and the loss names them.
"""
from anthias_rollback.report import describe_alias
from anthias_rollback.rollback.state import RunState, Source
from anthias_rollback.window import journal as window_journal


class PostgresLostRows(Exception):
    """PostgreSQL holds fewer rows than its cutover accounts for."""


def lost_rows_line(alias: str,
                   shortfall: list[window_journal.Shortfall]) -> str:
    shown = ', '.join(f'{s.model} {s.found} of {s.expected}'
                      for s in shortfall[:5])
    return (f'{describe_alias(alias)} lost rows that no journaled write '
            f'removed ({shown} rows)')


def account_in_snapshot(run: RunState, counts: dict[str, int]) -> None:
    """Check *counts* (by label, taken in the build's snapshot, which the
    caller still holds) against the cutover. Keeps them for the cutover
    summary. Raises PostgresLostRows (auto) or warns (--source
    postgres) on a shortfall."""
    alias = run.options.postgres_alias
    run.source_counts = dict(counts)
    shortfall = window_journal.cutover_shortfall(alias, counts)
    if not shortfall:
        return
    run.shortfall = shortfall
    why = lost_rows_line(alias, shortfall)
    if run.options.source == Source.POSTGRES:
        run.warn(f'--source postgres: {why}')
        return
    raise PostgresLostRows(why)
