"""The rollback plan: back onto SQLite with nothing lost and nothing torn.

Phases, each timed, logged and reported:

1. preflight   lock, interrupted-swap recovery, live path, disk, profile
2. source      postgres (zero loss) or a verified backup; `auto` decides
3. fence       PostgreSQL stops accepting writes, so the snapshot is final
4. preserve    optional pg_dump of PostgreSQL into the backup dir
5. build       a NEW SQLite file beside the live one (migrate + copy, or
               the backup), at-risk rows exported when from a backup
6. verify      quick_check always; integrity, foreign keys, row counts
7. swap        swap.swap_in: old or new under the live path, never torn
8. profile     state file -> sqlite, restart command
9. post-verify /health and ANTHIAS_ROLLBACK_VERIFY_URLS through the app's
               own views on the restored file; Django's checks

Until the swap, every failure (or the deadline) leaves the live database
and the profile as they were. The package never prints; commands render
the returned RollbackResult.

Modules, each importing only those before it: state (options, result,
the per-run state and the run-state file), render (reports read back
and rendered as text, the verdicts), sources (choosing the source and
filling the new file from it, at-risk rows; incremental for the journal
tail on a base), steps (the other phase bodies, scratch files; swap for
the atomic swap, preserve for the pg_dump), plan (run_rollback, the
order of the phases, the report). preview (the prompt's facts) and
unapplied (export_unapplied_writes) sit beside them. This package
re-exports the public names of the main five, so `rollback.X` works.
"""
from anthias_rollback.rollback.plan import (
    already_rolled_back,
    finish,
    measured_loss,
    never_left_sqlite,
    run_rollback,
)
from anthias_rollback.rollback.render import (
    data_loss_line,
    failed_notice,
    latest_report,
    load_result,
    render_summary,
    resolved_notice,
    urgent_notice,
)
from anthias_rollback.rollback.sources import (
    ExactJSONEncoder,
    at_risk_rows,
    build_from_backup,
    build_from_postgres,
    choose_source,
    code_migrations,
    count_rows,
    cutover_summary,
    export_rows,
    pick_backup,
    postgres_usable,
)
from anthias_rollback.rollback.state import (
    AUTO,
    LOG_NAME,
    SOURCE_CHOICES,
    STATE_NAME,
    LossStatus,
    Outcome,
    RollbackOptions,
    RollbackResult,
    RunState,
    Source,
    read_run_state,
    state_path,
    write_run_state,
)
from anthias_rollback.rollback.steps import (
    SCRATCH_KINDS,
    build_new_file,
    close_connections_to,
    fence_postgres,
    flip_profile,
    lift_fence,
    new_file_path,
    post_verify,
    preflight,
    preserve_postgres,
    prove_loss,
    remove_sqlite_file,
    remove_stale_scratch_files,
    swap_new_file,
    verify_new_file,
    verify_urls,
)

__all__ = [
    'AUTO',
    'LOG_NAME',
    'SCRATCH_KINDS',
    'SOURCE_CHOICES',
    'STATE_NAME',
    'ExactJSONEncoder',
    'LossStatus',
    'Outcome',
    'RollbackOptions',
    'RollbackResult',
    'RunState',
    'Source',
    'already_rolled_back',
    'at_risk_rows',
    'build_from_backup',
    'build_from_postgres',
    'build_new_file',
    'choose_source',
    'close_connections_to',
    'code_migrations',
    'count_rows',
    'cutover_summary',
    'data_loss_line',
    'export_rows',
    'failed_notice',
    'fence_postgres',
    'finish',
    'flip_profile',
    'latest_report',
    'lift_fence',
    'load_result',
    'measured_loss',
    'never_left_sqlite',
    'new_file_path',
    'pick_backup',
    'post_verify',
    'postgres_usable',
    'preflight',
    'preserve_postgres',
    'prove_loss',
    'read_run_state',
    'remove_sqlite_file',
    'remove_stale_scratch_files',
    'render_summary',
    'resolved_notice',
    'run_rollback',
    'state_path',
    'swap_new_file',
    'urgent_notice',
    'verify_new_file',
    'verify_urls',
    'write_run_state',
]
