import json
import os
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connections
from django.test import Client

from anthias_app.models import Asset
from anthias_rollback import compare, locking, profiles, rollback
from tests.conftest import postgres_stopped
from tests.helpers.rollback import (
    file_digest,
    fingerprint_postgres,
    fingerprint_sqlite,
    normalise,
    seed_device,
    write_on_postgres,
)

ALL = ['default', 'sqlite', 'postgres']


def roll_back(*args):
    out, err = StringIO(), StringIO()
    call_command('rollback_migration', *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def roll_back_with_a_loss(*args):
    """A rollback that is done but left rows out: exit 4, never 0."""
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command('rollback_migration', *args, stdout=out, stderr=err)
    assert excinfo.value.returncode == 4, str(excinfo.value)
    return out.getvalue(), err.getvalue()


def latest_report(data_dir):
    path = rollback.latest_report(data_dir / 'reports')
    assert path is not None
    assert (path.stat().st_mode & 0o777) == 0o600
    return json.loads(path.read_text())


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_emergency_rollback_from_postgres_loses_nothing(data_dir, settings):
    device = seed_device(settings)
    write_on_postgres(device)
    # An id PostgreSQL handed out and then lost must never come back.
    ghost = User.objects.db_manager('postgres').create_user('ghost')
    ghost_id = ghost.pk
    ghost.delete(using='postgres')
    out, _ = roll_back('--emergency')

    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'
    report = compare.compare_aliases('sqlite', 'postgres')
    assert report.ok and report.integrity == 100.0
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())
    assert Asset.objects.using('sqlite').filter(
        name='created on PostgreSQL 🆕').exists()
    assert Client().get('/health').status_code == 200
    new_user = User.objects.db_manager('sqlite').create_user('after')
    assert new_user.pk > ghost_id

    data = latest_report(data_dir)
    assert data['source'] == 'postgres'
    assert data['outcome'] == 'rolled back'
    assert data['safety_copy'] and os.path.exists(data['safety_copy'])
    assert [p['name'] for p in data['phases']] == [
        'preflight', 'source', 'fence', 'build', 'verify', 'swap',
        'profile', 'proof', 'post-verify']
    assert data['loss'] == 'proven-none'
    users = data['since_cutover']['models']['auth.User']
    assert users == {'rows_at_cutover': 3, 'rows_now': 4, 'new_rows': 1}
    assert 'since the cutover at' in out
    assert 'data loss: none' in out.splitlines()[-1]
    assert 'RESOLVED: Database Migration Rollback Completed' in out
    # PostgreSQL keeps refusing writes once the rollback is over: a stale
    # process must not write into a database nobody reads again.
    connections['postgres'].close()
    with pytest.raises(DatabaseError, match='fenced'):
        Asset.objects.using('postgres').update(play_order=1)
    log = (data_dir / 'rollback.log').read_text()
    assert 'phase=swap status=ok' in log


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_safety_copy_holds_the_old_database(data_dir, settings):
    device = seed_device(settings)
    before = fingerprint_sqlite(device.live)
    write_on_postgres(device)
    roll_back('--emergency')
    data = latest_report(data_dir)
    assert fingerprint_sqlite(data['safety_copy']) == before


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_postgres_down_restores_backup_and_says_rows_unknown(data_dir,
                                                            settings):
    device = seed_device(settings)
    written = write_on_postgres(device)
    backup_fp = fingerprint_sqlite(device.backup)
    with postgres_stopped():
        out, err = roll_back_with_a_loss('--emergency')
        assert fingerprint_sqlite(device.live) == backup_fp
        data = latest_report(data_dir)
    assert data['source'] == 'backup'
    assert data['backup_used'] == str(device.backup)
    assert data['at_risk_rows'] is None
    assert data['loss'] == 'unknown' and data['exit_code'] == 4
    assert 'could not be computed' in data['at_risk_note']
    assert 'UNKNOWN' in out and 'could not be computed' in err
    assert written  # the writes on PostgreSQL are what is at risk


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_backup_source_exports_exactly_the_at_risk_rows(data_dir,
                                                        settings):
    device = seed_device(settings)
    written = write_on_postgres(device)
    roll_back_with_a_loss('--source', 'backup', '--yes')
    data = latest_report(data_dir)
    assert data['source'] == 'backup'
    assert data['loss'] == 'lost' and data['exit_code'] == 4
    fixture = json.loads(Path(data['at_risk_file']).read_text())
    exported = {}
    for obj in fixture:
        exported.setdefault(obj['model'], set()).add(obj['pk'])
    assert exported == {'anthias_app.asset': written['anthias_app.Asset'],
                        'auth.user': written['auth.User']}
    assert data['at_risk_rows'] == {'anthias_app.Asset': 2, 'auth.User': 2}
    assert data['resurrected_rows'] == {'anthias_app.Asset': 1}
    # loaddata re-applies them: SQLite then differs from PostgreSQL only
    # by the row deleted there (which the backup brought back).
    call_command('loaddata', data['at_risk_file'], database='sqlite',
                 verbosity=0)
    report = compare.compare_aliases('sqlite', 'postgres')
    diffs = {m.label: (m.missing_keys, m.extra_keys, m.changed)
             for m in report.models if m.differences}
    assert diffs == {'anthias_app.Asset': (tuple(written['deleted']), (),
                                           ())}


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_dry_run_changes_nothing(data_dir, settings):
    device = seed_device(settings)
    write_on_postgres(device)
    connections['sqlite'].close()
    files = [device.live, f'{device.live}-wal', f'{device.live}-shm',
             profiles.state_file_path(data_dir)]
    before = [file_digest(f) for f in files]
    out, _ = roll_back('--dry-run')
    assert [file_digest(f) for f in files] == before
    assert 'DRY RUN OK' in out.splitlines()[-1]
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    leftovers = [p for p in device.live.parent.iterdir()
                 if 'dry-run' in p.name]
    assert leftovers == []


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_refusals_change_nothing(data_dir, settings, readonly_dir):
    device = seed_device(settings)
    # Every connection of this process to the file closed (sqlite and
    # default), so its WAL is checkpointed now and not later mid-test.
    connections.close_all()
    before = file_digest(device.live)

    def refused(*args, match):
        with pytest.raises(CommandError, match=match) as excinfo:
            roll_back(*args)
        assert excinfo.value.returncode == 1
        assert file_digest(device.live) == before
        assert profiles.resolve_active_profile(data_dir, {}).name == \
            'postgres'

    with locking.operation_lock(data_dir, 'migrate_to_postgres'):
        refused('--emergency', match='another operation holds the lock')
    corrupt = data_dir / 'corrupt.db'
    raw = bytearray(device.backup.read_bytes())
    # The schema page's b-tree header, not a random byte: a flip in free
    # space would go unnoticed (it did, once the file's layout changed).
    raw[100:108] = b'\xff' * 8
    corrupt.write_bytes(bytes(raw))
    refused('--emergency', '--source', 'backup', '--backup-path',
            str(corrupt), match='is not valid')
    refused('--emergency', '--source', 'backup', '--backup-path',
            str(data_dir / 'missing.db'), match='does not exist')
    # A mistyped live path is refused before anything (it once got a new
    # file there while the app kept reading its real one).
    refused('--emergency', '--original-db-path',
            str(readonly_dir / 'anthias.db'),
            match='is not the file the app reads')
    refused('--emergency', '--yes', '--original-db-path',
            '/mistyped/x.db', match='is not the file the app reads')
    assert not Path('/mistyped').exists()
    refused('--emergency', '--timeout-minutes', '0.00001',
            match='deadline')
    with postgres_stopped():
        (device.backup).unlink()
        refused('--emergency', match='no verified backup')


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_rerun_after_a_rollback_succeeds_without_redoing_it(data_dir,
                                                          settings):
    seed_device(settings)
    roll_back('--emergency')
    reports = sorted((data_dir / 'reports').glob('rollback_*.json'))
    # A rerun (a retrying hook, a second operator) succeeds, one line, no
    # banner, and changes nothing: no new report, no new run.
    out, _ = roll_back('--emergency')
    assert out.strip().splitlines() == [out.strip()]
    assert out.startswith('already on SQLite since ')
    assert str(reports[-1]) in out and 'data loss: none (proven' in out
    assert 'URGENT' not in out
    assert sorted((data_dir / 'reports').glob('rollback_*.json')) == reports
    out, _ = roll_back('--emergency', '--source', 'postgres')
    assert 'ROLLED BACK' in out


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_preserve_postgres_dumps_first(data_dir, settings):
    seed_device(settings)
    roll_back('--emergency', '--preserve-postgres')
    data = latest_report(data_dir)
    dump = data['postgres_dump']
    assert dump and os.path.getsize(dump) > 0
    assert (os.stat(dump).st_mode & 0o777) == 0o600
    assert [p['name'] for p in data['phases']][:4] == [
        'preflight', 'source', 'fence', 'preserve']


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_restart_failure_is_exit_4_and_rollback_stays(data_dir, settings):
    device = seed_device(settings)
    write_on_postgres(device)
    settings.ANTHIAS_ROLLBACK_RESTART_COMMAND = 'false'
    with pytest.raises(CommandError) as excinfo:
        roll_back('--emergency')
    assert excinfo.value.returncode == 4
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'
    assert normalise(fingerprint_sqlite(device.live)) == \
        normalise(fingerprint_postgres())


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_generate_report_prints_latest(data_dir, settings):
    seed_device(settings)
    roll_back('--emergency')
    out, _ = roll_back('--generate-report')
    assert 'Rollback ROLLED BACK' in out
    assert 'Data Loss: none' in out


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_backup_from_another_schema_is_refused(data_dir, settings):
    import shutil
    import sqlite3

    device = seed_device(settings)
    other = data_dir / 'other_schema.db'
    shutil.copyfile(device.backup, other)
    conn = sqlite3.connect(other)
    conn.execute("DELETE FROM django_migrations WHERE app = 'sessions'")
    conn.commit()
    conn.close()
    connections['sqlite'].close()
    before = file_digest(device.live)
    with pytest.raises(CommandError) as excinfo:
        roll_back('--emergency', '--source', 'backup', '--backup-path',
                  str(other))
    message = str(excinfo.value)
    assert excinfo.value.returncode == 1
    assert "does not match this code's schema" in message
    assert 'sessions.0001_initial' in message
    assert file_digest(device.live) == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_named_backup_without_manifest_is_used_with_a_warning(data_dir,
                                                              settings):
    import shutil

    device = seed_device(settings)
    old_style = data_dir / 'old_tool_backup.db'
    shutil.copyfile(device.backup, old_style)
    backup_fp = fingerprint_sqlite(device.backup)
    _, err = roll_back('--emergency', '--source', 'backup', '--backup-path',
                       str(old_style))
    assert 'has no manifest' in err
    assert fingerprint_sqlite(device.live) == backup_fp
    # A corrupt one without a manifest is still refused.
    raw = bytearray(old_style.read_bytes())
    raw[100:4096] = b'\0' * (4096 - 100)
    old_style.write_bytes(bytes(raw))
    with pytest.raises(CommandError, match='is not valid'):
        roll_back('--emergency', '--source', 'backup', '--backup-path',
                  str(old_style))


