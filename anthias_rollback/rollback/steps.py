"""The other phase bodies of a rollback, in the order plan.py runs them:
preflight (interrupted-swap recovery, stale scratch files, live path,
disk, profile), the write fence on PostgreSQL (take, lift before the
swap on failure), the optional pg_dump, the build of the new file
(dispatching to the source's builder in sources.py), its verification,
the swap plus profile flip and restart, the loss proof, and the
post-verification through the app's own views. Also the scratch-file
helpers: the new file's name beside the live one and the removal of a
killed run's half-built files.
"""
import os
import shutil
import tempfile
import time
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path

from django.core import checks as django_checks
from django.db import DatabaseError, connections

from anthias_rollback import conf, engine_tables, engines, profiles, switch
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import ConfigError, RollbackError
from anthias_rollback.health import client_host
from anthias_rollback.phases import PhaseStatus
from anthias_rollback.report import first_line
from anthias_rollback.rollback import preserve, state, swap
from anthias_rollback.rollback.sources import (
    build_from_backup,
    build_from_postgres,
    count_rows,
)
from anthias_rollback.rollback.state import (
    RunState,
    Source,
    read_run_state,
    write_run_state,
)
from anthias_rollback.window import journal as window_journal


def close_connections_to(path: Path) -> None:
    """Close this process's connections to the SQLite file at *path*:
    after the rename they would keep reading the old inode."""
    target = Path(path).resolve()
    for conn in connections.all(initialized_only=True):
        name = conn.settings_dict.get('NAME')
        if name and engines.is_sqlite(conn.alias) and \
                Path(str(name)).resolve() == target:
            conn.close()


SCRATCH_KINDS = ('rollback-new', 'dry-run')


def new_file_path(live_path: Path, dry_run: bool) -> Path:
    kind = SCRATCH_KINDS[1] if dry_run else SCRATCH_KINDS[0]
    stamp = datetime.now(UTC).strftime('%Y%m%d_%H%M%S_%f')
    return live_path.with_name(f'{live_path.name}.{kind}-{stamp}')


def remove_stale_scratch_files(live_path: Path) -> list[Path]:
    """Half-built files of a killed run (never live: the swap renames them
    away). Safe to delete: the caller holds the operation lock."""
    found = []
    for kind in SCRATCH_KINDS:
        for path in live_path.parent.glob(f'{live_path.name}.{kind}-*'):
            if path.name.endswith(tuple(swap.SIDE_FILES)):
                continue
            remove_sqlite_file(path)
            found.append(path)
    return found


remove_sqlite_file = sqlite_file.remove_sqlite_file


def preflight(run: RunState) -> None:
    opts = run.options
    with run.phase('preflight') as record:
        recovery = swap.recover_interrupted_swap(
            opts.live_path or profiles.sqlite_alias_path(opts.sqlite_alias))
        if recovery.found:
            assert recovery.warning is not None   # found: what it did
            run.warn(recovery.warning)
        live = Path(opts.live_path or
                    profiles.sqlite_alias_path(opts.sqlite_alias))
        run.live_path = live
        stale = remove_stale_scratch_files(live)
        if stale:
            run.warn(f'removed {len(stale)} half-built file(s) of an '
                     f'interrupted run: {", ".join(p.name for p in stale)}')
        if not live.parent.is_dir():
            raise ConfigError(f'live SQLite directory {live.parent} does '
                              'not exist')
        try:
            fd, probe = tempfile.mkstemp(dir=live.parent, prefix='.probe-')
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ConfigError(f'live SQLite path {live} is not writable: '
                              f'{err.strerror}') from None
        if live.exists() and not os.access(live, os.W_OK):
            raise ConfigError(f'live SQLite file {live} is not writable')
        active = profiles.resolve_active_profile(run.data_dir)
        if active.source == 'env' and active.name != profiles.SQLITE \
                and not opts.dry_run:
            # The flip writes the state file, which the variable overrides:
            # processes started with it would stay on PostgreSQL.
            raise ConfigError(
                f'ANTHIAS_DB_PROFILE={active.name} is set in the '
                'environment and overrides the profile state file: after '
                'a rollback, processes started with it would stay on '
                'PostgreSQL; unset it (or set ANTHIAS_DB_PROFILE=sqlite) '
                'where the app is started, then run again')
        interrupted = read_run_state(run.data_dir).get('status') in (
            'running', 'swapping', 'swapped')
        if (active.name == profiles.SQLITE and not opts.source_explicit
                and not interrupted):
            raise ConfigError(
                f'the active profile is already sqlite (from '
                f'{active.source}); nothing to roll back. To rebuild the '
                'SQLite file anyway, pass --source postgres or --source '
                'backup')
        size = live.stat().st_size if live.exists() else 0
        free = shutil.disk_usage(live.parent).free
        needed = int(size * 1.5) + 16 * 1024 * 1024
        if free < needed:
            raise ConfigError(
                f'not enough free disk in {live.parent}: {free >> 20} MiB '
                f'free, about {needed >> 20} MiB needed for the new file')
        record['detail'] = (f'live {live} ({size >> 10} KiB), profile '
                            f'{active.name} from {active.source}, '
                            f'{free >> 20} MiB free')


