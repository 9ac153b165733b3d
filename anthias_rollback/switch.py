"""Flip the active profile, checked and atomic, then the restart command.

The flip only writes the state file; running processes keep their
DATABASES until restarted (Django must not change DATABASES at run time),
which is what the optional restart command is for.
"""
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from anthias_rollback import conf, profiles, schema
from anthias_rollback.exceptions import SchemaMismatchError
from anthias_rollback.journal import record_cutover


@dataclass(frozen=True)
class RestartResult:
    command: str
    ok: bool
    returncode: int | None
    seconds: float
    output: str


@dataclass(frozen=True)
class SwitchResult:
    previous: str
    profile: str
    state_file: Path
    forced: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    restart: RestartResult | None = None
    cutover_journal: Path | None = None


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


def run_restart_command(command: str, timeout: float) -> RestartResult:
    """Run the configured restart command; never raises for its failure."""
    started = time.monotonic()
    try:
        done = subprocess.run(shlex.split(command), capture_output=True,
                              text=True, timeout=timeout, check=False)
        output = (done.stdout + done.stderr).strip()[-2000:]
        return RestartResult(command, done.returncode == 0,
                             done.returncode,
                             time.monotonic() - started, output)
    except subprocess.TimeoutExpired:
        return RestartResult(command, False, None,
                             time.monotonic() - started,
                             f'timed out after {timeout:g}s')
    except OSError as err:
        return RestartResult(command, False, None,
                             time.monotonic() - started, str(err))


def restart_after_flip() -> RestartResult | None:
    """Run ANTHIAS_ROLLBACK_RESTART_COMMAND if one is configured."""
    command = conf.get_setting('ANTHIAS_ROLLBACK_RESTART_COMMAND')
    if not command:
        return None
    timeout = float(conf.get_setting('ANTHIAS_ROLLBACK_RESTART_TIMEOUT'))
    return run_restart_command(command, timeout)


def switch_profile(target: str, force: bool = False,
                   restart: bool = True,
                   extra_state: dict | None = None) -> SwitchResult:
    """Make *target* the active profile.

    Reads the target alias (connection and migration checks unless
    *force*); writes only the state file. Raises ConfigError,
    DatabaseUnavailableError, SchemaMismatchError or StateFileError,
    with the profile unchanged in every case.
    """
    data_dir = conf.data_dir()
    previous = profiles.resolve_active_profile(data_dir)
    alias = profiles.alias_for_profile(target)
    if not force:
        check_target(alias)
    warnings = []
    if previous.source == 'env':
        warnings.append(
            f'ANTHIAS_DB_PROFILE={previous.name} is set in the environment '
            'and overrides the state file; unset it for this switch to '
            'take effect')
    state = {'previous': previous.name, 'forced': force}
    state.update(extra_state or {})
    journal = None
    if target == profiles.POSTGRES and previous.name != target:
        journal = record_cutover(profiles.SQLITE, alias, data_dir)
    path = profiles.write_active_profile(data_dir, target, state)
    result = restart_after_flip() if restart else None
    return SwitchResult(previous.name, target, path, force,
                        tuple(warnings), result, journal)
