"""window.standby's files on a real device: the cutover file's info under
its own name (standby_cutover.json) and under the name an older version
gave it (cutover.json, the data dir's cutover record's name too), and
the usable_standby checks a rollback with PostgreSQL down relies on."""
import json

import pytest

from anthias_rollback.window import replicator as window_replicator
from anthias_rollback.window import standby as window_standby
from tests.helpers.rollback import seed_device, spoil_table_root

ALL = ['default', 'sqlite', 'postgres']


def replicated_standby(data_dir, settings):
    seed_device(settings, n_assets=5)
    window_replicator.run_replicator('postgres', data_dir=data_dir,
                                     once=True)
    return window_standby.standby_dir(data_dir)


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_cutover_file_info_has_its_own_name(data_dir, settings):
    folder = replicated_standby(data_dir, settings)
    info = json.loads((folder / 'standby_cutover.json').read_text())
    assert info['path'] == str(window_standby.cutover_path(data_dir))
    assert not (folder / 'cutover.json').exists()
    assert window_standby.read_cutover_file_info(data_dir) == info
    position, why = window_standby.usable_standby(data_dir)
    assert why == '' and position.window == info['window']


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_old_name_is_read_when_the_new_one_is_missing(data_dir,
                                                          settings):
    """A device upgraded mid-window has only standby/cutover.json: its
    window still decides whether the standby may be restored."""
    folder = replicated_standby(data_dir, settings)
    (folder / 'standby_cutover.json').rename(folder / 'cutover.json')
    info = json.loads((folder / 'cutover.json').read_text())
    assert window_standby.read_cutover_file_info(data_dir) == info
    position, why = window_standby.usable_standby(data_dir)
    assert why == '' and position.window == info['window']
    # Read for real: another window's info refuses the standby.
    (folder / 'cutover.json').write_text(json.dumps(
        {**info, 'window': 'another'}))
    position, why = window_standby.usable_standby(data_dir)
    assert position is None
    assert 'belongs to an older rollback window' in why
    # The new name wins over the old one.
    (folder / 'standby_cutover.json').write_text(json.dumps(info))
    assert window_standby.usable_standby(data_dir)[1] == ''
    # A new window removes both.
    window_standby.discard_standby(data_dir)
    assert not (folder / 'cutover.json').exists()
    assert not (folder / 'standby_cutover.json').exists()
    assert window_standby.read_cutover_file_info(data_dir) is None


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_a_spoiled_standby_fails_quick_check(data_dir, settings):
    """A page too broken for SQLite to report on is quick_check's answer
    (engines.sqlite_file.quick_check_line), not 'unreadable'."""
    replicated_standby(data_dir, settings)
    path = window_standby.standby_path(data_dir)
    spoil_table_root(path, 'auth_user')
    position, why = window_standby.usable_standby(data_dir)
    assert position is None
    assert why.startswith(f'standby {path} fails quick_check: '), why
