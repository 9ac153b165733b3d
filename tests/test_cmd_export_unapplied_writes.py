"""export_unapplied_writes in real processes: after a standby restore
with PostgreSQL down, once it answers, exactly the writes the standby
lacked are listed, and loaddata of the export brings the kept rows
back."""
import json
import re
import sqlite3
from pathlib import Path

import pytest
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback.window import replicator as window_replicator
from tests.conftest import postgres_stopped, run_manage
from tests.helpers.factories import AssetFactory
from tests.helpers.rollback import seed_device

ALL = ['default', 'sqlite', 'postgres']


def standby_rollback(device, data_dir, host_env):
    """Roll back with PostgreSQL stopped (the standby is restored)."""
    connections['sqlite'].close()
    with postgres_stopped():
        done = run_manage(host_env, 'rollback_migration', '--emergency')
    assert done.returncode == 4, done.stdout + done.stderr
    assert 'source:        standby' in done.stdout
    return done


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_writes_after_the_position_are_listed_and_exported(
        data_dir, settings, host_env):
    device = seed_device(settings, n_assets=8)
    ids = device.asset_ids
    Asset.objects.using('postgres').filter(pk=ids[0]).update(name='early')
    # Written after the standby's position: three writes it lacks.
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    Asset.objects.using('postgres').filter(pk=ids[1]).update(name='late ✏️')
    Asset.objects.using('postgres').filter(pk=ids[2]).delete()
    AssetFactory.build(asset_id='late-insert').save(using='postgres')
    standby_rollback(device, data_dir, host_env)

    done = run_manage(host_env, 'export_unapplied_writes')
    assert done.returncode == 3, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert f'  anthias_app.Asset pk={ids[1]} update' in lines
    assert f'  anthias_app.Asset pk={ids[2]} delete' in lines
    assert '  anthias_app.Asset pk=late-insert insert' in lines
    assert f'pk={ids[0]}' not in done.stdout     # the standby had it
    last = lines[-1]
    assert last.startswith('UNAPPLIED: 3 write(s) after '), last
    assert '1 delete(s) listed' in last

    document = json.loads(run_manage(host_env, 'export_unapplied_writes',
                                     '--json', '--no-export').stdout)
    assert document['exit_code'] == 3 and document['exported'] is None
    fixture = re.search(r'exported to (\S+) \(loaddata', last).group(1)
    assert oct(Path(fixture).stat().st_mode & 0o777) == '0o600'
    loaded = run_manage(host_env, 'loaddata', fixture, '--database',
                        'sqlite')
    assert loaded.returncode == 0, loaded.stderr
    conn = sqlite3.connect(device.live)
    names = dict(conn.execute('SELECT asset_id, name FROM assets'))
    conn.close()
    assert names[ids[1]] == 'late ✏️'
    assert 'late-insert' in names
    assert names[ids[0]] == 'early'


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_nothing_after_the_position_is_exit_0(data_dir, settings,
                                              host_env):
    device = seed_device(settings, n_assets=4)
    Asset.objects.using('postgres').filter(
        pk=device.asset_ids[0]).update(name='replicated')
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    standby_rollback(device, data_dir, host_env)
    done = run_manage(host_env, 'export_unapplied_writes')
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith('NONE UNAPPLIED')


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_refused_without_a_standby_rollback_or_with_postgres_down(
        data_dir, settings, host_env):
    done = run_manage(host_env, 'export_unapplied_writes')
    assert done.returncode == 1
    assert 'no report' in done.stderr and 'Traceback' not in done.stderr
    device = seed_device(settings, n_assets=4)
    window_replicator.run_replicator('postgres', data_dir=data_dir, once=True)
    standby_rollback(device, data_dir, host_env)
    with postgres_stopped():
        done = run_manage(host_env, 'export_unapplied_writes')
    assert done.returncode == 1
    assert 'does not answer' in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr
    bad = run_manage(host_env, 'export_unapplied_writes', '--report-file',
                     '')
    assert bad.returncode == 2
