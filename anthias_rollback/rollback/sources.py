"""Where the rows come from. Decides the source (`auto`: PostgreSQL when it
answers, is migrated and every table reads, else the newest verified
backup; a setting to fix raises instead of falling back), and fills the
new SQLite file from it: a migrate plus a copy inside the journal's
snapshot from PostgreSQL, or a checked snapshot of the backup. From a
backup, the rows PostgreSQL holds that the backup lacks are found and
exported as a loaddata fixture (export_rows, ExactJSONEncoder). Also
counts rows per model and summarises what changed since the cutover.
"""
import contextlib
import datetime as dt
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from django.core import serializers
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, connections

from anthias_rollback import (
    backup,
    compare,
    engines,
    events,
    faults,
    fsutil,
    models_graph,
    profiles,
    schema,
    schema_build,
    transfer,
)
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import (
    BackupError,
    ConfigError,
    DatabaseDownError,
    DatabaseUnavailableError,
    RollbackError,
    SchemaMismatchError,
)
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.rollback import accounting, incremental, render
from anthias_rollback.rollback.state import (
    AUTO,
    RunState,
    Source,
    count_rows,
)
from anthias_rollback.window import cutover as window_cutover
from anthias_rollback.window import journal as window_journal
from anthias_rollback.window import standby as window_standby


def code_migrations() -> set[str]:
    """Every migration the installed code knows, as `app.name` (squashes
    resolved as on an empty database: schema.migration_state)."""
    return set(schema.migration_state(set()).pending)


def postgres_usable(run: RunState) -> tuple[bool, str]:
    """Can PostgreSQL be the source: answers, migrated, every table read.
    (False, why) only when the server is down or not serving; a setting
    to fix (bad password, missing database, invalid port, a malformed
    variable) raises: falling back to a backup would then silently drop
    every write since the cutover."""
    alias = run.options.postgres_alias
    try:
        schema.check_connection(alias)
        pending = schema.pending_migrations(alias)
        if pending:
            raise ConfigError(f'{describe_alias(alias)} has unapplied '
                              f'migrations ({", ".join(pending[:5])})')
        budget_ms = int(max(1.0, min(30.0, run.deadline.remaining() / 4))
                        * 1000)
        for model in models_graph.plan_models().models:
            engines.for_alias(alias).probe_table(alias, model, budget_ms)
        run.journal = window_journal.window_state(alias)
        # The cutover accounting runs in the build's snapshot, after the
        # fence (rollback.accounting): one count per table, not two.
    except DatabaseDownError as err:
        connections[alias].close()
        return False, first_line(err)
    except (RollbackError, DatabaseError) as err:
        connections[alias].close()
        if isinstance(err, DatabaseError) and engines.for_alias(
                alias).server_down(err):
            return False, first_line(err)
        raise ConfigError(
            f'PostgreSQL is not usable and this is not an outage: '
            f'{first_line(err)}; fix the setting (ANTHIAS_POSTGRES_URL, '
            'POSTGRES_*, --postgres-*) or restore a backup on purpose with '
            '--source backup; nothing was changed') from None
    return True, (f'{describe_alias(alias)} answers and every table is '
                  'readable')


def choose_source(run: RunState) -> None:
    opts = run.options
    with run.phase('source') as record:
        if opts.source == Source.BACKUP:
            run.source = Source.BACKUP
            run.source_reason = 'asked for (--source backup)'
        else:
            usable, why = postgres_usable(run)
            if opts.source == Source.POSTGRES and not usable:
                raise DatabaseUnavailableError(
                    f'cannot roll back from PostgreSQL: {why}')
            if usable:
                asked = ('asked for (--source postgres); '
                         if opts.source == Source.POSTGRES else '')
                run.source = Source.POSTGRES
                run.source_reason = asked + why
            else:
                run.source = Source.BACKUP
                run.source_reason = f'PostgreSQL not usable: {why}'
                if opts.source == AUTO:
                    choose_standby(run, why)
        if run.source == Source.BACKUP:
            run.backup_used = pick_backup(run)
        record['detail'] = f'{run.source}: {run.source_reason}'


# Room beyond the new file's estimated size (SQLite's own journal,
# the estimate's error), as the preflight keeps.
ROOM_MARGIN = 16 * 1024 * 1024


