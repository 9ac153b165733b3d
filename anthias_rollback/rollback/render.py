"""Reading and rendering results, plain text (commands add colour): the
newest report and a result loaded back from its JSON, the data-loss line
as measured by the run (never assumed), the summary written beside each
report and printed by rollback_migration, its verdict lines and JSON
`data_loss`, and the URGENT / RESOLVED notices an operator forwards.
"""
import json
from pathlib import Path

from anthias_rollback.phases import PhaseResult
from anthias_rollback.rollback.state import (
    LossStatus,
    Outcome,
    RollbackResult,
    Source,
)


def latest_report(reports_dir: Path) -> Path | None:
    found = sorted(Path(reports_dir).glob('rollback_*.json'))
    return found[-1] if found else None


def load_result(path: Path) -> RollbackResult:
    """The result a rollback report holds. Raises OSError (unreadable)
    or ValueError naming the file (not JSON, or not a whole report: a
    report without `phases` once gave a KeyError traceback)."""
    data = json.loads(Path(path).read_text())
    try:
        data['phases'] = tuple(PhaseResult(**p) for p in data['phases'])
        data['warnings'] = tuple(data['warnings'])
        return RollbackResult(**data)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f'{path} is not a complete rollback report '
                         f'({type(err).__name__}: {err})') from None


def data_loss_line(result: RollbackResult) -> str:
    """The loss as measured in the run (never assumed)."""
    if result.source == Source.POSTGRES:
        return result.loss_detail or 'not proven (no proof recorded)'
    if result.source == Source.STANDBY:
        return standby_loss_line(result.standby_bound) \
            if result.standby_bound else result.at_risk_note
    if result.at_risk_rows is None:
        return ('UNKNOWN: restored from a backup and PostgreSQL could not '
                'be compared; writes made after the backup may be lost')
    total = result.rows_at_risk or 0
    where = f', saved in {result.at_risk_file}' if result.at_risk_file \
        else ''
    return f'{total} rows at risk (written after the backup{where})'


# The data_loss of a run that never started (refused before it): nothing
# was touched, and no loss was measured either.
NOT_RUN = {'status': LossStatus.NOT_RUN,
           'detail': 'no rollback ran: the live database and the profile '
                     'are unchanged', 'lost_writes': []}


def data_loss(result: RollbackResult) -> dict:
    """The `data_loss` of rollback_migration's JSON document."""
    return {'status': result.loss, 'detail': data_loss_line(result),
            'lost_writes': list(result.lost_writes)}


def verdict_line(result: RollbackResult) -> str:
    """rollback_migration's last stdout line for a finished run."""
    if result.outcome in (Outcome.ROLLED_BACK,
                          Outcome.ROLLED_BACK_WITH_A_LOSS):
        return ('ROLLED BACK: profile sqlite, data loss: '
                + data_loss_line(result))
    if result.outcome == Outcome.DRY_RUN:
        return ('DRY RUN OK: nothing changed; a rollback from '
                f'{result.source} would succeed')
    return ('ROLLED BACK WITH PROBLEMS: the SQLite database is live; '
            'check the warnings above')


def verdict_ok(result: RollbackResult) -> bool:
    """Is the verdict line a success (green)?"""
    return result.outcome in (Outcome.ROLLED_BACK, Outcome.DRY_RUN)


def problems_line(result: RollbackResult) -> str:
    """The error line of a run that swapped but ended with exit 4."""
    what = (data_loss_line(result)
            if result.outcome == Outcome.ROLLED_BACK_WITH_A_LOSS else
            '; '.join(result.warnings) or result.error)
    return (f'rolled back, but not without problems: {what} '
            f'(report: {result.report_path})')


def already_line(result: RollbackResult) -> str:
    """The answer to a rerun after a finished rollback."""
    return (f'already on SQLite since {result.finished_at} (report '
            f'{result.report_path}); data loss: '
            f'{data_loss_line(result)}')


