"""Errors raised by the core modules; commands turn them into CommandError.

Every message names the object it is about (alias and host:port, model
label, primary key, field, path) and never a password or a full DSN.
"""


class RollbackError(Exception):
    """Base class of every error this app raises on purpose."""


class ConfigError(RollbackError):
    """A setting or environment variable is missing or malformed."""


class DatabaseUnavailableError(RollbackError):
    """A database alias does not answer (down, wrong password, timeout)."""


class DatabaseDownError(DatabaseUnavailableError):
    """The server is down or not serving (refused, timed out, shutting
    down): the one case where a rollback may fall back to a backup."""


class SchemaMismatchError(RollbackError):
    """Migrations or tables differ from what the operation needs."""


class LockHeldError(RollbackError):
    """Another operation holds the operation lock."""


class StateFileError(RollbackError):
    """The profile state file cannot be read or written."""


class BackupError(RollbackError):
    """A backup could not be made, read or listed."""


class BackupInvalidError(BackupError):
    """A backup was checked and is not valid (checksum, integrity...)."""


class TransferError(RollbackError):
    """Copying rows between aliases failed; the target is unchanged."""


class PreflightError(TransferError):
    """Source rows the target would reject, all listed at once."""
    problems: list      # set where raised (transfer.copy.raise_problems)
    problem_count: int


class CompareError(RollbackError):
    """Two databases could not be compared."""


class DeadlineError(RollbackError):
    """An operation would run past its deadline and stopped cleanly."""


class SwapError(RollbackError):
    """The live SQLite file could not be replaced; the old one stays."""


class MonitorInputError(RollbackError):
    """A monitor option, threshold or target (base URL, URL) is unusable."""


class BaselineError(RollbackError):
    """A monitor baseline could not be recorded or read."""


class DrillError(RollbackError):
    """A rollback drill could not run (no PostgreSQL, scratch database
    name clash, unusable sandbox); nothing live was touched."""


class SwitchRefusedError(RollbackError):
    """switch_database refused: the target does not hold the data."""


class ReplicationError(RollbackError):
    """The standby could not be brought up to date (exit 1)."""


class ReplicationRefusedError(ReplicationError):
    """Nothing to replicate: no window, or the profile is not postgres."""
