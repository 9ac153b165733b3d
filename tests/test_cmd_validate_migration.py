import json
import sqlite3
from io import StringIO

import pytest
from django.core.management import (
    CommandError,
    call_command,
    load_command_class,
)
from django.db import connections

from anthias_app.models import Asset
from tests.conftest import run_manage
from tests.helpers.compare import fill_both
from tests.kitchensink.models import Item

BOTH = ['sqlite', 'postgres']
UNREACHABLE = {'ENGINE': 'django.db.backends.postgresql',
               'NAME': 'anthias', 'USER': 'anthias',
               'PASSWORD': 'hunter2', 'HOST': '127.0.0.1', 'PORT': 1,
               'OPTIONS': {'connect_timeout': 2}}


def validate(*args):
    out, err = StringIO(), StringIO()
    call_command('validate_migration', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def validate_fails(*args):
    with pytest.raises(CommandError) as excinfo:
        validate(*args)
    return excinfo.value


@pytest.mark.django_db(databases=BOTH)
def test_identical_passes_with_performance_test(tmp_path):
    fill_both('sqlite', 'postgres')
    report = tmp_path / 'report.json'
    out, err = validate('--report', str(report), '--sample-size', '10')
    lines = out.strip().splitlines()
    assert lines[-1].startswith('PASS: integrity 100.00%')
    assert 'anthias_app.Asset: 40 / 40 rows, 40 identical' in out
    assert 'performance: ' in out and 'ratio > 3' in out
    assert 'sample size 10 is more than its 8 rows' in err
    assert report.stat().st_mode & 0o777 == 0o600
    data = json.loads(report.read_text())
    assert data['ok'] and data['integrity'] == 100.0
    assert data['performance']['timings']
    assert 'hunter2' not in report.read_text()


@pytest.mark.django_db(databases=BOTH)
def test_differences_exit_3_and_json_lists_every_key(tmp_path):
    assets = fill_both('sqlite', 'postgres', n_assets=30)
    gone = sorted(a.asset_id for a in assets)[:7]
    Asset.objects.using('postgres').filter(pk__in=gone).delete()
    Item.objects.using('postgres').filter(pk=2).update(title='x',
                                                       count=-1)
    report = tmp_path / 'r.json'
    error = validate_fails('--no-performance-test', '--deep',
                           '--report', str(report))
    assert error.returncode == 3
    assert str(error).startswith('FAIL: integrity')
    assert 'below --min-integrity 100%' in str(error)
    data = json.loads(report.read_text())
    models = {m['label']: m for m in data['models']}
    assert models['anthias_app.Asset']['missing_keys'] == gone
    assert models['kitchensink.Item']['changed'] == [
        {'pk': 2, 'fields': ['title', 'count']}]
    assert data['mode'] == 'deep'


@pytest.mark.django_db(databases=BOTH)
def test_text_output_shows_first_keys():
    assets = fill_both('sqlite', 'postgres', n_assets=30)
    gone = sorted(a.asset_id for a in assets)[:7]
    Asset.objects.using('postgres').filter(pk__in=gone).delete()
    out = StringIO()
    with pytest.raises(CommandError):
        call_command('validate_migration', '--no-performance-test',
                     stdout=out, stderr=StringIO())
    assert f'missing on postgres side: {", ".join(gone[:5])} (+2 more)' \
        in out.getvalue()


@pytest.mark.django_db(databases=BOTH)
def test_min_integrity_95_passes_a_few_differences():
    assets = fill_both('sqlite', 'postgres', n_assets=200)
    keys = sorted(a.asset_id for a in assets)
    Asset.objects.using('postgres').filter(pk__in=keys[:4]).update(
        name='edited on postgres')
    Asset.objects.using('postgres').filter(pk=keys[10]).delete()
    out, _ = validate('--no-performance-test', '--min-integrity', '95')
    assert 'PASS: integrity' in out.strip().splitlines()[-1]
    assert '5 differences' in out
    error = validate_fails('--no-performance-test', '--min-integrity',
                           '99.5')
    assert error.returncode == 3


@pytest.mark.django_db(databases=BOTH)
@pytest.mark.parametrize('args, message', [
    (['--sample-size', '-1'], "--sample-size: must be at least 0, not '-1'"),
    (['--min-integrity', '150'], '--min-integrity: must be at most 100'),
    (['--min-integrity', '-5'], '--min-integrity: must be 0 or more'),
    (['--timeout', '-3'], '--timeout: must be greater than 0'),
    (['--max-query-time', '0'], '--max-query-time: must be greater than 0'),
])
def test_bad_numbers_exit_2_with_one_line(args, message):
    # Argparse types refuse them: a usage error, code 2 (not 1 any more).
    error = validate_fails(*args)
    assert error.returncode == 2
    assert message in str(error)
    assert '\n' not in str(error)


@pytest.mark.django_db(databases=BOTH)
@pytest.mark.parametrize('kwargs, message', [
    ({'sample_size': -1}, '--sample-size must be 0 or more, not -1'),
    ({'min_integrity': 150.0}, '--min-integrity must be between 0 and'),
    ({'timeout': -3.0}, '--timeout must be more than 0'),
    ({'max_query_time': 0.0}, '--max-query-time must be more than 0'),
])
def test_bad_numbers_from_python_exit_1_with_one_line(kwargs, message):
    # call_command(**kwargs) skips argparse's types: run() checks again.
    with pytest.raises(CommandError) as excinfo:
        call_command('validate_migration', stdout=StringIO(),
                     stderr=StringIO(), **kwargs)
    assert excinfo.value.returncode == 1
    assert message in str(excinfo.value)


@pytest.mark.django_db(databases=BOTH)
def test_unknown_model_exit_1_with_one_line():
    error = validate_fails('--model', 'nope.Nope')
    assert error.returncode == 1
    assert "unknown model 'nope.Nope'" in str(error)
    assert '\n' not in str(error)


@pytest.mark.django_db(databases=BOTH)
def test_missing_or_non_sqlite_file_exit_1(tmp_path):
    missing = tmp_path / 'nope.db'
    error = validate_fails('--sqlite-db', str(missing))
    assert error.returncode == 1
    assert f'SQLite file {missing} does not exist' in str(error)
    assert not missing.exists()
    text = tmp_path / 'backup.db'
    text.write_text('not a database')
    error = validate_fails('--sqlite-db', str(text))
    assert error.returncode == 1
    assert 'is not a SQLite database' in str(error)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_backup_file_is_compared_with_postgres(tmp_path):
    fill_both('sqlite', 'postgres')
    backup = tmp_path / 'backup.db'
    source = sqlite3.connect(connections['sqlite'].settings_dict['NAME'])
    target = sqlite3.connect(backup)
    source.backup(target)
    source.close()
    Asset.objects.using('postgres').update(play_order=12345)
    error = validate_fails('--sqlite-db', str(backup),
                           '--no-performance-test')
    assert error.returncode == 3
    Asset.objects.using('sqlite').update(play_order=12345)
    # The live sqlite alias now matches; the backup still does not.
    out, _ = validate('--no-performance-test')
    assert 'PASS' in out
    target.execute('UPDATE assets SET play_order = 12345')
    target.commit()
    target.close()
    out, _ = validate('--sqlite-db', str(backup), '--no-performance-test')
    assert f'SQLite {backup}' in out and 'PASS' in out


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_unreachable_postgres_exit_1_no_password():
    connections['postgres'].close()
    saved = connections['postgres'].settings_dict.copy()
    connections['postgres'].settings_dict.update(UNREACHABLE)
    try:
        error = validate_fails('--no-performance-test')
    finally:
        connections['postgres'].close()
        connections['postgres'].settings_dict.update(saved)
    assert error.returncode == 1
    assert '127.0.0.1:1' in str(error) and 'does not answer' in str(error)
    assert 'hunter2' not in str(error)
    assert '\n' not in str(error)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_unmigrated_postgres_exit_1():
    call_command('migrate', 'sessions', 'zero', database='postgres',
                 verbosity=0)
    try:
        error = validate_fails('--no-performance-test')
    finally:
        call_command('migrate', database='postgres', verbosity=0)
    assert error.returncode == 1
    assert 'migration state differs' in str(error)
    assert 'sessions.0001_initial' in str(error)


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_timeout_exit_1_with_partial_report(tmp_path):
    fill_both('sqlite', 'postgres')
    report = tmp_path / 'partial.json'
    error = validate_fails('--timeout', '0.000001', '--report', str(report))
    assert error.returncode == 1
    assert str(error).startswith('INCOMPLETE: stopped (timeout after')
    data = json.loads(report.read_text())
    assert data['complete'] is False and data['not_compared']


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_json_to_stdout_holds_only_json():
    fill_both('sqlite', 'postgres')
    out, _ = validate('--json', '--no-performance-test')
    assert json.loads(out)['ok'] is True


@pytest.mark.django_db(databases=BOTH, transaction=True)
def test_real_process_exit_codes(host_env):
    assets = fill_both('sqlite', 'postgres')
    result = run_manage(host_env, 'validate_migration',
                        '--no-performance-test')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith('PASS')
    Asset.objects.using('postgres').filter(pk=assets[3].asset_id).update(
        is_enabled=not assets[3].is_enabled)
    result = run_manage(host_env, 'validate_migration',
                        '--no-performance-test')
    assert result.returncode == 3, result.stderr
    assert f'changed: {assets[3].asset_id} (is_enabled)' in result.stdout
    assert 'FAIL: integrity' in result.stderr
    result = run_manage(host_env, 'validate_migration', '--sample-size',
                        'many')
    assert result.returncode == 2


def test_help_lists_exit_codes():
    command = load_command_class('anthias_rollback', 'validate_migration')
    text = ' '.join(command.create_parser(
        'manage.py', 'validate_migration').format_help().split())
    for code in ('0 pass', '1 could not validate', '2 usage',
                 '3 differences'):
        assert code in text
    assert '--deep-validation' in text and '--no-performance-test' in text


@pytest.mark.django_db(databases=BOTH)
def test_checksum_mode_reports_rows_re_read(tmp_path):
    fill_both('sqlite', 'postgres', n_assets=30)
    Item.objects.using('postgres').filter(pk=3).update(title='x')
    report = tmp_path / 'r.json'
    error = validate_fails('--no-performance-test', '--report', str(report),
                           '--verbosity', '2')
    assert error.returncode == 3
    data = json.loads(report.read_text())
    models = {m['label']: m for m in data['models']}
    assert data['mode'] == 'checksum'
    # Item's only bucket (8 rows) was read again to name the row.
    assert models['kitchensink.Item']['rechecked'] == 8
    assert models['kitchensink.Item']['changed'] == [
        {'pk': 3, 'fields': ['title']}]
    assert models['anthias_app.Asset']['rechecked'] == 0