def standby_loss_line(bound: dict) -> str:
    """The bound a standby restore proves (its recorded position)."""
    return (f'at most the writes after {bound["position_at"]} (standby '
            f'{bound["behind_seconds"]:.1f} s behind when PostgreSQL was '
            'last seen)')


def copy_line(copy: dict) -> str:
    """Which path built the file from PostgreSQL, and why."""
    if copy.get('method') == 'incremental':
        return f'incremental: {copy["detail"]}'
    return f'full: {copy.get("reason", "")}'


def render_summary(result: RollbackResult) -> str:
    lines = [f'Rollback {result.outcome.upper()} in {result.seconds:.2f}s',
             f'  live database: {result.live_path}',
             f'  source:        {result.source} ({result.source_reason})']
    if result.resumed_from:
        lines.append(f'  resumed:       the run started at '
                     f'{result.resumed_from} was killed after its swap; '
                     'this run finished it')
    if result.backup_used:
        lines.append(f'  backup used:   {result.backup_used}')
    if result.copy:
        lines.append(f'  copy:          {copy_line(result.copy)}')
    if result.safety_copy:
        lines.append(f'  safety copy:   {result.safety_copy}')
    if result.postgres_dump:
        lines.append(f'  pg_dump:       {result.postgres_dump}')
    lines.append(f'  data loss:     {data_loss_line(result)}')
    if result.resurrected_rows:
        lines.append('  deleted on PostgreSQL but back from the backup: '
                     + ', '.join(f'{k} {v}' for k, v in
                                 result.resurrected_rows.items()))
    if result.since_cutover and result.since_cutover.get('models'):
        lines.append(f'  since the cutover at '
                     f'{result.since_cutover["cutover_at"]}:')
        for label, m in result.since_cutover['models'].items():
            lines.append(f'    {label}: {m["rows_at_cutover"]} -> '
                         f'{m["rows_now"]} rows'
                         + (f' ({m["new_rows"]} new)' if m['new_rows']
                            else ''))
    lines.append('  phases:')
    for p in result.phases:
        lines.append(f'    {p.name:<12} {p.status:<8} {p.seconds:7.3f}s  '
                     f'{p.detail}')
    if result.rows:
        lines.append(f'  rows: {sum(result.rows.values())} in '
                     f'{len(result.rows)} models')
    for warning in result.warnings:
        lines.append(f'  WARNING: {warning}')
    if result.error:
        lines.append(f'  ERROR: {result.error}')
    if result.report_path:
        lines.append(f'  report: {result.report_path}')
    return '\n'.join(lines) + '\n'


def urgent_notice(reason: str, started_at: str, trigger: str) -> str:
    """The notice at the start: what is wrong, who or what triggered the
    rollback (an operator, or the monitor's rule with its figures)."""
    return (
        'URGENT: Database Migration Rollback Required\n\n'
        f'Issue: {reason}\n'
        f'Triggered by: {trigger}\n'
        'Impact: the app is being moved back onto SQLite; screens keep '
        'their cached content, edits are paused\n'
        f'Action Taken: rollback_migration started at {started_at}\n')


def failed_notice(result: RollbackResult) -> str:
    """For a refused or failed run: never called RESOLVED."""
    return (
        'NOT RESOLVED: Database Migration Rollback Failed or Refused\n\n'
        f'Outcome: {result.outcome} (nothing changed unless the report '
        'says otherwise)\n'
        f'Error: {result.error}\n'
        f'Report: {result.report_path}\n')


def resolved_notice(result: RollbackResult) -> str:
    downtime = (f'{result.downtime_seconds:.1f}s'
                if result.downtime_seconds is not None else 'unknown')
    return (
        'RESOLVED: Database Migration Rollback Completed\n\n'
        f'Resolution: service restored to the SQLite database '
        f'{result.live_path}\n'
        f'Source: {result.source} ({result.source_reason})\n'
        f'Downtime: {downtime}\n'
        f'Data Loss: {data_loss_line(result)}\n'
        f'Safety copy of the replaced database: {result.safety_copy}\n'
        f'Report: {result.report_path}\n')