def fence_postgres(run: RunState) -> None:
    """Stop every journaled write on PostgreSQL (all roles, all open
    sessions) and wait for the transactions that already wrote, so the
    copy's snapshot is final. Refuses (nothing changed, fence lowered)
    when some of them stay open past the budget."""
    opts = run.options
    if run.source != Source.POSTGRES or opts.dry_run or not opts.fence:
        return
    with run.phase('fence') as record:
        if run.journal is None or not run.journal.installed:
            record['status'] = PhaseStatus.WARNING
            record['detail'] = 'no change journal: writes cannot be fenced'
            run.warn('PostgreSQL has no change journal (the cutover was '
                     'made without one): writes during the rollback cannot '
                     'be stopped or counted; stop the app first')
            return
        write_run_state(run.data_dir, 'running', fence='up',
                        started_at=run.runner.started_at)
        budget = max(1.0, min(60.0, run.deadline.remaining() / 3))
        result = window_journal.take_fence(opts.postgres_alias, budget)
        run.fenced = True
        if not result.taken:
            shown = ', '.join(f'pid {w["pid"]} ({w["user"]}, '
                              f'{w["state"]})' for w in result.still_open)
            raise RollbackError(
                f'{len(result.still_open)} PostgreSQL session(s) hold '
                f'uncommitted writes after {result.waited_seconds:.1f}s '
                f'({shown}); their commit could not be kept, so nothing was '
                'changed. End them (pg_terminate_backend as their owner or '
                'a superuser) and run again, or restore a backup with '
                '--source backup')
        ended = (f'; ended {len(result.terminated)} session(s)'
                 if result.terminated else '')
        record['detail'] = (f'writes refused for every role; in-flight '
                            f'writers done in {result.waited_seconds:.2f}s'
                            f'{ended}')


def lift_fence(run: RunState) -> None:
    """Before the swap, a failure changed nothing: let writes through."""
    if not run.fenced or run.swapped:
        return
    try:
        window_journal.lower_fence(run.options.postgres_alias)
        run.fenced = False
        write_run_state(run.data_dir, 'failed', fence='open')
    except DatabaseError as err:
        run.warn(f'could not lower the write fence on PostgreSQL '
                 f'({first_line(err)}): run switch_database --to postgres '
                 'once it answers')


def prove_loss(run: RunState) -> None:
    """After the swap: which writes SQLite lacks, measured (the fence
    stays up, so the answer cannot change later). After the swap, not
    earlier: a write that bypassed the triggers while the file was
    built or verified is still named."""
    if run.source != Source.POSTGRES or run.snapshot is None:
        return
    with run.phase('proof', check_deadline=False) as record:
        run.proof = window_journal.prove_copy(run.options.postgres_alias,
                                              run.snapshot, run.rows)
        if run.proof.proven_none:
            record['detail'] = ('no write committed after the copy\'s '
                                'snapshot (' + ', '.join(run.proof.checked)
                                + ' checked)')
        else:
            record['status'] = PhaseStatus.FAILED
            record['detail'] = (f'{len(run.proof.lost)} write(s) and '
                                f'{len(run.proof.count_differences)} '
                                'count difference(s) not in SQLite')