def check_room(run: RunState) -> None:
    """Refuse (nothing changed yet) when the live file's filesystem has
    no room for the new file sized from what will be written: PostgreSQL's
    table data, or the backup or standby to be restored. The preflight
    only knew the live file, which can be far smaller than PostgreSQL's
    rows after weeks on it; the build then filled the disk."""
    from anthias_rollback.engines import postgres_server

    if run.source == Source.POSTGRES:
        tables = [m._meta.db_table
                  for m in models_graph.plan_models().models]
        size = postgres_server.postgres_table_bytes(
            run.options.postgres_alias, tables)
        what = 'PostgreSQL\'s table data'
    elif run.source == Source.STANDBY:
        path = window_standby.standby_path(run.data_dir)
        size, what = path.stat().st_size, f'the standby {path}'
    else:
        assert run.backup_used is not None   # pick_backup chose it
        size = Path(run.backup_used).stat().st_size
        what = f'the backup {run.backup_used}'
    folder = Path(run.live_file).parent
    free = shutil.disk_usage(folder).free
    needed = int(size * 1.1) + ROOM_MARGIN
    if free < needed:
        raise ConfigError(
            f'not enough free disk in {folder}: {free >> 20} MiB free, '
            f'about {needed >> 20} MiB needed for the new file '
            f'({what}: {size >> 20} MiB); free some space and run again; '
            'nothing changed')


def choose_standby(run: RunState, why: str) -> None:
    """PostgreSQL is down: the standby replicate_changes kept, when there
    is a usable one, loses only the writes after its position (a backup
    loses every write since the cutover)."""
    position, problem = window_standby.usable_standby(run.data_dir)
    if position is None:
        if problem != 'no standby':
            run.warn(f'{problem}; restoring a backup instead')
        return
    run.source = Source.STANDBY
    run.source_reason = (f'PostgreSQL not usable: {why}; standby at '
                         f'{position.position_at}')


def pick_backup(run: RunState) -> Path:
    """The backup to restore: --backup-path or the newest verified one."""
    if run.options.backup_path is not None:
        path = Path(run.options.backup_path)
        if not path.is_file():
            raise BackupError(f'backup {path} does not exist')
        return path
    directory = run.backup_dir
    info = backup.latest_verified_backup(directory)
    if info is None:
        raise BackupError(
            f'no verified backup in {directory} and PostgreSQL '
            'cannot be the source; nothing to roll back from')
    return info.path


def build_from_postgres(run: RunState, new_path: Path) -> None:
    """The journal's tail on a base when it can (rollback.incremental),
    else, saying why, every row. PostgreSQL holding fewer rows than its
    cutover accounts for (found in the build's snapshot) makes `auto`
    restore the newest verified backup instead."""
    try:
        try:
            run.copy = incremental.build_incremental(run, new_path)
            run.rows = dict(run.expected_rows)
            return
        except incremental.NotIncremental as why:
            _forget_build(run, new_path)
            run.copy = {'method': 'full', 'reason': str(why)}
        build_full_copy(run, new_path)
    except accounting.PostgresLostRows as lost:
        _forget_build(run, new_path)
        run.copy = None
        run.source = Source.BACKUP
        run.source_reason = f'PostgreSQL not usable: {lost}'
        run.backup_used = pick_backup(run)
        check_room(run)
        build_from_backup(run, new_path)


def _forget_build(run: RunState, new_path: Path) -> None:
    sqlite_file.remove_sqlite_file(new_path)
    run.snapshot = run.base_quick_check = run.base_check_note = None


