"""Build or migrate forward a SQLite file's schema where the file is the
only database any code can reach.

`migrate` run in-process on a temporary alias still has `default` (and
`sqlite`, `postgres`) at hand: a third-party data migration writing
through the default manager wrote into the production PostgreSQL while
the rollback built its new file. So the migrate runs in a child process,
`python -m anthias_rollback.schema_build <path>` (same settings module,
this process's sys.path, same cwd), which points EVERY alias at the file
before any connection is opened. Data migrations then write only into
the file; the copy that follows replaces their rows.

The child prints one JSON line on stdout: {"applied": [labels]} or
{"error": "<one line>"}; its traceback goes to stderr, which the parent
sends to the `anthias_rollback.schema` log, never to the user.

A new (missing or empty) file is a copy of a schema template when one
exists for this code's migrations: the child's first build from an
empty file, kept in `<data dir>/schema_templates/` under a digest of
everything that decides what migrate makes (Django, SQLite, the
migration files' bytes, INSTALLED_APPS, the installed distributions,
the settings module). The template never holds anything but what the
child made from nothing; a template that fails its checks is dropped
and rebuilt, never the caller's failure.
"""
import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import pkgutil
import sqlite3
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

from anthias_rollback import fsutil, logs
from anthias_rollback.engines import sqlite_file
from anthias_rollback.exceptions import SchemaMismatchError

MODULE = 'anthias_rollback.schema_build'
TEMPLATE_DIR = 'schema_templates'
# Two: the current code's and the one before it (a release and its
# rollback to the previous one both stay fast).
KEEP_TEMPLATES = 2
# Bumped when the template files or the key's recipe change.
TEMPLATE_FORMAT = 1
# A temp file or an unreferenced template this old is a crashed
# writer's, not one being committed right now.
STALE_SECONDS = 600
# Children started by this process (tests check a template was used).
CHILD_RUNS = 0
# > 0 inside templates_read_only(): use templates, never write them.
_READ_ONLY = 0


@contextlib.contextmanager
def templates_read_only() -> Iterator[None]:
    """Within: new files may still be copies of a sound template, but no
    template is written or dropped (the drill writes only its sandbox
    and drills/, and its data dir is not conf.data_dir()'s)."""
    global _READ_ONLY
    _READ_ONLY += 1
    try:
        yield
    finally:
        _READ_ONLY -= 1


def migrate_file(path: Path, *, timeout: float, wal: bool = False
                 ) -> list[str]:
    """Apply this code's pending migrations to the SQLite file at *path*
    (created 0600 when missing) in an isolated child; return the labels
    applied, in order. *wal*: open it in WAL mode (the standby); else the
    file keeps its own journal mode (a new rollback file: a plain
    rollback journal, one self-contained file).

    A new file (missing, or empty with no side files) becomes a copy of
    this code's schema template when a sound one exists, without a
    child; else the child builds it and the result is kept as the
    template. A file that is not empty always goes through the child.

    Raises SchemaMismatchError, one line naming the file and the child's
    last error, when the migrate fails or outlives *timeout* seconds;
    the file is then to be thrown away by the caller."""
    path = Path(path).absolute()
    template = _template_for(wal) if _is_new(path) else None
    if template is not None:
        applied = template.copy_into(path)
        if applied is not None:
            return applied
    applied = _run_child(path, timeout, wal)
    if template is not None and not _READ_ONLY:
        try:
            template.save(path, applied)
        except Exception as err:  # noqa: BLE001  (a cache: logged only)
            _log().warning('cannot keep a schema template in %s: %s',
                           template.folder, _one_line(err))
    return applied


