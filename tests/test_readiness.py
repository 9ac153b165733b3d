"""readiness.py: each check, and the ready/not-ready transitions."""
import shutil
from datetime import UTC, datetime, timedelta

import pytest

from anthias_rollback import backup, locking, profiles, readiness
from anthias_rollback.exceptions import ConfigError
from anthias_rollback.rollback import preserve
from tests.helpers import backup as bh
from tests.helpers import pgserver

UNREACHABLE = {'ENGINE': 'django.db.backends.postgresql',
               'NAME': 'anthias', 'USER': 'anthias',
               'PASSWORD': 'hunter2', 'HOST': '127.0.0.1', 'PORT': 1,
               'OPTIONS': {'connect_timeout': 2}}
# The pg_dump that matches the test server (the embedded package's); the
# machine's /usr/bin/pg_dump is an older major version.
PG_DUMP = str(pgserver.embedded_bin_dir() / 'pg_dump')
OLD_PG_DUMP = '/usr/bin/pg_dump'


@pytest.fixture
def device(tmp_path):
    """A data dir with a live SQLite file and an empty backup dir."""
    data = tmp_path / 'data'
    data.mkdir()
    live = bh.make_plain_db(data / 'anthias.db', rows=100)
    return data, live, data / 'backups'


def run(device, **kwargs):
    data, live, backups = device
    kwargs.setdefault('postgres_alias', 'postgres')
    kwargs.setdefault('pg_dump', PG_DUMP)
    return readiness.check_readiness(data_dir=data, sqlite_path=live,
                                     backup_dir=backups, **kwargs)


def by_name(report):
    return {c.name: c for c in report.checks}


def failed(report):
    return sorted(c.name for c in report.failed)