def build_full_copy(run: RunState, new_path: Path) -> None:
    opts = run.options

    def on_progress(event: events.ProgressEvent) -> None:
        run.runner.emit(event.kind, event.name, rows=event.rows,
                        total=event.total, seconds=event.seconds)
        if event.kind == events.MODEL_DONE:
            faults.checkpoint(f'rollback:copied-{event.name}')
        run.deadline.check('the copy from PostgreSQL')

    # In a child where the new file is the only database: a data
    # migration writing through the default manager (which here is
    # PostgreSQL) wrote into production from an in-process migrate.
    schema_build.migrate_file(new_path,
                              timeout=max(1.0, run.deadline.remaining()))
    with profiles.sqlite_file_alias(new_path) as alias:
        faults.checkpoint('rollback:schema-created')
        # Also raises sqlite_sequence to PostgreSQL's sequences, so no id
        # PostgreSQL handed out is reused after the rollback.
        with contextlib.ExitStack() as stack:
            if run.journal is not None and run.journal.installed:
                run.snapshot = stack.enter_context(
                    window_journal.snapshot_transaction(opts.postgres_alias))
                faults.checkpoint('rollback:snapshot-taken')
                accounting.account_in_snapshot(
                    run, count_rows(opts.postgres_alias))
            # replace: the rows in this new file are the data
            # migrations' own (a CMS's root page, seeded settings); the
            # copy empties every table first and leaves the source's.
            result = transfer.transfer_data(
                opts.postgres_alias, alias, batch_size=opts.batch_size,
                replace=True, progress=on_progress)
        run.expected_rows = {m.label: m.rows for m in result.models}
    run.rows = dict(run.expected_rows)


def build_from_standby(run: RunState, new_path: Path) -> None:
    """A copy of the standby, its position table dropped, checked like a
    backup (schema here; quick_check and counts in the verify phase).
    Records the bound: every write committed before its position."""
    position = window_standby.copy_standby(
        run.data_dir, new_path, timeout=max(1.0, run.deadline.remaining()))
    bring_schema_forward(run, new_path, f'standby '
                         f'{window_standby.standby_path(run.data_dir)}')
    with profiles.sqlite_file_alias(new_path) as alias:
        run.rows = count_rows(alias)
    run.expected_rows = dict(run.rows)
    run.standby_bound = {
        'standby': str(window_standby.standby_path(run.data_dir)),
        'position_at': position.position_at,
        'position_ts': position.position_ts,
        'postgres_seen_at': datetime.fromtimestamp(
            position.postgres_seen_ts, dt.UTC).isoformat(),
        'behind_seconds': round(position.behind_seconds, 3),
        'journal_id': position.journal_id, 'snapshot': position.snapshot,
        'window': position.window}
    run.at_risk_note = render.standby_loss_line(run.standby_bound)


def file_migration_state(path: Path) -> schema.MigrationState:
    """The migrations recorded in the SQLite file at *path* against this
    code's (schema.migration_state: the check backup_database and the
    readiness use too)."""
    with profiles.sqlite_file_alias(path) as alias:
        return schema.alias_migration_state(alias)


def bring_schema_forward(run: RunState, new_path: Path, what: str) -> None:
    """The copy at *new_path* of a backup or standby (*what*), made this
    code's schema: refused (BackupError) when it records migrations this
    code does not know (made by newer code: restoring it is a downgrade),
    migrated forward in isolation (schema_build) when it is only behind.
    The backup or standby itself is never changed."""
    state = file_migration_state(new_path)
    if state.unknown:
        shown = ', '.join(state.unknown[:5]) + (
            f' and {len(state.unknown) - 5} more'
            if len(state.unknown) > 5 else '')
        raise BackupError(
            f'{what} records migrations this code does not know '
            f'({shown}): made by a newer release, restoring it with this '
            'one would be a downgrade')
    if not state.pending:
        return
    with run.phase('migrate-forward') as record:
        try:
            applied = schema_build.migrate_file(
                new_path, timeout=max(1.0, run.deadline.remaining()))
        except SchemaMismatchError as err:
            # The child's error names the new file; the operator knows
            # the backup or standby.
            detail = str(err).split(': ', 1)[-1]
            raise BackupError(
                f'{what} does not match this code\'s schema '
                f'({schema.describe_state(state)}) and cannot be '
                f'migrated forward: {detail}') from None
        shown = ', '.join(applied[:10]) + (
            f' and {len(applied) - 10} more' if len(applied) > 10 else '')
        record['detail'] = f'{what}: migrated forward: {shown}'


