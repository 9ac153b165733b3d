"""Health of the active database, for /health and post-rollback checks."""
from dataclasses import asdict, dataclass
from typing import Any

from anthias_rollback import conf, profiles, schema
from anthias_rollback.exceptions import RollbackError


@dataclass(frozen=True)
class HealthReport:
    status: str                  # 'ok' | 'degraded'
    profile: str
    profile_source: str
    database_ok: bool
    unapplied_migrations: int | None
    problems: tuple[str, ...]
    # Not a reason for 503 (the device serves), but for a person to see.
    warnings: tuple[str, ...] = ()
    # The replicator's record (standby_health): None when none was kept.
    standby: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data['problems'] = list(self.problems)
        data['warnings'] = list(self.warnings)
        return data

    def public_dict(self) -> dict[str, Any]:
        """What an unauthenticated remote caller may see: problems and
        the profile source carry file paths and PostgreSQL's host:port."""
        return {'status': self.status, 'profile': self.profile}


def check_health(alias: str = profiles.DEFAULT) -> HealthReport:
    """Does *alias* answer, and is its schema fully migrated? Read-only.

    Never raises for a database problem: it is reported as `degraded`.
    Problem strings name the alias's engine and location, never secrets.
    """
    problems: list[str] = []
    try:
        active = conf.current_profile()
        name, source = active.name, active.source
    except RollbackError as err:
        name, source = 'unknown', 'unknown'
        problems.append(str(err))
    # Settings import fell back to sqlite for a bad profile setting.
    fallback = profiles.profile_problem()
    if fallback and fallback not in problems:
        problems.append(fallback)
    database_ok = False
    pending: int | None = None
    try:
        schema.check_connection(alias)
        database_ok = True
        pending = len(schema.pending_migrations(alias))
        if pending:
            problems.append(f'{pending} unapplied migrations')
    except RollbackError as err:
        problems.append(str(err))
    status = 'ok' if database_ok and not problems else 'degraded'
    standby, standby_warnings = standby_health(name)
    return HealthReport(status, name, source, database_ok, pending,
                        tuple(problems),
                        tuple(fence_warnings() + standby_warnings), standby)


def standby_health(profile: str
                   ) -> tuple[dict[str, Any] | None, list[str]]:
    """The `standby` block of /health (what replicate_changes recorded
    of its rounds) and its warning when the last rounds failed: the
    device serves, but a rollback with PostgreSQL down would restore a
    standby that stopped following. (None, []) when no round was ever
    recorded, or *profile* is not postgres (no standby is kept then).
    Reads one small file in the data dir."""
    from anthias_rollback.window import standby as window_standby

    if profile != profiles.POSTGRES:
        return None, []
    try:
        health = window_standby.replicator_health(conf.data_dir())
    except RollbackError:   # no usable data dir setting: said elsewhere
        return None, []
    if not health.recorded:
        return None, []
    block = {'failing': health.failing,
             'consecutive_failures': health.consecutive_failures,
             'last_error': health.last_error,
             'postgres_down': health.postgres_down,
             'first_failure_at': health.first_failure_at,
             'last_success_at': health.last_success_at,
             'last_position_at': health.last_position_at,
             'problem': health.problem}
    failing = health.failing or health.problem is not None
    return block, [health.describe()] if failing else []


def fence_warnings() -> list[str]:
    """The write fence a standby or backup restore could not raise (the
    server was down): stale processes may write there until one of our
    processes reaches it."""
    from anthias_rollback.rollback import state

    try:
        pending = state.fence_pending(conf.data_dir())
    except RollbackError:
        return []
    return [FENCE_MISSING] if pending else []


FENCE_MISSING = ('the write fence on PostgreSQL is not up: the rollback '
                 'restored a standby or backup while PostgreSQL was down; '
                 'the first command, replicator or monitor that reaches it '
                 'raises it')


def client_host() -> str:
    """A Host header the host's ALLOWED_HOSTS accepts, for in-process
    requests through Django's test client (which sends `testserver`, a
    name production settings reject)."""
    from django.conf import settings

    for host in settings.ALLOWED_HOSTS:
        if host not in ('*', '') and not host.startswith('.'):
            return host
    return 'localhost'