def preserve_postgres(run: RunState) -> None:
    opts = run.options
    if not opts.preserve_postgres:
        return
    with run.phase('preserve') as record:
        message = None
        if preserve.find_pg_dump() is None:
            message = (f'pg_dump not found (ANTHIAS_PG_DUMP='
                       f'{conf.get_setting("ANTHIAS_PG_DUMP")})')
        else:
            try:
                # pg_dump refuses a newer server: find out now, not after
                # the fence (a dry run says so too).
                preserve.check_pg_dump_version(opts.postgres_alias)
            except (ConfigError, DatabaseError) as err:
                message = first_line(err)
        if opts.dry_run and message is None:
            record['status'] = PhaseStatus.SKIPPED
            record['detail'] = 'dry run: no dump written'
            return
        if message is not None:
            if not opts.emergency:
                raise RollbackError(message + '; install it, or run with '
                                    '--emergency to skip preservation')
            record['status'] = PhaseStatus.SKIPPED
            record['detail'] = message
            run.warn(message + '; PostgreSQL was not preserved')
            return
        stamp = datetime.now(UTC).strftime('%Y%m%d_%H%M%S')
        dest = run.backup_dir / f'postgresql_pre_rollback_{stamp}.dump'
        try:
            result = preserve.postgres_dump(
                opts.postgres_alias, dest,
                timeout=max(5.0, run.deadline.remaining()))
        except RollbackError as err:
            if not opts.emergency:
                raise
            record['status'] = PhaseStatus.WARNING
            record['detail'] = str(err)
            run.warn(f'{err}; continuing (--emergency)')
            return
        run.dump_path = result.path
        record['detail'] = f'{result.path} ({result.size >> 10} KiB)'


def build_new_file(run: RunState) -> Path:
    new_path = new_file_path(run.live_file, run.options.dry_run)
    with run.phase('build') as record:
        try:
            if run.source == Source.POSTGRES:
                build_from_postgres(run, new_path)
            else:
                build_from_backup(run, new_path)
        except BaseException:
            remove_sqlite_file(new_path)
            raise
        total = sum(run.rows.values())
        how = f' ({run.copy["method"]} copy)' if run.copy else ''
        record['detail'] = (f'{total} rows in {len(run.rows)} models '
                            f'from {run.source}{how} into {new_path.name}')
    return new_path


def verify_new_file(run: RunState, new_path: Path) -> None:
    opts = run.options
    with run.phase('verify') as record:
        if run.base_quick_check is not None:
            # Incremental: its copied base was checked during the build,
            # while SQLite wrote the journal's tail into it.
            quick, done = run.base_quick_check, [
                run.base_check_note
                or 'quick_check (of the copied base, during the build)']
        else:
            quick = sqlite_file.sqlite_quick_check(new_path)
            done = ['quick_check']
        if quick != 'ok':
            raise RollbackError(f'new file {new_path} fails quick_check: '
                                f'{quick}')
        if opts.verify and not opts.emergency:
            problems = sqlite_file.sqlite_full_check(new_path)
            if problems:
                raise RollbackError(f'new file {new_path} fails its '
                                    f'checks: {problems[0]}')
            done += ['integrity_check', 'foreign_key_check']
        if opts.verify or opts.emergency:
            with profiles.sqlite_file_alias(new_path) as alias:
                found = count_rows(alias)
            wrong = {label: (found.get(label), n)
                     for label, n in run.expected_rows.items()
                     if found.get(label) != n}
            if wrong:
                label, (got, want) = next(iter(wrong.items()))
                raise RollbackError(f'new file {new_path}: {label} has '
                                    f'{got} rows, the source {want}')
            done.append('row counts')
        else:
            record['status'] = PhaseStatus.WARNING
            run.warn('--no-verify: only quick_check was run')
        record['detail'] = ', '.join(done)


def swap_new_file(run: RunState, new_path: Path) -> None:
    """Swap the new file in. Before it, the run state records what a
    rerun needs to finish the job (resume) once the new file is live:
    the facts so far and the new file's inode, which the rename keeps."""
    with run.phase('swap') as record:
        close_connections_to(run.live_file)
        st = new_path.stat()
        write_run_state(run.data_dir, 'swapping',
                        started_at=run.runner.started_at,
                        new_file=[st.st_dev, st.st_ino],
                        facts=state.run_facts(run))
        result = swap.swap_in(new_path, run.live_file)
        run.swapped = True
        run.safety_copy = result.safety_copy
        write_run_state(run.data_dir, 'swapped',
                        started_at=run.runner.started_at,
                        new_file=[st.st_dev, st.st_ino],
                        facts=state.run_facts(run))
        record['detail'] = (f'safety copy of the old database: '
                            f'{result.safety_copy}' if result.safety_copy
                            else 'there was no old database')