def build_from_backup(run: RunState, new_path: Path) -> None:
    if run.source == Source.STANDBY:
        return build_from_standby(run, new_path)
    assert run.backup_used is not None   # chosen with the source
    checked = backup.verify_backup(run.backup_used)
    # A backup without a manifest (older tools) cannot be checksummed; an
    # operator who names one with --backup-path gets it if everything
    # else checks out (integrity, foreign keys, schema below).
    only_unverified = (not checked.has_manifest
                       and len(checked.reasons) == 1
                       and run.options.backup_path is not None)
    if not checked.valid and not only_unverified:
        raise BackupError(f'backup {run.backup_used} is not valid: '
                          f'{"; ".join(checked.reasons)}')
    if not checked.has_manifest:
        run.warn(f'backup {run.backup_used} has no manifest: checked for '
                 'integrity only, no checksum')
    sqlite_file.sqlite_snapshot(run.backup_used, new_path,
                                timeout=max(1.0, run.deadline.remaining()))
    bring_schema_forward(run, new_path, f'backup {run.backup_used}')
    with profiles.sqlite_file_alias(new_path) as alias:
        run.rows = count_rows(alias)
        run.expected_rows = dict(run.rows)
        at_risk_rows(run, alias)


def at_risk_rows(run: RunState, backup_alias: str) -> None:
    """Rows on PostgreSQL that the backup lacks or holds differently,
    exported as a loaddata fixture; deleted-on-PostgreSQL rows counted."""
    pg = run.options.postgres_alias
    try:
        schema.check_connection(pg)
        found = compare.find_at_risk_keys(
            backup_alias, pg, timeout=max(5.0, run.deadline.remaining()))
    except (RollbackError, DatabaseError) as err:
        connections[pg].close()
        run.at_risk_note = ('could not be computed: PostgreSQL is not '
                            f'usable ({first_line(err)})')
        run.warn(f'at-risk rows {run.at_risk_note}')
        return
    keys, resurrected = found.keys, found.resurrected
    run.at_risk_rows = {label: len(pks) for label, pks in keys.items()}
    run.resurrected_rows = resurrected
    if keys and not run.options.dry_run:
        run.at_risk_file = export_rows(pg, keys, run.reports_dir)
    total = sum(run.at_risk_rows.values())
    run.at_risk_note = (f'{total} rows written on PostgreSQL after the '
                        'backup' + (f', exported to {run.at_risk_file}'
                                    if run.at_risk_file else ''))


def export_rows(alias: str, keys: dict[str, list[Any]],
                directory: Path) -> Path:
    """Write the rows with these keys as a `loaddata` JSON fixture (0600).

    Keys are fetched in chunks far below SQLite's/PostgreSQL's parameter
    limits; the file appears under its final name only when complete.
    """
    fsutil.ensure_private_dir(directory)
    stamp = datetime.now(dt.UTC).strftime('%Y%m%d_%H%M%S')
    path = directory / f'at_risk_rows_{stamp}.json'
    objects: list[Any] = []
    order = [m._meta.label for m in models_graph.plan_models().models]
    for label in sorted(keys, key=lambda lb: order.index(lb)
                        if lb in order else len(order)):
        model = models_graph.get_model(label)
        pks = keys[label]
        for start in range(0, len(pks), 500):
            objects.extend(model._base_manager.using(alias).filter(
                pk__in=pks[start:start + 500]).order_by('pk'))
    rows = serializers.serialize('python', objects)
    text = json.dumps(rows, cls=ExactJSONEncoder, indent=1,
                      ensure_ascii=False)
    fsutil.atomic_write_bytes(path, text.encode(), mode=0o600)
    return path


class ExactJSONEncoder(DjangoJSONEncoder):
    """DjangoJSONEncoder cuts datetimes and times to milliseconds (its
    ECMA-262 format); an exported row must come back exactly, and
    loaddata parses full ISO 8601."""

    def default(self, o: Any) -> Any:
        if isinstance(o, (dt.datetime, dt.time)):
            return o.isoformat()
        return super().default(o)


def cutover_summary(run: RunState) -> None:
    recorded = window_cutover.read_cutover(run.data_dir)
    if recorded is None or run.source != Source.POSTGRES:
        return
    try:
        since = window_cutover.rows_since_cutover(
            run.options.postgres_alias, recorded, counted=run.source_counts)
    except (RollbackError, DatabaseError):
        return
    run.since_cutover = {
        'cutover_at': recorded.get('cutover_at'),
        'models': {s.label: {'rows_at_cutover': s.rows_at_cutover,
                             'rows_now': s.rows_now,
                             'new_rows': s.new_rows}
                   for s in since if s.rows_at_cutover != s.rows_now
                   or s.new_rows},
    }
