"""The whole runbook on a real CMS (tests/hosts/cms: wagtail with its
usual apps, django-taggit, django-treebeard, and tests/models_corners),
adopted exactly as the docs' adoption blocks say, in real processes.

Each command runs as `python -m tests.hosts.cms.manage ...` with the
host's settings, a data dir and SQLite file of this test, and a fresh
PostgreSQL database on the run's server. Every comparison of the two
databases here is this file's own (tests/helpers/raw_tables: sqlite3 and
psycopg2, values normalised by column type), never validate_migration;
around each command that was not asked to write to a database, that
database's fingerprint (file checksum, rows, content, sequences) must
not change.

CMS_HOST_KEEP_GOING=1 runs every step even after one failed (working
around it as an operator would) and fails at the end listing them all.
"""
import json
import os
import re
import subprocess
import sys
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import ROOT, postgres_stopped
from tests.helpers import pgserver, raw_tables

MANAGE = [sys.executable, '-m', 'tests.hosts.cms.manage']
SETTINGS = ROOT / 'tests' / 'hosts' / 'cms' / 'settings.py'
URLS = ROOT / 'tests' / 'hosts' / 'cms' / 'urls.py'
KEEP_GOING = os.environ.get('CMS_HOST_KEEP_GOING') == '1'
# wagtail's search index: engine-specific (an FTS5 table and text
# columns on SQLite, tsvector columns on PostgreSQL), rebuilt, never
# copied or compared.
SEARCH_TABLES = {'wagtailsearch_indexentry', 'wagtailsearch_indexentry_fts'}
# Rows the two engines' migrate runs record at their own times.
BY_KEY = {'django_migrations': ['app', 'name']}


def adoption_block(marker: str) -> str:
    """The python block after `<!-- adoption: MARKER -->` in the docs."""
    for doc in (ROOT / 'docs' / 'adopting.md', ROOT / 'README.md'):
        if not doc.exists():
            continue
        found = re.search(rf'<!-- adoption: {re.escape(marker)} -->\s*'
                          r'```python\n(.*?)```', doc.read_text(),
                          re.DOTALL)
        if found:
            return found.group(1)
    pytest.fail(f'no adoption block {marker!r} in docs/ or README.md')


@dataclass
class Device:
    data: Path
    pg_url: str
    failures: list[str] = field(default_factory=list)
    release: int = 1

    @property
    def sqlite(self) -> Path:
        return self.data / 'anthias.db'

    @property
    def standby(self) -> Path:
        return self.data / 'standby' / 'standby.db'

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(('ANTHIAS_', 'DJANGO_', 'POSTGRES_'))}
        env.update({
            'DJANGO_SETTINGS_MODULE': 'tests.hosts.cms.settings',
            'ANTHIAS_DATA_DIR': str(self.data),
            'ANTHIAS_POSTGRES_URL': self.pg_url,
            'ANTHIAS_PG_DUMP': str(pgserver.embedded_bin_dir() / 'pg_dump'),
            'PYTHONPATH': str(ROOT),
        })
        if self.release > 1:
            env['CMS_HOST_RELEASE'] = str(self.release)
        # Measuring: settings to get past a known failure (e.g.
        # ANTHIAS_ROLLBACK_EXCLUDE), as JSON.
        env.update(json.loads(os.environ.get('CMS_HOST_EXTRA_ENV', '{}')))
        env.update(extra)
        return env

    def run(self, *args: str, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*MANAGE, *args], env=env or self.env(),
                              cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def step(self, name: str, *args: str, expect: tuple = (0,),
             says: str | None = None, workaround: tuple | None = None,
             workaround_env: dict | None = None, env: dict | None = None
             ) -> subprocess.CompletedProcess:
        """Run a runbook step; its exit code must be in *expect* and its
        output contain *says*. With CMS_HOST_KEEP_GOING the failure is
        recorded and *workaround* (another manage command) run instead."""
        done = self.run(*args, env=env)
        output = done.stdout + done.stderr
        problem = None
        if done.returncode not in expect:
            problem = f'exit {done.returncode}, expected {expect}'
        elif says is not None and says not in output:
            problem = f'output lacks {says!r}'
        if problem is None:
            return done
        self.fail(name, f'{" ".join(args)}: {problem}: '
                        f'{last_lines(output)}')
        if workaround:
            fixed = self.run(*workaround, env=workaround_env or env)
            if fixed.returncode != 0:
                self.fail(f'{name} (workaround)',
                          f'{" ".join(workaround)}: exit '
                          f'{fixed.returncode}: '
                          f'{last_lines(fixed.stdout + fixed.stderr)}')
            return fixed
        return done

    def check(self, name: str, ok: bool, detail: str) -> None:
        if not ok:
            self.fail(name, detail)

    def fail(self, name: str, detail: str) -> None:
        message = f'{name}: {detail}'
        if not KEEP_GOING:
            pytest.fail(message, pytrace=False)
        self.failures.append(message)
        sys.stderr.write(f'\n[cms step FAILED] {message}\n')


