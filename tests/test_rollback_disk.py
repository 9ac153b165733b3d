"""A full disk never gives a traceback or a torn file: the rollback
sizes the new file from what will be written (PostgreSQL's rows, not
the old live file) and refuses before changing anything; ENOSPC during
the build is one line with nothing changed; ENOSPC after the swap is
exit 4 with one line (the new database is live)."""
import shutil
import subprocess
import sys
import time

import pytest
from django.db import connections

from anthias_rollback import profiles
from anthias_rollback.window import journal as window_journal
from tests.conftest import ROOT, run_manage
from tests.helpers.pg import pg_session
from tests.helpers.rollback import file_digest, seed_device

ALL = ['default', 'sqlite', 'postgres']


def grow_postgres(megabytes: int) -> None:
    """Rows written on PostgreSQL after the cutover: hex text that TOAST
    cannot shrink much, about *megabytes* of table data."""
    admin = pg_session()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(
            "INSERT INTO assets (asset_id, name, is_enabled, is_processing, "
            "nocache, play_order, skip_asset_check, is_reachable, "
            "play_days, skip_ssl_verify, metadata) SELECT 'big' || n, "
            "(SELECT string_agg(md5(random()::text || n || g), '') FROM "
            "generate_series(1, 32) AS g), false, false, false, 0, false, "
            "true, '[1]', false, '{}' FROM generate_series(1, %s) AS n",
            [megabytes * 1024])
    admin.close()


def device_on(small, settings, host_env, pg_megabytes, data_too=False):
    """The live file on a small filesystem: the seeded database moved
    there, the child processes told so (*data_too*: the data dir with
    the profile state file and reports as well)."""
    if data_too:
        data = small / 'data'
        data.mkdir()
        settings.ANTHIAS_DATA_DIR = str(data)
        host_env = dict(host_env, ANTHIAS_DATA_DIR=str(data))
    seed_device(settings)
    grow_postgres(pg_megabytes)
    connections['sqlite'].close()
    live = small / 'anthias.db'
    shutil.copyfile(connections['sqlite'].settings_dict['NAME'], live)
    return live, dict(host_env, ANTHIAS_SQLITE_PATH=str(live))


def fill(folder, leave_bytes: int) -> None:
    """Fill *folder*'s filesystem, leaving about *leave_bytes* free (0:
    to the last byte, until the filesystem says ENOSPC)."""
    free = shutil.disk_usage(folder).free
    with open(folder / 'filler', 'wb') as fh:
        fh.write(b'\0' * max(0, free - leave_bytes))
    if leave_bytes == 0:
        n = 0
        while True:
            n += 1
            try:
                with open(folder / f'filler-{n}', 'wb') as fh:
                    fh.write(b'\0' * 512)
            except OSError:
                return


def assert_one_line(done) -> None:
    assert 'Traceback' not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.django_db(databases=ALL, transaction=True)
def test_the_new_file_is_sized_from_postgres_not_the_live_file(
        data_dir, settings, host_env, small_fs):
    small = small_fs('20m')
    live, env = device_on(small, settings, host_env, pg_megabytes=8)
    before = file_digest(live)
    done = run_manage(env, 'rollback_migration', '--emergency', '--yes',
                      '-v', '0')
    assert done.returncode == 1, done.stdout + done.stderr
    assert_one_line(done)
    assert 'not enough free disk' in done.stderr
    assert "PostgreSQL's table data" in done.stderr
    assert file_digest(live) == before
    assert profiles.resolve_active_profile(data_dir, {}).name == 'postgres'
    assert window_journal.window_state('postgres').fence == 'open'


@pytest.mark.django_db(databases=ALL, transaction=True)
@pytest.mark.parametrize(('point', 'code'), [
    ('window:fence-raised', 1),     # the build fills the disk
    ('swap:renamed', 4),            # the flip and the report cannot write
])
def test_a_disk_that_fills_mid_run_is_one_line(point, code, data_dir,
                                               settings, host_env,
                                               small_fs):
    small = small_fs('48m')
    # After the swap: the state file and reports on the full filesystem.
    live, env = device_on(small, settings, host_env, pg_megabytes=4,
                          data_too=code == 4)
    before = file_digest(live)
    flag = small.parent / 'paused.flag'
    env.update(ANTHIAS_ROLLBACK_PAUSE_AT=f'{point}:5',
               ANTHIAS_ROLLBACK_PAUSED_FLAG=str(flag))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / 'manage.py'), 'rollback_migration',
         '--emergency', '--yes', '--full', '-v', '0'], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fill(small, leave_bytes=0 if code == 4 else 64 * 1024)
    out, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert done.returncode == code, out + err
    assert_one_line(done)
    assert 'No space left on device' in err or 'disk is full' in err, err
    leftovers = [p.name for p in small.iterdir()
                 if p.name.startswith('anthias.db.rollback-new')]
    assert leftovers == []
    if code == 1:
        assert file_digest(live) == before
        assert window_journal.window_state('postgres').fence == 'open'
    else:
        assert file_digest(live) != before      # the new database is live
