import json
import os
import stat
from io import StringIO

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.management import CommandError, call_command
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback import locking
from tests.conftest import run_manage
from tests.helpers.transfer import (
    assert_same_rows,
    make_assets,
    make_kitchen_sink,
)
from tests.kitchensink.models import Category, Item

BOTH = ['sqlite', 'postgres']
UNREACHABLE = {'ENGINE': 'django.db.backends.postgresql',
               'NAME': 'anthias', 'USER': 'anthias',
               'PASSWORD': 'hunter2', 'HOST': '127.0.0.1', 'PORT': 1,
               'OPTIONS': {'connect_timeout': 2}}


def migrate(*args):
    out, err = StringIO(), StringIO()
    call_command('migrate_to_postgres', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def refused(*args):
    with pytest.raises(CommandError) as excinfo:
        migrate(*args)
    return excinfo.value


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_copies_everything_and_writes_json(data_dir, tmp_path):
    make_kitchen_sink('sqlite')
    make_assets(30)
    report = tmp_path / 'reports' / 'migrate.json'
    out, _ = migrate('--batch-size', '9', '--report', str(report))
    last = out.strip().splitlines()[-1]
    assert last.startswith('copied ') and 'rows/s' in last
    assert 'anthias_app.Asset: 30 rows' in out
    assert_same_rows('sqlite', 'postgres')
    data = json.loads(report.read_text())
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o600
    models = {m['label']: m['rows'] for m in data['transfer']['models']}
    assert models['anthias_app.Asset'] == 30
    assert data['transfer']['rows_per_second']['anthias_app.Asset'] >= 0


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_dry_run_changes_nothing(data_dir):
    make_assets(12)
    before = sorted(ContentType.objects.using('postgres').values_list(
        'id', 'model'))
    out, _ = migrate('--dry-run')
    assert 'dry run (copy)' in out
    assert 'anthias_app.Asset (assets): 12 rows' in out
    assert 'would truncate' in out   # the content types migrate made
    assert out.strip().splitlines()[-1].startswith('plan: ')
    assert Asset.objects.using('postgres').count() == 0
    assert sorted(ContentType.objects.using('postgres').values_list(
        'id', 'model')) == before
    assert not locking.lock_path(data_dir).exists()


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_dry_run_lists_rejected_values(data_dir):
    make_assets(3)
    with connections['sqlite'].cursor() as cursor:
        cursor.execute("UPDATE assets SET uri = 'a' || char(0)")
    err = refused('--dry-run')
    assert err.returncode == 1
    assert '3 source value(s)' in str(err)
    assert Asset.objects.using('postgres').count() == 0


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_non_empty_target_refused_then_replace_and_repair(data_dir):
    make_kitchen_sink('sqlite')
    Category.objects.using('postgres').create(name='stale')
    err = refused()
    assert err.returncode == 1
    assert 'already holds data: kitchensink.Category (1 rows)' in str(err)
    assert '--replace' in str(err)
    out, _ = migrate('--replace')
    assert_same_rows('sqlite', 'postgres')
    Item.objects.using('postgres').filter(
        id=Item.objects.using('postgres').order_by('id')[0].id).delete()
    Category.objects.using('postgres').create(name='extra')
    out, _ = migrate('--repair')
    assert 'kitchensink.Item: 1 inserted, 0 updated, 0 deleted' in out
    assert 'kitchensink.Category: 0 inserted, 0 updated, 1 deleted' in out
    assert out.strip().splitlines()[-1].startswith('repaired ')
    assert_same_rows('sqlite', 'postgres')


def test_replace_and_repair_are_exclusive():
    with pytest.raises(CommandError, match='not allowed with argument'):
        migrate('--replace', '--repair')


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_differing_migrations_refused_with_list(data_dir):
    call_command('migrate', 'sessions', 'zero', database='sqlite',
                 verbosity=0)
    try:
        err = refused()
        assert err.returncode == 1
        assert 'different migrations' in str(err)
        assert 'sessions.0001_initial' in str(err)
        assert ContentType.objects.using('postgres').exists()
    finally:
        call_command('migrate', database='sqlite', verbosity=0)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_refused_while_the_lock_is_held(data_dir):
    make_assets(3)
    with locking.operation_lock(data_dir, 'rollback_migration'):
        err = refused()
    assert err.returncode == 1
    assert 'rollback_migration' in str(err)
    assert Asset.objects.using('postgres').count() == 0


@pytest.mark.django_db(databases=['sqlite', 'postgres'], transaction=True)
def test_unreachable_postgres_names_host_port(data_dir):
    connections['postgres'].close()
    saved = connections['postgres'].settings_dict.copy()
    connections['postgres'].settings_dict.update(UNREACHABLE)
    try:
        err = refused()
    finally:
        connections['postgres'].close()
        connections['postgres'].settings_dict.update(saved)
    assert err.returncode == 1
    assert '127.0.0.1:1' in str(err) and 'does not answer' in str(err)
    assert 'hunter2' not in str(err)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_sqlite_db_option_missing_or_not_sqlite(data_dir, tmp_path):
    err = refused('--sqlite-db', str(tmp_path / 'nope.db'))
    assert err.returncode == 1 and 'does not exist' in str(err)
    junk = tmp_path / 'junk.db'
    junk.write_bytes(b'not a database at all' * 100)
    err = refused('--sqlite-db', str(junk))
    assert 'is not a SQLite database' in str(err)
    assert not (tmp_path / 'nope.db').exists()


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_sqlite_db_option_copies_that_file(data_dir, tmp_path):
    make_assets(5)
    copy = tmp_path / 'copy.db'
    with connections['sqlite'].cursor() as cursor:
        cursor.execute('VACUUM INTO %s', [str(copy)])
    Asset.objects.using('sqlite').all().delete()
    migrate('--sqlite-db', str(copy))
    assert Asset.objects.using('postgres').count() == 5


def test_help_and_docstring_list_exit_codes():
    from anthias_rollback.management.commands import migrate_to_postgres

    assert 'Exit codes: 0 done, 1 could not' in (
        migrate_to_postgres.Command.help)
    assert 'Exit codes: 0 copied' in migrate_to_postgres.__doc__


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_real_process_exit_codes(host_env):
    make_assets(4)
    done = run_manage(host_env, 'migrate_to_postgres')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith('copied ')
    again = run_manage(host_env, 'migrate_to_postgres')
    assert again.returncode == 1
    assert 'already holds data' in again.stderr
    usage = run_manage(host_env, 'migrate_to_postgres', '--bogus')
    assert usage.returncode == 2
    assert Asset.objects.using('postgres').count() == 4