def last_lines(text: str, n: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return ' | '.join(lines[-n:])


@pytest.fixture
def cms_database():
    """A fresh database on the run's PostgreSQL server: its URL."""
    base = os.environ['ANTHIAS_TEST_POSTGRES_URL']
    name = f'cms_{uuid.uuid4().hex[:12]}'
    admin(base, f'CREATE DATABASE {name}')
    parts = urllib.parse.urlsplit(base)
    yield parts._replace(path=f'/{name}').geturl()
    # A new connection: the test stopped and restarted the server.
    admin(base, f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')


def admin(url: str, sql: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


def assert_same(device: Device, name: str, sqlite_path: Path) -> None:
    """*sqlite_path* holds exactly PostgreSQL's rows, table by table
    (the search index left out); report what was compared."""
    diff = raw_tables.compare_all(sqlite_path, device.pg_url,
                                  skip=SEARCH_TABLES, by_key=BY_KEY)
    rows = sum(diff.compared.values())
    sys.stderr.write(f'\n[cms compare] {name}: {len(diff.compared)} '
                     f'tables, {rows} rows equal; only SQLite '
                     f'{diff.only_sqlite}; only PostgreSQL '
                     f'{diff.only_postgres}; columns differ '
                     f'{diff.column_sets_differ}\n')
    device.check(f'{name}: every table equal', diff.equal,
                 json.dumps(diff.differing, default=str)[:3000])
    # The standby's own position table is the tool's, not the app's.
    unexpected = {t for t in (set(diff.only_sqlite) | set(diff.only_postgres)
                              | set(diff.column_sets_differ))
                  if not t.startswith('anthias_rb_')} - SEARCH_TABLES
    device.check(f'{name}: same tables on both', not unexpected,
                 f'tables on one side only or with other columns: '
                 f'{sorted(unexpected)}')
    device.check(f'{name}: the corner tables were compared',
                 {'MixedCase', 'models_corners_composite',
                  'models_corners_pizzeria', 'wagtailcore_page',
                  'cmssite_eventpage'} <= set(diff.compared),
                 f'compared only {sorted(diff.compared)}')


def pg_unchanged(device: Device, name: str, before: dict) -> None:
    after = raw_tables.pg_fingerprint(device.pg_url)
    changed = sorted(t for t in set(before['tables']) | set(after['tables'])
                     if before['tables'].get(t) != after['tables'].get(t))
    moved = sorted(s for s in set(before['sequences'])
                   | set(after['sequences'])
                   if before['sequences'].get(s)
                   != after['sequences'].get(s))
    device.check(f'{name}: PostgreSQL unchanged', not changed and not moved,
                 f'tables changed {changed}, sequences moved {moved}')


def sqlite_unchanged(device: Device, name: str, path: Path,
                     before: dict) -> None:
    after = raw_tables.sqlite_fingerprint(path)
    changed = sorted(t for t in set(before['rows']) | set(after['rows'])
                     if before['rows'].get(t) != after['rows'].get(t))
    device.check(f'{name}: {path.name} unchanged',
                 after == before,
                 f'content sha256 {before["sha256"][:12]} -> '
                 f'{after["sha256"][:12]}, rows changed {changed}, '
                 f'sequences {before["sequences"]} -> '
                 f'{after["sequences"]}')


def filled(device: Device, name: str, *args: str) -> dict:
    done = device.step(name, 'cms_fill', *args)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if done.returncode == 0 and lines else {}


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_cms_runbook(tmp_path, cms_database):
    """check, migrate both aliases, backup, migrate_to_postgres,
    validate, switch, editors' writes on PostgreSQL, a release with a
    data migration, replicate_changes, the standby rollback with
    PostgreSQL stopped, a new window, the full-copy rollback: each
    finished by this file's own table-by-table comparison."""
    assert adoption_block('settings.py').strip() in SETTINGS.read_text()
    assert adoption_block('urls.py').strip() in URLS.read_text()
    data = tmp_path / 'data'
    data.mkdir()
    device = Device(data, cms_database)
    pg_profile = device.env(ANTHIAS_DB_PROFILE='postgres')

    device.step('check', 'check')
    device.step('migrate sqlite', 'migrate', '--database', 'sqlite',
                '--noinput', workaround=('migrate', '--noinput'))
    device.step('show profile', 'switch_database', '--show',
                says='sqlite')
    before = raw_tables.sqlite_fingerprint(device.sqlite)
    device.step('migrate postgres', 'migrate', '--database', 'postgres',
                '--noinput', workaround=(
                    'migrate', '--database', 'default', '--noinput'),
                workaround_env=pg_profile)
    sqlite_unchanged(device, 'migrate --database postgres', device.sqlite,
                     before)
    filled(device, 'fill on SQLite', '--phase', 'before')
    device.step('backup', 'backup_database', '--retention-days', '14')
    # The docs' step 5 rehearses the whole loop in a sandbox, on the
    # configured server (a scratch database): live data untouched.
    before = raw_tables.sqlite_fingerprint(device.sqlite)
    device.step('drill', 'rollback_drill', '--no-embedded-postgres',
                says='PASS')
    sqlite_unchanged(device, 'rollback_drill', device.sqlite, before)
    before = raw_tables.sqlite_fingerprint(device.sqlite)
    device.step('migrate_to_postgres', 'migrate_to_postgres')
    sqlite_unchanged(device, 'migrate_to_postgres', device.sqlite, before)
    device.step('validate_migration', 'validate_migration',
                '--no-performance-test', says='PASS')
    assert_same(device, 'after migrate_to_postgres', device.sqlite)
    device.step('switch to postgres', 'switch_database', '--to',
                'postgres', workaround=('switch_database', '--to',
                                        'postgres', '--force'))
    device.step('show profile', 'switch_database', '--show',
                says='postgres')
    filled(device, 'fill on PostgreSQL', '--phase', 'during')

    # Release 2 ships a data migration while the device is on
    # PostgreSQL: migrate postgres (Anthias's start), then SQLite.
    device.release = 2
    before = raw_tables.sqlite_fingerprint(device.sqlite)
    device.step('release 2: migrate postgres', 'migrate', '--database',
                'postgres', '--noinput')
    sqlite_unchanged(device, 'release 2: migrate --database postgres',
                     device.sqlite, before)
    before = raw_tables.pg_fingerprint(device.pg_url)
    device.step('release 2: migrate sqlite', 'migrate', '--database',
                'sqlite', '--noinput')
    pg_unchanged(device, 'release 2: migrate --database sqlite', before)

    before = raw_tables.pg_fingerprint(device.pg_url)
    live = raw_tables.sqlite_fingerprint(device.sqlite)
    device.step('replicate_changes', 'replicate_changes', '--once')
    device.step('replicate_changes again', 'replicate_changes', '--once')
    pg_unchanged(device, 'replicate_changes', before)
    sqlite_unchanged(device, 'replicate_changes', device.sqlite, live)
    if device.standby.exists():
        assert_same(device, 'standby', device.standby)
    device.step('readiness', 'rollback_readiness', expect=(0,))
    device.step('show with standby', 'switch_database', '--show')

    # PostgreSQL down: the standby.
    with postgres_stopped():
        device.step('rollback from the standby', 'rollback_migration',
                    '--emergency', expect=(4,), says='standby')
    device.step('show profile', 'switch_database', '--show',
                says='sqlite')
    device.step('export_unapplied_writes', 'export_unapplied_writes')
    assert_same(device, 'after the standby rollback', device.sqlite)

    # A new window (the runbook: the copy again, then the switch), more
    # edits, then the full copy from PostgreSQL.
    device.step('migrate again', 'migrate_to_postgres', '--replace')
    device.step('switch to postgres again', 'switch_database', '--to',
                'postgres')
    filled(device, 'fill on PostgreSQL again', '--phase', 'again')
    device.step('replicate_changes, second window', 'replicate_changes',
                '--once')
    before = raw_tables.pg_fingerprint(device.pg_url)
    device.step('full rollback', 'rollback_migration', '--emergency',
                '--full', says='data loss: none')
    pg_unchanged(device, 'the full rollback', before)
    device.step('show profile', 'switch_database', '--show',
                says='sqlite')
    assert_same(device, 'after the full rollback', device.sqlite)
    device.step('health on SQLite', 'rollback_readiness', expect=(0, 3))
    if device.failures:
        report = os.environ.get('CMS_HOST_FAILURES')
        if report:
            Path(report).write_text('\n'.join(device.failures) + '\n')
    assert not device.failures, (
        f'{len(device.failures)} step(s) failed:\n'
        + '\n'.join(device.failures))