def _edited_copy(source: Path, target: Path, *statements: str) -> None:
    import shutil
    import sqlite3

    shutil.copyfile(source, target)
    conn = sqlite3.connect(target)
    for sql in statements:
        conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_backup_behind_the_code_is_migrated_forward(data_dir, settings):
    """Issue 20: a backup made before a migration (here: before
    sessions.0001) is restored with the migration applied to the NEW
    file; the backup itself is not changed."""
    import sqlite3

    device = seed_device(settings)
    behind = data_dir / 'behind.db'
    _edited_copy(device.backup, behind, 'DROP TABLE django_session',
                 "DELETE FROM django_migrations WHERE app = 'sessions'")
    backup_fp = fingerprint_sqlite(behind)
    digest = file_digest(behind)
    connections['sqlite'].close()
    roll_back('--emergency', '--source', 'backup', '--backup-path',
              str(behind))
    assert fingerprint_sqlite(device.live) == backup_fp
    assert file_digest(behind) == digest
    conn = sqlite3.connect(f'file:{device.live}?mode=ro', uri=True)
    try:
        assert conn.execute("SELECT count(*) FROM django_migrations WHERE "
                            "app = 'sessions'").fetchone()[0] >= 1
        conn.execute('SELECT count(*) FROM django_session').fetchone()
    finally:
        conn.close()
    phases = {p['name']: p for p in latest_report(data_dir)['phases']}
    assert 'migrated forward: sessions.0001_initial' in (
        phases['migrate-forward']['detail'])
    assert profiles.resolve_active_profile(data_dir, {}).name == 'sqlite'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_backup_ahead_of_the_code_is_refused_naming_it(data_dir, settings):
    device = seed_device(settings)
    ahead = data_dir / 'ahead.db'
    _edited_copy(device.backup, ahead,
                 "INSERT INTO django_migrations (app, name, applied) VALUES "
                 "('sessions', '0099_from_a_newer_release', "
                 "'2026-12-01 00:00:00')")
    connections['sqlite'].close()
    before = file_digest(device.live)
    with pytest.raises(CommandError) as excinfo:
        roll_back('--emergency', '--source', 'backup', '--backup-path',
                  str(ahead))
    message = str(excinfo.value)
    assert excinfo.value.returncode == 1
    assert 'sessions.0099_from_a_newer_release' in message
    assert 'this code does not know' in message
    assert '\n' not in message.strip()
    assert file_digest(device.live) == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