def ensure_template(*, timeout: float, wal: bool = False) -> Path:
    """The schema template of this code's migrations (built by the
    isolated child from an empty file when there is no sound one): its
    path under <data dir>/schema_templates/. Reads and writes no
    database but a scratch file of its own.

    Raises SchemaMismatchError, one line, when the child fails or the
    template cannot be written."""
    scratch = None
    try:
        template = _Template.current(wal)
        found = template.sound(verify_bytes=True)
        if found is not None:
            return found
        fsutil.ensure_private_dir(template.folder)
        scratch = template.folder / f'.build-{uuid.uuid4().hex}.db'
        applied = _run_child(scratch, timeout, wal)
        return template.save(scratch, applied)
    except SchemaMismatchError:
        raise
    except Exception as err:  # noqa: BLE001  (one line for the caller)
        raise SchemaMismatchError(
            f'cannot keep a schema template: {_one_line(err)}') from None
    finally:
        if scratch is not None:
            with contextlib.suppress(OSError):
                sqlite_file.remove_sqlite_file(scratch)


def _run_child(path: Path, timeout: float, wal: bool) -> list[str]:
    """The migrate of *path* in the isolated child (see the module)."""
    from django.conf import settings

    global CHILD_RUNS
    if not path.exists():
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL,
                             0o600))
        except OSError as err:
            raise SchemaMismatchError(
                f'cannot create {path}: {err.strerror}') from None
    env = dict(os.environ)
    env['DJANGO_SETTINGS_MODULE'] = _settings_module(settings)
    # The parent's import path (a test's or a host's sys.path edits).
    env['PYTHONPATH'] = os.pathsep.join(p for p in sys.path if p)
    command = [sys.executable, '-m', MODULE, str(path)]
    if wal:
        command.append('--wal')
    log = _log()
    CHILD_RUNS += 1
    try:
        done = subprocess.run(command, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SchemaMismatchError(
            f'cannot migrate {path}: still running after {timeout:g}s; '
            'stopped') from None
    result = _result(done.stdout)
    if done.returncode == 0 and 'applied' in result:
        return list(result['applied'])
    if done.stderr.strip():
        log.warning('migrate of %s failed (exit %s):\n%s', path,
                    done.returncode, done.stderr.rstrip())
    error = result.get('error') or _last_line(done.stderr) or (
        f'the child exited with {done.returncode}')
    raise SchemaMismatchError(f'cannot migrate {path}: {error}')


def _settings_module(settings: Any) -> str:
    return (os.environ.get('DJANGO_SETTINGS_MODULE')
            or settings.SETTINGS_MODULE)


def _log() -> Any:
    return logs.get_logger('schema')


def _one_line(err: BaseException) -> str:
    from anthias_rollback.report import first_line, redact

    return redact(first_line(err) or type(err).__name__)


def _is_new(path: Path) -> bool:
    """Missing, or an empty regular file with no side files (a stale
    -wal or -journal would be applied to whatever is put there)."""
    if any(Path(f'{path}{s}').exists() for s in sqlite_file.SIDE_SUFFIXES):
        return False
    try:
        st = path.stat()
    except FileNotFoundError:
        return True
    return path.is_file() and st.st_size == 0


# --- the schema template cache ------------------------------------------

def template_key(wal: bool = False) -> str:
    """A digest of everything that decides what the child's migrate of
    an empty file makes: Django, Python and SQLite versions, the
    settings module's name and the bytes of every module beside it (a
    split `settings/base.py` too), INSTALLED_APPS, every migration
    package's files (names and sha256, read from disk now: the child
    reads them, not this process's imports), the models of apps without
    migrations (their tables come from the models), the installed
    distributions (code a data migration calls) and *wal*.

    Not the models of migrated apps: their tables come from the
    migration files, and this process's model set can depend on its
    profile where the child's cannot (the child is always SQLite:
    wagtail defines its FTS index model only when `default` is SQLite,
    and a key that followed it missed the template on every rollback
    from the postgres profile). The rows post_migrate makes from them
    (content types, permissions) are replaced by the copy."""
    import importlib.metadata

    import django
    from django.conf import settings

    migrations = _migration_files()
    unmigrated = {label for label, _name, _module, files in migrations
                  if not files}
    parts = {
        'format': TEMPLATE_FORMAT,
        'django': django.get_version(),
        'python': list(sys.version_info[:2]),
        'sqlite': sqlite3.sqlite_version,
        'settings': [_settings_module(settings),
                     _settings_files(_settings_module(settings))],
        'installed_apps': [str(a) for a in settings.INSTALLED_APPS],
        'migrations': migrations,
        'models': _model_options(unmigrated),
        'distributions': sorted(
            f'{d.name}=={d.version}'
            for d in importlib.metadata.distributions()),
        'wal': bool(wal),
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _file_sha256(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, 'rb') as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _migration_files() -> list[Any]:
    """Per app, in INSTALLED_APPS order: its migration package and every
    module file in it with its sha256. Found as the MigrationLoader
    finds them but not imported (a migration may choose its operations
    from connection.vendor at import, wagtailsearch 0006 does)."""
    from django.apps import apps
    from django.db.migrations.loader import MigrationLoader

    out: list[Any] = []
    for config in apps.get_app_configs():
        module, _explicit = MigrationLoader.migrations_module(config.label)
        files = []
        locations = None
        if module is not None:
            try:
                spec = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                spec = None
            locations = spec.submodule_search_locations if spec else None
        for info in sorted(pkgutil.iter_modules(list(locations or [])),
                           key=lambda i: i.name):
            found = info.module_finder.find_spec(  # type: ignore[call-arg]  # FileFinder takes one argument
                f'{module}.{info.name}')
            files.append([info.name, info.ispkg,
                          _file_sha256(found.origin if found else None)])
        out.append([config.label, config.name, module, files])
    return out


def _model_options(apps_labels: set[str]) -> list[Any]:
    """The models of the apps *apps_labels* (those without migrations,
    whose tables `migrate` makes from the models): table, options and
    fields' columns."""
    from django.apps import apps

    return sorted(
        [m._meta.label_lower, m._meta.db_table,
         list(m._meta.default_permissions),
         [list(p) for p in m._meta.permissions],
         m._meta.managed, m._meta.proxy,
         [[f.column, f.get_internal_type(), f.null]
          for f in m._meta.local_concrete_fields]]
        for m in apps.get_models(include_auto_created=True)
        if m._meta.app_label in apps_labels)


def _settings_files(name: str | None) -> list[Any]:
    """Name and sha256 of the settings module's file and of every module
    beside it: a settings package (`mysite/settings/dev.py` importing
    `base.py`) is decided by all of them."""
    if not name:
        return []
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return []
    folder = Path(spec.origin).parent
    return [[p.name, _file_sha256(str(p))]
            for p in sorted(folder.glob('*.py'))]


def _template_for(wal: bool) -> '_Template | None':
    """This code's template slot, or None (logged) when the key or the
    data dir cannot be had: the child then runs as without a cache."""
    try:
        return _Template.current(wal)
    except Exception as err:  # noqa: BLE001  (a cache: logged only)
        _log().warning('no schema template: %s', _one_line(err))
        return None


class _Template:
    """The template of one key: `<key>.json` (what the child applied,
    the database file's name and sha256) committing `<key>-<sha>.db`."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.key = key
        self.meta_path = folder / f'{key}.json'

    @classmethod
    def current(cls, wal: bool) -> '_Template':
        from anthias_rollback import conf

        return cls(conf.data_dir() / TEMPLATE_DIR, template_key(wal))

    def _meta(self) -> dict[str, Any] | None:
        """The committed record, None if there is none; ValueError if it
        is not one of ours."""
        try:
            raw = self.meta_path.read_bytes()
        except FileNotFoundError:
            return None
        meta = json.loads(raw)
        if not (isinstance(meta, dict)
                and meta.get('format') == TEMPLATE_FORMAT
                and meta.get('key') == self.key
                and isinstance(meta.get('applied'), list)
                and all(isinstance(a, str) for a in meta['applied'])
                and isinstance(meta.get('sha256'), str)
                and isinstance(meta.get('file'), str)
                and '/' not in meta['file']):
            raise ValueError('its record is not a template record')
        return meta

    def sound(self, verify_bytes: bool) -> Path | None:
        """The template's file when it passes quick_check (and, with
        *verify_bytes*, its recorded sha256); None when there is none or
        it fails (then logged and removed)."""
        try:
            meta = self._meta()
            if meta is None:
                return None
            db = self.folder / meta['file']
            self._check(db, meta, verify_bytes)
        except Exception as err:  # noqa: BLE001  (a cache: logged only)
            self._drop(err)
            return None
        return db

    def _check(self, db: Path, meta: dict[str, Any],
               verify_bytes: bool) -> None:
        # Immutable: the file never changes once renamed into place, and
        # a plain read-only open of a WAL-mode file leaves side files.
        conn = sqlite_file.sqlite_open_readonly(db, 5.0, immutable=True)
        try:
            line = sqlite_file.quick_check_line(conn)
        finally:
            conn.close()
        if line != 'ok':
            raise ValueError(f'quick_check: {line}')
        if verify_bytes and sqlite_file.file_sha256(db)[0] != meta['sha256']:
            raise ValueError('its sha256 differs from its record')

    def _drop(self, err: BaseException) -> None:
        _log().warning('schema template %s ignored%s: %s', self.meta_path,
                       '' if _READ_ONLY else ' and rebuilt', _one_line(err))
        if _READ_ONLY:
            return
        try:
            self.meta_path.unlink(missing_ok=True)
        except OSError:
            pass

    def copy_into(self, path: Path) -> list[str] | None:
        """Make the new file *path* a copy of the template (0600) and
        return the labels it recorded as applied; None when there is no
        sound template (*path* then left empty)."""
        meta = None
        try:
            meta = self._meta()
            if meta is None:
                return None
            db = self.folder / meta['file']
            self._check(db, meta, verify_bytes=False)
            if _copy_bytes(db, path) != meta['sha256']:
                raise ValueError('its sha256 differs from its record')
            # Used now: the newest to keep (pruning drops the oldest).
            if not _READ_ONLY:
                os.utime(self.meta_path)
        except Exception as err:  # noqa: BLE001  (a cache: logged only)
            if isinstance(err, _TargetError):
                _log().warning('cannot copy schema template %s into %s: '
                               '%s', self.meta_path, path, _one_line(err))
            elif meta is not None or not isinstance(err, OSError):
                self._drop(err)
            else:
                _log().warning('schema template %s unreadable: %s',
                               self.meta_path, _one_line(err))
            try:
                if path.exists():
                    os.truncate(path, 0)
            except OSError:
                pass
            return None
        _log().info('schema of %s: a copy of template %s', path, db.name)
        return list(meta['applied'])

    def save(self, built: Path, applied: list[str]) -> Path:
        """Keep the file *built* (the child's work on an empty file,
        nothing written to it since) as this key's template; prune to
        the newest KEEP_TEMPLATES. Raises OSError or ValueError."""
        if any(Path(f'{built}{s}').exists()
               for s in sqlite_file.SIDE_SUFFIXES):
            raise ValueError(f'{built} has side files; not a closed file')
        if not self.folder.parent.is_dir():
            raise ValueError(f'the data dir {self.folder.parent} does not '
                             'exist')
        fsutil.ensure_private_dir(self.folder)
        tmp = self.folder / f'.tmp-{uuid.uuid4().hex}.db'
        try:
            digest = sqlite_file.copy_file_sha256(built, tmp)
            fsutil.fsync_file(tmp)
            db = self.folder / f'{self.key}-{digest[:16]}.db'
            os.replace(tmp, db)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsutil.atomic_write_json(self.meta_path, {
            'format': TEMPLATE_FORMAT, 'key': self.key,
            'file': db.name, 'sha256': digest, 'applied': list(applied),
            'created_at': datetime.now(UTC).isoformat()})
        self.prune()
        return db

    def prune(self) -> None:
        """Keep the newest KEEP_TEMPLATES records and their files; drop
        other files once they are not a writer's work in progress."""
        def mtime(p: Path) -> float:
            try:
                return p.stat().st_mtime
            except FileNotFoundError:
                return 0.0

        records = sorted(self.folder.glob('*.json'), key=mtime,
                         reverse=True)
        for old in records[KEEP_TEMPLATES:]:
            old.unlink(missing_ok=True)
        kept_keys = {r.stem for r in records[:KEEP_TEMPLATES]}
        referenced = set()
        for record in records[:KEEP_TEMPLATES]:
            try:
                referenced.add(json.loads(record.read_bytes())['file'])
            except Exception:  # noqa: BLE001, S112  (dropped when read)
                continue
        now = time.time()
        for item in self.folder.iterdir():
            if item.name in referenced or item.suffix == '.json':
                continue
            fresh = now - mtime(item) < STALE_SECONDS
            current = item.name.split('-', 1)[0] in kept_keys
            if fresh and (item.name.startswith('.') or current):
                continue
            if item.is_file():
                item.unlink(missing_ok=True)


class _TargetError(Exception):
    """Writing the caller's file failed: no fault of the template."""


def _copy_bytes(source: Path, target: Path) -> str:
    """Copy *source* into *target* (missing or empty; left 0600, synced);
    the sha256 of what was read. _TargetError when *target* cannot be
    written."""
    digest = hashlib.sha256()
    with open(source, 'rb', buffering=0) as fh:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o600)
        except OSError as err:
            raise _TargetError(err) from err
        with open(fd, 'wb', buffering=0) as out:
            # A read error is the template's (it is then dropped).
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as err:
                    raise _TargetError(err) from err
            try:
                os.fchmod(out.fileno(), 0o600)
                os.fsync(out.fileno())
            except OSError as err:
                raise _TargetError(err) from err
    return digest.hexdigest()


