"""Every file the tool creates is 0600: the rollback's JSON and text
reports and its at-risk export, the standby and its cutover info (the
drill's history is checked in test_drill_run)."""
import stat
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from tests.conftest import run_manage
from tests.helpers.rollback import seed_device, write_on_postgres

ALL = ['default', 'sqlite', 'postgres']


def mode(path: Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_reports_and_the_at_risk_export_are_private(data_dir, settings):
    device = seed_device(settings)
    write_on_postgres(device)
    # A backup restore with rows left out: exit 4, an export of them.
    with pytest.raises(CommandError) as excinfo:
        call_command('rollback_migration', '--source', 'backup', '--yes',
                     stdout=StringIO(), stderr=StringIO())
    assert excinfo.value.returncode == 4
    reports = sorted((data_dir / 'reports').iterdir())
    kinds = {p.suffix for p in reports if p.name.startswith('rollback_')}
    assert kinds == {'.json', '.txt'}
    exports = [p for p in reports if p.name.startswith('at_risk_rows_')]
    assert len(exports) == 1
    for path in reports:
        assert mode(path) == 0o600, path


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_standby_and_its_files_are_private(data_dir, settings,
                                               host_env):
    seed_device(settings, n_assets=5)
    connections['sqlite'].close()
    done = run_manage(host_env, 'replicate_changes', '--once')
    assert done.returncode == 0, done.stderr
    made = [p for p in (data_dir / 'standby').rglob('*') if p.is_file()]
    assert any(p.name == 'standby.db' for p in made), made
    for path in made:
        assert mode(path) == 0o600, path
