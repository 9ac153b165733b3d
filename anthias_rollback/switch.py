"""Flip the active profile, checked and atomic, then the restart.

The flip only writes the state file; running processes keep their
DATABASES until restarted (Django must not change DATABASES at run time),
which is what the restart adapter (restart.py) is for.
"""
from dataclasses import dataclass, field
from pathlib import Path

from django.db import DatabaseError

from anthias_rollback import compare, conf, profiles, schema
from anthias_rollback.exceptions import (
    RollbackError,
    SchemaMismatchError,
    StateFileError,
    SwitchRefusedError,
)
from anthias_rollback.report import describe_alias, first_line
from anthias_rollback.restart import (  # noqa: F401 switch.X kept
    RestartResult,
    restart_after_flip,
    run_restart_command,
)
from anthias_rollback.window import cutover as window_cutover
from anthias_rollback.window import journal as window_journal
from anthias_rollback.window import standby as window_standby


@dataclass(frozen=True)
class SwitchResult:
    previous: str
    profile: str
    state_file: Path
    forced: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    restart: RestartResult | None = None
    cutover_journal: Path | None = None
    # The change journal opened on PostgreSQL (None: not a cutover, or
    # forced past a PostgreSQL that could not take it).
    window: dict | None = None


def check_target(alias: str) -> None:
    """Refuse a target that does not answer or is not fully migrated.

    Raises DatabaseUnavailableError or SchemaMismatchError naming the
    alias (host:port) and the missing migrations.
    """
    pending = schema.pending_migrations(alias)
    if pending:
        shown = ', '.join(pending[:10])
        more = f' and {len(pending) - 10} more' if len(pending) > 10 else ''
        from anthias_rollback.report import describe_alias

        raise SchemaMismatchError(
            f'{describe_alias(alias)} has {len(pending)} unapplied '
            f'migrations ({shown}{more}); run `manage.py migrate '
            f'--database {alias}` first, or use --force')


def check_same_rows(sqlite_alias: str, postgres_alias: str) -> None:
    """Refuse a cutover onto a PostgreSQL that does not hold exactly
    SQLite's rows: per-model counts, then the checksum comparison.
    Raises SwitchRefusedError naming the first models that differ."""
    report = compare.compare_aliases(sqlite_alias, postgres_alias)
    differing = [m for m in report.models if not m.ok]
    if differing:
        shown = '; '.join(
            f'{m.label}: sqlite {m.left_rows} rows, postgres '
            f'{m.right_rows} ({m.differences} differ)'
            for m in differing[:5])
        raise SwitchRefusedError(
            f'{describe_alias(postgres_alias)} does not hold SQLite\'s '
            f'data ({shown}); run `migrate_to_postgres --replace` (or '
            '--repair) first, or pass --force to switch anyway')


# Generous: the CMS host's 185 migrations take ~14 s on the dev box.
SCHEMA_TEMPLATE_TIMEOUT = 600.0


def prepare_schema_template() -> list[str]:
    """After a cutover (the profile flipped, the processes restarted):
    build the schema template a rollback's new file is copied from
    (schema_build), so the rollback does not wait for `migrate`. Writes
    only under <data dir>/schema_templates/. Its failure is a warning
    line, never a failed switch: the rollback then builds the schema."""
    from anthias_rollback import schema_build

    try:
        schema_build.ensure_template(timeout=SCHEMA_TEMPLATE_TIMEOUT)
    except RollbackError as err:
        return [(f'no schema template prepared ({first_line(err)}): a '
                 'rollback builds its schema itself, which takes longer')]
    return []


def switch_profile(target: str, force: bool = False,
                   restart: bool = True,
                   extra_state: dict | None = None) -> SwitchResult:
    """Make *target* the active profile.

    Reads the target alias (connection and migration checks unless
    *force*); writes only the state file. Raises ConfigError,
    DatabaseUnavailableError, SchemaMismatchError or StateFileError,
    with the profile unchanged in every case.
    """
    # Every setting checked before the flip (the restart timeout is read
    # only after it).
    conf.validate_settings()
    data_dir = conf.data_dir()
    warnings = []
    try:
        # --force rewrites a copied state file (restored from another
        # device's backup) as well as an unreadable one: that is the fix
        # their error messages name.
        previous = profiles.resolve_active_profile(data_dir,
                                                   accept_copy=force)
    except StateFileError as err:
        if not force:
            raise
        warnings.append(f'{first_line(err)}: rewritten (--force)')
        previous = profiles.ActiveProfile('unknown', 'state file',
                                          'unreadable')
    alias = profiles.alias_for_profile(target)
    cutover = target == profiles.POSTGRES and previous.name != target
    if not force:
        check_target(alias)
        if cutover:
            check_same_rows(profiles.SQLITE, alias)
    if previous.source == 'env':
        warnings.append(
            f'ANTHIAS_DB_PROFILE={previous.name} is set in the environment '
            'and overrides the state file; unset it for this switch to '
            'take effect')
    state = {'previous': previous.name, 'forced': force}
    state.update(extra_state or {})
    journal = opened = None
    if cutover:
        # The journal and the cutover row commit together, before the
        # flip: no write on PostgreSQL is ever outside the journal.
        # A new window: a standby of an older one would hold stale rows.
        folder = window_standby.discard_standby(data_dir)
        try:
            opened = window_journal.open_window(
                profiles.SQLITE, alias, forced=force, standby_dir=folder)
            problem = opened['standby_cutover'].get('problem')
            if problem:
                warnings.append(f'no standby cutover file ({problem}): '
                                'replicate_changes will start from a '
                                'full copy of PostgreSQL')
        except (RollbackError, DatabaseError) as err:
            if not force:
                raise SwitchRefusedError(
                    f'cannot open the rollback window on '
                    f'{describe_alias(alias)}: {first_line(err)}') from None
            warnings.append(f'forced without a change journal '
                            f'({first_line(err)}): a later rollback cannot '
                            'prove what it keeps')
        journal = window_cutover.record_cutover(profiles.SQLITE, alias,
                                                data_dir)
    path = profiles.write_active_profile(data_dir, target, state)
    result = restart_after_flip(profiles.sqlite_alias_path(), restart)
    if cutover:
        warnings.extend(prepare_schema_template())
    return SwitchResult(previous.name, target, path, force,
                        tuple(warnings), result, journal, opened)