def _result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith('{'):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ''


# --- the child ----------------------------------------------------------

def _isolate(path: str, wal: bool) -> None:
    """Point every configured alias at the file at *path*, before
    django.setup() and before any connection exists."""
    from django.conf import settings

    from anthias_rollback import profiles

    config = profiles.sqlite_settings(Path(path))
    if not wal:
        config['OPTIONS'] = {
            'timeout': profiles.SQLITE_OPTIONS['timeout']}
    config['TIME_ZONE'] = None
    aliases = list(settings.DATABASES) or []
    if profiles.DEFAULT not in aliases:
        aliases.append(profiles.DEFAULT)
    settings.DATABASES = {alias: copy.deepcopy(config) for alias in aliases}


def _check_isolated(path: str) -> None:
    """Every alias Django knows is the file: refuse before migrating if
    anything (an app's ready()) made another connection meanwhile."""
    from django.db import connections

    for alias in connections:
        name = connections.settings[alias]['NAME']
        if connections.settings[alias]['ENGINE'] != (
                'django.db.backends.sqlite3') or name != path:
            raise RuntimeError(f'alias {alias} is not {path}')
    for wrapper in connections.all(initialized_only=True):
        if wrapper.settings_dict['NAME'] != path:
            raise RuntimeError(f'alias {wrapper.alias} was opened before '
                               'the isolation')


def _migrate() -> list[str]:
    from django.core.management import call_command
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    from anthias_rollback.profiles import DEFAULT

    executor = MigrationExecutor(connections[DEFAULT])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    applied = [f'{m.app_label}.{m.name}' for m, _ in plan]
    call_command('migrate', database=DEFAULT, interactive=False,
                 verbosity=0, skip_checks=True, stdout=StringIO(),
                 stderr=StringIO())
    connections.close_all()
    return applied


def main(argv: list[str]) -> int:
    path, wal = argv[0], '--wal' in argv[1:]
    try:
        _isolate(path, wal)
        import django

        django.setup()
        _check_isolated(path)
        applied = _migrate()
    except BaseException as err:  # noqa: BLE001  (reported, one line)
        traceback.print_exc()
        from anthias_rollback.report import first_line, redact

        text = redact(first_line(err) or type(err).__name__)
        print(json.dumps({'error': text}), flush=True)
        return 1
    print(json.dumps({'applied': applied}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