@pytest.mark.django_db(databases=['postgres'])
def test_transitions_missing_ready_old_corrupt(device):
    _data, live, backups = device
    report = run(device)
    assert not report.ready
    assert failed(report) == ['backup_age', 'backup_integrity']
    assert 'no verified backup' in by_name(report)['backup_age'].reason
    made = backup.create_backup(live, backups)
    report = run(device)
    assert report.ready, report.checks
    assert report.latest_backup == made.path
    assert by_name(report)['postgres_reachable'].ok
    # Too old: the same backup seen 25 hours later.
    later = datetime.now(UTC) + timedelta(hours=25)
    report = run(device, now=later)
    assert failed(report) == ['backup_age']
    assert 'older than 24h' in by_name(report)['backup_age'].reason
    assert run(device, now=later, max_age_hours=48).ready
    # Corrupt: one byte flipped.
    data_bytes = bytearray(made.path.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    made.path.write_bytes(bytes(data_bytes))
    report = run(device)
    assert failed(report) == ['backup_age', 'backup_integrity']
    assert 'sha256' in by_name(report)['backup_integrity'].reason


@pytest.mark.django_db(databases=['postgres'])
def test_disk_check_with_injected_free_space(device):
    _data, live, backups = device
    backup.create_backup(live, backups)
    size = live.stat().st_size
    assert run(device, free_bytes=3 * size).ready
    report = run(device, free_bytes=3 * size - 1)
    assert failed(report) == ['disk_space']
    assert 'need' in by_name(report)['disk_space'].reason


@pytest.mark.django_db(databases=['postgres'])
def test_disk_check_on_a_really_small_filesystem(tmp_path, small_fs):
    data = small_fs('256k')
    live = bh.make_plain_db(data / 'anthias.db', rows=200)
    assert live.stat().st_size > 256 * 1024 / 4
    backups = tmp_path / 'backups'
    backup.create_backup(live, backups)
    report = run((data, live, backups))
    assert failed(report) == ['disk_space']


@pytest.mark.django_db(databases=['postgres'])
def test_lock_held_means_not_ready(device):
    data, live, backups = device
    backup.create_backup(live, backups)
    with locking.operation_lock(data, 'rollback_migration'):
        report = run(device)
        assert failed(report) == ['lock']
        assert 'rollback_migration holds the lock' in \
            by_name(report)['lock'].reason
    assert run(device).ready


@pytest.mark.django_db(databases=['postgres'])
def test_postgres_down_is_informational(device):
    _data, live, backups = device
    backup.create_backup(live, backups)
    with profiles.temporary_alias(UNREACHABLE) as alias:
        report = run(device, postgres_alias=alias)
    check = by_name(report)['postgres_reachable']
    assert not check.ok and check.informational
    assert '127.0.0.1:1' in check.reason and 'hunter2' not in check.reason
    assert report.ready


@pytest.mark.django_db(databases=['postgres'])
def test_pg_dump_missing(device):
    _data, live, backups = device
    backup.create_backup(live, backups)
    report = run(device, pg_dump='/nonexistent/pg_dump')
    assert failed(report) == ['pg_dump']
    assert 'not found' in by_name(report)['pg_dump'].reason
    assert run(device, pg_dump='false').failed[0].name == 'pg_dump'


@pytest.mark.django_db(databases=['postgres'])
def test_sqlite_path_not_writable(device, readonly_dir):
    data, live, backups = device
    backup.create_backup(live, backups)
    report = readiness.check_readiness(
        data_dir=data, sqlite_path=readonly_dir / 'anthias.db',
        backup_dir=backups, postgres_alias='postgres', pg_dump=PG_DUMP)
    assert failed(report) == ['sqlite_writable']


def test_a_later_check_is_one_appended_function(device):
    data, live, backups = device

    def check_drill(ctx):
        return readiness.ReadinessCheck('drill', False, 'no drill yet')

    report = readiness.check_readiness(
        data_dir=data, sqlite_path=live, backup_dir=backups,
        postgres_alias=None, checks=[check_drill])
    assert [c.name for c in report.checks] == ['drill']
    assert not report.ready


@pytest.mark.django_db(databases=['postgres'])
def test_corrupt_newest_with_an_older_verified_backup(device):
    _data, live, backups = device
    older = backup.create_backup(live, backups)
    newest = backup.create_backup(live, backups)
    with open(newest.path, 'r+b') as fh:
        fh.truncate(1000)
    report = run(device)
    assert failed(report) == ['backup_integrity']
    assert by_name(report)['backup_age'].ok
    assert report.latest_backup == older.path


def _history_line(data, outcome, failed_step=None):
    import json

    drills = data / 'drills'
    drills.mkdir(exist_ok=True)
    line = {'finished_at': datetime.now(UTC).isoformat(),
            'outcome': outcome, 'seconds': 3.2, 'rollback_seconds': 1.25,
            'downtime_seconds': 1.1, 'failed_step': failed_step,
            'error': 'boom' if failed_step else None, 'rows': 1000,
            'server': 'embedded', 'report_path': None}
    with open(drills / 'history.jsonl', 'a') as fh:
        fh.write(json.dumps(line) + '\n')


@pytest.mark.django_db(databases=['postgres'])
def test_last_drill_reported_and_failed_drill_is_not_ready(device):
    data = device[0]
    backup.create_backup(device[1], device[2])
    check = by_name(run(device))['last_drill']
    assert check.ok and check.informational
    assert 'no drill has run yet' in check.reason
    _history_line(data, 'PASS')
    report = run(device)
    assert report.ready
    assert 'last drill PASS' in by_name(report)['last_drill'].reason
    assert 'rollback took 1.25s' in by_name(report)['last_drill'].reason
    _history_line(data, 'FAIL', failed_step='verify')
    report = run(device)
    assert not report.ready
    assert failed(report) == ['last_drill']
    assert 'at step verify: boom' in by_name(report)['last_drill'].reason


@pytest.mark.django_db(databases=['sqlite', 'postgres'])
def test_cutover_journal_shown(device):
    from anthias_rollback.window import cutover as window_cutover
    from tests.helpers.factories import AssetFactory

    AssetFactory.create_batch(2)
    window_cutover.record_cutover('sqlite', 'postgres', device[0])
    asset = AssetFactory.build()
    asset.save(using='postgres')
    check = by_name(run(device))['cutover']
    assert check.informational
    assert 'cutover to PostgreSQL at' in check.reason
    assert 'row counts moved by 1' in check.reason


def _major(executable):
    return preserve.pg_dump_client_version(executable)[1]


@pytest.mark.django_db(databases=['postgres'])
def test_pg_dump_older_than_server_is_not_ok(device):
    """pg_dump 15 cannot dump server 18: it used to say `pg_dump ok`."""
    if shutil.which(OLD_PG_DUMP) is None:
        pytest.fail(f'{OLD_PG_DUMP} is needed for the real mismatch')
    server = preserve.postgres_server_major('postgres')
    assert _major(OLD_PG_DUMP) < server   # the machine's real mismatch
    report = run(device, pg_dump=OLD_PG_DUMP)
    check = by_name(report)['pg_dump']
    assert not check.ok
    assert 'ANTHIAS_PG_DUMP' in check.reason
    assert f'pg_dump {_major(OLD_PG_DUMP)}' in check.reason
    assert f'PostgreSQL {server}' in check.reason
    assert 'pg_dump' in failed(report)
    matching = by_name(run(device, pg_dump=PG_DUMP))['pg_dump']
    assert matching.ok and f'server is PostgreSQL {server}' in \
        matching.reason


@pytest.mark.django_db(databases=['postgres'])
def test_check_pg_dump_version_helper(settings):
    server = preserve.postgres_server_major('postgres')
    settings.ANTHIAS_PG_DUMP = OLD_PG_DUMP
    with pytest.raises(ConfigError) as excinfo:
        preserve.check_pg_dump_version('postgres')
    message = str(excinfo.value)
    assert message.startswith(f'ANTHIAS_PG_DUMP={OLD_PG_DUMP} is pg_dump '
                              f'{_major(OLD_PG_DUMP)}')
    assert f'runs PostgreSQL {server}' in message
    settings.ANTHIAS_PG_DUMP = PG_DUMP
    found = preserve.check_pg_dump_version('postgres')
    assert (found.client_major, found.server_major) == (server, server)
    # Without an alias only the client is read (no database needed).
    assert preserve.check_pg_dump_version(None).server_major is None


@pytest.mark.django_db(databases=['postgres'])
def test_a_backup_dated_in_the_future_is_a_finding_not_fresh(device):
    import json

    _data, live, backups = device
    made = backup.create_backup(live, backups)
    manifest = json.loads(made.manifest_path.read_text())
    manifest['created_at'] = (datetime.now(UTC)
                              + timedelta(hours=48)).isoformat()
    made.manifest_path.write_text(json.dumps(manifest))
    report = run(device)
    assert not report.ready
    reason = by_name(report)['backup_age'].reason
    assert 'dated in the future' in reason and '48.0h ahead' in reason


@pytest.mark.django_db(databases=['postgres'])
def test_no_backup_and_no_usable_standby_is_not_ready(device):
    """With PostgreSQL down a rollback restores a backup or the standby:
    neither, and readiness says no rollback could run."""
    report = run(device)
    assert not report.ready
    reason = by_name(report)['backup_age'].reason
    assert 'and no usable standby (no standby)' in reason
    assert 'with PostgreSQL down no rollback could run' in reason
    assert reason.endswith('run backup_database')


def _record_migrations(path, rows):
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE IF NOT EXISTS django_migrations (id INTEGER '
                 'PRIMARY KEY, app TEXT, name TEXT, applied TEXT)')
    conn.executemany('INSERT INTO django_migrations (app, name, applied) '
                     "VALUES (?, ?, '2026-01-01')", rows)
    conn.commit()
    conn.close()


@pytest.mark.django_db(databases=['postgres'])
def test_a_backup_ahead_of_the_code_is_not_ready_behind_is_a_note(device):
    from django.db import connections
    from django.db.migrations.recorder import MigrationRecorder

    _data, live, backups = device
    recorded = list(MigrationRecorder(
        connections['postgres']).applied_migrations())
    # Behind: every migration of this code but the newest one of an app.
    _record_migrations(live, recorded[:-1])
    backup.create_backup(live, backups)
    report = run(device)
    check = by_name(report)['backup_integrity']
    assert check.ok and report.ready, report.checks
    assert 'migrations behind this code: a rollback migrates it ' \
        'forward' in check.reason
    # Ahead: a migration this code has never heard of.
    _record_migrations(live, [recorded[-1], ('anthias_app', '9999_future')])
    backup.create_backup(live, backups)
    report = run(device)
    check = by_name(report)['backup_integrity']
    assert not report.ready and not check.ok
    assert 'records migrations this code does not know ' \
        '(anthias_app.9999_future)' in check.reason
