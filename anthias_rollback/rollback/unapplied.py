"""After a rollback that restored the standby (PostgreSQL was down): once
PostgreSQL answers again, exactly the writes the standby did not hold.

The standby held PostgreSQL as of one snapshot (its position, recorded in
the rollback's report), so the writes it lacks are what the loss proof
finds for a copy in that snapshot: journal entries of transactions it
does not see, row versions such transactions wrote, count differences.
The rows PostgreSQL holds for the inserted and updated keys are exported
as a loaddata fixture (exact values, 0600); deletes are listed. Reads
PostgreSQL and the reports dir; writes only the fixture. Never prints.
"""
from dataclasses import dataclass
from pathlib import Path

from django.db import DatabaseError, connections

from anthias_rollback import models_graph, schema
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.fields import is_composite_key
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.rollback.render import load_result
from anthias_rollback.rollback.sources import export_rows
from anthias_rollback.rollback.state import Source
from anthias_rollback.window import applier as window_applier
from anthias_rollback.window import journal as window_journal


@dataclass(frozen=True)
class UnappliedWrites:
    report: str                 # the rollback report the position came from
    position_at: str
    writes: tuple[window_journal.LostWrite, ...]
    count_differences: dict[str, tuple[int, int]]
    exported: str | None        # the loaddata fixture, if any row to keep
    exported_rows: dict[str, int]
    deleted: tuple[window_journal.LostWrite, ...]

    @property
    def none(self) -> bool:
        return not self.writes and not self.count_differences


def _export_keys(keep: dict[str, list]) -> dict[str, list]:
    """The journal's key texts as what `pk__in` takes: a composite key's
    JSON array (postgres_journal.key_sql) as its tuple of values; other
    keys as they are (the field converts the text)."""
    found = {}
    for label, texts in keep.items():
        try:
            model = models_graph.get_model(label)
        except LookupError:     # a table no model has: export_rows says
            found[label] = texts
            continue
        if is_composite_key(model):
            found[label] = [window_applier.key_values(model, t)
                            for t in texts]
        else:
            found[label] = texts
    return found


def standby_rollback_report(reports_dir: Path) -> Path:
    """The newest rollback report that restored the standby."""
    for path in sorted(Path(reports_dir).glob('rollback_*.json'),
                       reverse=True):
        try:
            result = load_result(path)
        except (OSError, ValueError, TypeError):
            continue
        if result.source == Source.STANDBY and result.standby_bound:
            return path
    raise RollbackError(f'no report in {reports_dir} of a rollback that '
                        'restored the standby (name one with --report-file)')


def unapplied_writes(postgres_alias: str, reports_dir: Path,
                     report_path: Path | None = None,
                     export: bool = True) -> UnappliedWrites:
    """The writes committed on *postgres_alias* that the standby restored
    by the rollback of *report_path* (default: the newest such report in
    *reports_dir*) did not hold (module docstring). Raises RollbackError
    when PostgreSQL does not answer, the report is not a standby
    restore, or the journal of its window is gone."""
    path = Path(report_path) if report_path else \
        standby_rollback_report(reports_dir)
    try:
        result = load_result(path)
    except (OSError, ValueError, TypeError) as err:
        raise RollbackError(f'cannot read rollback report {path}: '
                            f'{first_line(err)}') from None
    bound = result.standby_bound
    if result.source != Source.STANDBY or not bound:
        raise RollbackError(f'rollback report {path} did not restore the '
                            f'standby (source {result.source})')
    try:
        schema.check_connection(postgres_alias)
        cutover = pj.postgres_cutover(postgres_alias)
        if cutover is None or cutover['txid'] != bound['window']:
            raise RollbackError(
                f'the change journal of that rollback window is no longer '
                f'on {describe_alias(postgres_alias)} (a new window began '
                'or it was ended): compare with validate_migration '
                '--sqlite-db instead')
        proof = window_journal.prove_copy(postgres_alias, bound['snapshot'],
                                          dict(result.rows))
    except DatabaseError as err:
        connections[postgres_alias].close()
        raise RollbackError(f'PostgreSQL {describe_alias(postgres_alias)} '
                            f'cannot be read: {first_line(err)}') from None
    deleted = tuple(w for w in proof.lost if w.operation == 'delete')
    keep: dict[str, list] = {}
    for write in proof.lost:
        if write.operation != 'delete' and write.pk is not None:
            keep.setdefault(write.model, [])
            if write.pk not in keep[write.model]:
                keep[write.model].append(write.pk)
    exported, rows = None, {}
    if export and keep:
        # Keys deleted again later are simply not found: the fixture holds
        # the rows PostgreSQL has now.
        fixture = export_rows(postgres_alias, _export_keys(keep),
                              Path(reports_dir))
        exported = str(fixture)
        rows = {label: len(pks) for label, pks in keep.items()}
    return UnappliedWrites(str(path), bound['position_at'], proof.lost,
                           proof.count_differences, exported, rows, deleted)
