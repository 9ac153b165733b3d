"""Tables on one engine only (left out, named once, rebuilt) and
exclusions whose rows survive a copy.

The CMS host (wagtail: an FTS5 search table on SQLite, tsvector columns
on PostgreSQL) runs in real processes as in tests/test_host_cms.py; the
exclusions run on the kitchen-sink models, SQLite -> PostgreSQL.
"""
import json
import os
import sqlite3
import subprocess
import sys
import urllib.parse
import uuid
from io import StringIO

import psycopg2
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from anthias_rollback import (
    conf,
    engine_tables,
    models_graph,
    profiles,
    rollback,
    transfer,
)
from anthias_rollback.exceptions import ConfigError, TransferError
from tests.conftest import ROOT
from tests.helpers.rollback import seed_device
from tests.helpers.transfer import make_kitchen_sink, rows_by_pk
from tests.kitchensink.models import Item, Membership, Person
from tests.test_host_cms import Device

BOTH = ['sqlite', 'postgres']
SEARCH_TABLES = 'wagtailsearch_indexentry, wagtailsearch_indexentry_fts'
LEFT_OUT = ('left out, exist on one engine only / differ by engine: '
            + SEARCH_TABLES)


# ------------------------------------------------------------ the CMS host

@pytest.fixture
def cms_database():
    """A fresh database on the run's PostgreSQL server: its URL."""
    base = pgserver_url()
    name = f'cms_et_{uuid.uuid4().hex[:12]}'
    _admin(base, f'CREATE DATABASE {name}')
    parts = urllib.parse.urlsplit(base)
    yield parts._replace(path=f'/{name}').geturl()
    _admin(base, f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')


def pgserver_url() -> str:
    return os.environ['ANTHIAS_TEST_POSTGRES_URL']


def _admin(url: str, sql: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


def _pg_rows(url: str, table: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'SELECT count(*) FROM {table}')
            return cursor.fetchone()[0]
    finally:
        conn.close()


class Host(Device):
    """The CMS host's environment as the runbook test builds it
    (Device.env); `run` asserts the exit code."""

    def run(self, *args: str, expect: int = 0, **extra: str
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, '-m', 'tests.hosts.cms.manage', *args],
            env=self.env(**extra), cwd=ROOT, capture_output=True,
            text=True, timeout=600, check=False)
        assert done.returncode == expect, (
            f'{" ".join(args)}: exit {done.returncode}\n{done.stdout}\n'
            f'{done.stderr}'[-4000:])
        return done


@pytest.fixture
def cms_host(tmp_path, cms_database):
    """Both aliases migrated (each by a process on its own profile) and
    the site filled on SQLite: pages indexed into SQLite's FTS table."""
    data = tmp_path / 'data'
    data.mkdir()
    host = Host(data, cms_database)
    host.run('migrate', '--noinput', ANTHIAS_DB_PROFILE='sqlite')
    host.run('migrate', '--noinput', ANTHIAS_DB_PROFILE='postgres')
    host.run('cms_fill', '--phase', 'before', ANTHIAS_DB_PROFILE='sqlite')
    return host


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_cms_search_index_left_out_named_once_and_rebuilt(cms_host):
    """migrate_to_postgres and validate_migration succeed on wagtail's
    engine-specific search tables: named once as left out, not copied,
    then rebuilt on PostgreSQL by wagtail_update_index (reported)."""
    assert _pg_rows(cms_host.pg_url, 'wagtailsearch_indexentry') == 0
    # --replace: PostgreSQL's own migrate wrote wagtail's initial rows.
    done = cms_host.run('migrate_to_postgres', '--replace')
    output = done.stdout + done.stderr
    assert output.count(LEFT_OUT) == 1, output
    assert 'rebuilt by: wagtail_update_index' in output
    assert 'rebuild: wagtail_update_index: ok' in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith('copied ')
    # Not copied (the copy would have failed), rebuilt by wagtail itself.
    assert _pg_rows(cms_host.pg_url, 'wagtailsearch_indexentry') > 0

    done = cms_host.run('validate_migration', '--no-performance-test')
    output = done.stdout + done.stderr
    assert output.count(LEFT_OUT) == 1, output
    assert done.stdout.strip().splitlines()[-1].startswith('PASS')
    assert 'wagtailsearch' not in done.stdout

    done = cms_host.run('validate_migration', '--no-performance-test',
                        '--json')
    document = json.loads(done.stdout)
    assert document['left_out']['tables'] == SEARCH_TABLES.split(', ')
    assert document['left_out']['rebuilt_by'] == ['wagtail_update_index']
    assert not any('wagtailsearch' in m['label'].lower()
                   for m in document['models'])
    # Recorded for the runs that cannot read PostgreSQL's schema.
    record = cms_host.data / engine_tables.RECORD_NAME
    assert json.loads(record.read_text())['tables'] == \
        SEARCH_TABLES.split(', ')
    assert record.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------- registry, record

@pytest.mark.django_db(databases=['sqlite'])
def test_recorded_list_is_used_when_postgres_does_not_answer(tmp_path):
    """PostgreSQL down (a standby or backup rollback): the list recorded
    when it last answered leaves the same tables out of every plan."""
    engine_tables.record_tables(tmp_path, ('kitchensink_membership',))
    try:
        with profiles.postgres_override_alias({'port': '1'}) as down:
            engine_tables.register_aliases('sqlite', down, tmp_path)
            labels = models_graph.plan_models().labels
            found = engine_tables.current()
    finally:
        engine_tables.unregister()
    assert 'kitchensink.Membership' not in labels
    assert 'kitchensink.Person' in labels
    assert found.found == 'recorded'
    assert 'as recorded' in found.line()
    # Nothing registered: nothing left out.
    assert 'kitchensink.Membership' in models_graph.plan_models().labels


@pytest.mark.django_db(databases=BOTH)
def test_same_schemas_leave_nothing_out(tmp_path):
    call_command('migrate', database='postgres', interactive=False,
                 verbosity=0)
    assert engine_tables.find_engine_tables('sqlite', 'postgres') == ()


@pytest.mark.parametrize('value', ['update_index', [1], ['update_index', '']
                                   , ["bad 'quote"]])
def test_rebuild_commands_setting_is_a_list_of_commands(settings, value):
    settings.ANTHIAS_ROLLBACK_REBUILD_COMMANDS = value
    with pytest.raises(ConfigError) as excinfo:
        conf.validate_settings()
    message = str(excinfo.value)
    assert 'ANTHIAS_ROLLBACK_REBUILD_COMMANDS' in message
    assert '\n' not in message


def test_rebuild_command_result_ok_and_failed(settings):
    settings.ANTHIAS_ROLLBACK_REBUILD_COMMANDS = [
        'check', 'migrate no_such_app_here --noinput']
    ok, failed = engine_tables.run_rebuild_commands(profiles.SQLITE)
    assert (ok.command, ok.ok, ok.detail) == ('check', True, 'ok')
    assert not failed.ok
    assert "No installed app with label 'no_such_app_here'" in \
        failed.detail
    assert failed.line().startswith(
        'migrate no_such_app_here --noinput: failed (exit 1: ')


# -------------------------------------------------------------- exclusions

def _copy_all_then_exclude(settings) -> None:
    make_kitchen_sink('sqlite')
    assert Membership.objects.using('sqlite').exists()
    transfer.transfer_data('sqlite', 'postgres')
    settings.ANTHIAS_ROLLBACK_EXCLUDE = 'kitchensink.Membership'


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_excluded_model_pointing_into_a_copied_one_keeps_its_rows(
        settings):
    """An excluded table with a foreign key into copied tables: the copy
    (--replace) empties those without TRUNCATE and the excluded rows stay,
    as they were on the target."""
    _copy_all_then_exclude(settings)
    Membership.objects.using('postgres').update(role='kept on target')
    kept = rows_by_pk('postgres', Membership)
    Item.objects.using('sqlite').update(title='changed on SQLite')

    result = transfer.transfer_data('sqlite', 'postgres', replace=True)

    assert 'kitchensink_membership' not in result.truncated
    assert rows_by_pk('postgres', Membership) == kept
    assert set(Item.objects.using('postgres').values_list(
        'title', flat=True)) == {'changed on SQLite'}


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_excluded_rows_that_would_dangle_refuse_the_copy(settings):
    """A kept row pointing at a row the copy would not load: refused,
    naming the table, the column and the count; the target unchanged."""
    _copy_all_then_exclude(settings)
    gone = Membership.objects.using('postgres').values_list(
        'item_id', flat=True).first()
    pointing = Membership.objects.using('postgres').filter(
        item_id=gone).count()
    Item.objects.using('sqlite').filter(pk=gone).delete()
    Person.objects.using('sqlite').update(name='changed on SQLite')
    before = {m: rows_by_pk('postgres', m)
              for m in (Item, Person, Membership)}

    with pytest.raises(TransferError) as excinfo:
        transfer.transfer_data('sqlite', 'postgres', replace=True)

    message = str(excinfo.value)
    assert 'kitchensink_membership.item_id' in message
    assert f'{pointing} of its row(s)' in message
    assert 'kitchensink_item' in message
    assert 'nothing was changed' in message
    assert {m: rows_by_pk('postgres', m) for m in before} == before


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_migrate_to_postgres_replace_keeps_excluded_rows(settings):
    """The command: --replace with an excluded table pointing into the
    copy exits 0 (it refused with a traceback-free TRUNCATE error)."""
    _copy_all_then_exclude(settings)
    kept = rows_by_pk('postgres', Membership)
    try:
        call_command('migrate_to_postgres', '--replace', verbosity=0)
    except CommandError as err:  # pragma: no cover - the failure shown
        pytest.fail(f'exit {err.returncode}: {err}')
    assert rows_by_pk('postgres', Membership) == kept


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_cms_rollback_rebuilds_the_search_index_on_the_new_file(cms_host):
    """After a full rollback from PostgreSQL the search index (left out
    of the copy) is rebuilt into the new live SQLite file by the rebuild
    command, whose result is in the rollback's report."""
    cms_host.run('migrate_to_postgres', '--replace')
    cms_host.run('switch_database', '--to', 'postgres')
    live = cms_host.data / 'anthias.db'
    done = cms_host.run('rollback_migration', '--emergency', '--full',
                        '--json')
    document = json.loads(done.stdout)
    phases = {p['name']: p for p in document['phases']}
    assert phases['rebuild']['status'] == 'ok', phases['rebuild']
    assert phases['rebuild']['detail'] == 'wagtail_update_index: ok'
    # On the postgres profile wagtail defines no FTS model: one table.
    assert document['left_out']['tables'] == ['wagtailsearch_indexentry']
    with sqlite3.connect(live) as conn:
        indexed = conn.execute('SELECT count(*) FROM '
                               'wagtailsearch_indexentry').fetchone()[0]
    assert indexed > 0


@pytest.mark.django_db(databases=['default', 'sqlite', 'postgres'],
                       transaction=True)
def test_failed_rebuild_after_a_rollback_is_a_warning_and_exit_4(
        data_dir, settings):
    """The rollback stands (the new file is live); the failed rebuild
    command is a warning with its last line, exit 4, no traceback."""
    seed_device(settings)
    settings.ANTHIAS_ROLLBACK_REBUILD_COMMANDS = [
        'migrate no_such_app_here --noinput']
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command('rollback_migration', '--emergency', stdout=out,
                     stderr=err)
    assert excinfo.value.returncode == 4, str(excinfo.value)
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'
    report = json.loads(rollback.latest_report(
        data_dir / 'reports').read_text())
    rebuild = next(p for p in report['phases'] if p['name'] == 'rebuild')
    assert rebuild['status'] == 'failed'
    assert rebuild['detail'].startswith(
        'migrate no_such_app_here --noinput: failed (exit 1: ')
    assert "No installed app with label 'no_such_app_here'" in \
        rebuild['detail']
    assert any(w.startswith('rebuild after the rollback: ')
               for w in report['warnings'])
    assert 'Traceback' not in out.getvalue() + err.getvalue()


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_failed_rebuild_after_migrate_to_postgres_is_exit_4(settings):
    """The copy is committed; the failed rebuild command is reported
    with its last line (stdout and --json) and the exit code is 4."""
    make_kitchen_sink('sqlite')
    settings.ANTHIAS_ROLLBACK_REBUILD_COMMANDS = [
        'check', 'migrate no_such_app_here --noinput']
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command('migrate_to_postgres', stdout=out, stderr=err)
    assert excinfo.value.returncode == 4, str(excinfo.value)
    assert 'copied, but a rebuild command failed: migrate ' \
        'no_such_app_here --noinput: failed (exit 1: ' in str(excinfo.value)
    assert 'rebuild: check: ok' in out.getvalue()
    assert Item.objects.using('postgres').count() == \
        Item.objects.using('sqlite').count() > 0
    assert 'Traceback' not in out.getvalue() + err.getvalue()