def flip_profile(run: RunState) -> switch.RestartResult | None:
    """Make sqlite the active profile, poke the viewer, then the restart
    adapter (restart.py)."""
    with run.phase('profile', check_deadline=False) as record:
        profiles.write_active_profile(
            run.data_dir, profiles.SQLITE,
            {'previous': profiles.POSTGRES, 'reason': 'rollback'})
        run.flipped_at = time.monotonic()
        restart = switch.restart_after_flip(run.live_path,
                                            run.options.restart)
        record['detail'] = 'active profile: sqlite'
        if restart is not None:
            record['detail'] += f'; {restart.describe()}'
            if not restart.ok:
                record['status'] = PhaseStatus.FAILED
                run.warn(restart.failure_line())
    return restart


def interrupted_after_swap(run: RunState) -> dict | None:
    """The recorded state of a run killed after its swap, when the live
    file is provably that run's new file (same inode), else None."""
    recorded = read_run_state(run.data_dir)
    if recorded.get('status') not in ('swapping', 'swapped') or \
            not isinstance(recorded.get('facts'), dict):
        return None
    try:
        st = run.live_file.stat()
    except OSError:
        return None
    if recorded.get('new_file') != [st.st_dev, st.st_ino]:
        return None
    return recorded


def verify_urls() -> list[str]:
    return ['/health'] + [u for u in conf.get_list_setting(
        'ANTHIAS_ROLLBACK_VERIFY_URLS') if u != '/health']


def post_verify_failures(run: RunState) -> list[str]:
    """Requests through the app's own views on the restored file, and
    Django's checks on it: what failed. Runs in any thread (its
    connections are that thread's own)."""
    failures = []
    with profiles.sqlite_file_alias(run.live_file, wal=True) as alias, \
            profiles.default_as(alias):
        # Imported here: django.test (and jinja2 with it) costs
        # ~75 ms of every rollback's start, before the swap.
        from django.test import Client

        client = Client(HTTP_HOST=client_host())
        for url in verify_urls():
            try:
                response = client.get(url)
                if response.status_code != 200:
                    failures.append(f'{url} -> HTTP '
                                    f'{response.status_code}')
            # A view's crash is a verdict, not the rollback's failure.
            except Exception as err:  # noqa: BLE001
                failures.append(f'{url} -> {first_line(err)}')
        errors = [m for m in django_checks.run_checks(
            databases=[alias]) if m.is_serious()]
        failures += [f'check {m.id}: {m.msg}' for m in errors]
    return failures


def post_verify(run: RunState,
                started: futures.Future[list[str]] | None = None) -> bool:
    """The post-verify phase: post_verify_failures, or the result of
    *started* (the same work begun in another thread)."""
    with run.phase('post-verify', check_deadline=False) as record:
        failures = (post_verify_failures(run) if started is None
                    else started.result())
        record['detail'] = (f'{len(verify_urls())} URLs, Django checks'
                            + (': ' + '; '.join(failures) if failures
                               else ': ok'))
        if failures:
            record['status'] = PhaseStatus.FAILED
            for failure in failures:
                run.warn(f'post-verification: {failure}')
        return not failures


def rebuild_derived_tables(run: RunState) -> bool:
    """Run ANTHIAS_ROLLBACK_REBUILD_COMMANDS on the new live file (the
    tables left out as engine-specific, e.g. a search index, were not
    copied). Each command's result is in the phase's detail; a failure
    is a warning (the rollback stands: exit 4). No phase without
    commands."""
    if not engine_tables.rebuild_commands():
        return True
    with run.phase('rebuild', check_deadline=False) as record:
        results = engine_tables.run_rebuild_commands(
            profiles.SQLITE, env={'ANTHIAS_SQLITE_PATH': str(run.live_file)})
        record['detail'] = '; '.join(r.line() for r in results)
        failed = [r for r in results if not r.ok]
        if failed:
            record['status'] = PhaseStatus.FAILED
            for result in failed:
                run.warn(f'rebuild after the rollback: {result.line()}')
    return not failed
