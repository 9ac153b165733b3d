"""A seeded device for rollback tests: SQLite with data, a verified
backup, a migrated PostgreSQL holding the same rows, profile postgres."""
import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from django.contrib.auth.models import User
from django.db import connections

from anthias_app.models import Asset
from anthias_rollback import backup, conf, switch, transfer
from tests.helpers import pgserver
from tests.helpers.factories import AssetFactory, UserFactory


@dataclass
class Device:
    live: Path
    backup: Path
    asset_ids: list[str]
    usernames: list[str]


def seed_device(settings, n_assets: int = 30) -> Device:
    """Seed SQLite, back it up, copy to PostgreSQL, switch to it."""
    settings.ANTHIAS_PG_DUMP = str(pgserver.embedded_bin_dir() / 'pg_dump')
    live = Path(connections['sqlite'].settings_dict['NAME'])
    assets = AssetFactory.create_batch(n_assets)
    users = UserFactory.create_batch(3)
    made = backup.create_backup(live, conf.backup_dir())
    transfer.transfer_data('sqlite', 'postgres')
    switch.switch_profile('postgres', restart=False)
    return Device(live, made.path, [a.pk for a in assets],
                  [u.username for u in users])


def write_on_postgres(device: Device) -> dict[str, set]:
    """What production does after the cutover: create, change, delete.
    Returns the keys written (changed or created) per model label."""
    pg = 'postgres'
    changed_asset, deleted_asset = device.asset_ids[0], device.asset_ids[1]
    Asset.objects.using(pg).filter(pk=changed_asset).update(
        name='edited on PostgreSQL ✏️', metadata={'edited': True})
    Asset.objects.using(pg).filter(pk=deleted_asset).delete()
    new_asset = AssetFactory.build(name='created on PostgreSQL 🆕')
    new_asset.save(using=pg)
    user = User.objects.db_manager(pg).create_user('pg-user', 'p@x.org',
                                                   'pw')
    User.objects.using(pg).filter(username=device.usernames[0]).update(
        email='changed@example.org')
    changed_user = User.objects.using(pg).get(
        username=device.usernames[0])
    return {'anthias_app.Asset': {changed_asset, new_asset.pk},
            'auth.User': {user.pk, changed_user.pk},
            'deleted': {deleted_asset}}


def fingerprint_sqlite(path: Path) -> tuple:
    """Data of the live file, read with sqlite3 directly (not Django)."""
    conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        assert conn.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
        assets = conn.execute('SELECT asset_id, name, metadata FROM assets '
                              'ORDER BY asset_id').fetchall()
        users = conn.execute('SELECT id, username, email FROM auth_user '
                             'ORDER BY id').fetchall()
    finally:
        conn.close()
    return tuple(assets), tuple(users)


def fingerprint_postgres() -> tuple:
    import json

    with connections['postgres'].cursor() as cursor:
        cursor.execute('SELECT asset_id, name, metadata::text FROM assets '
                       'ORDER BY asset_id COLLATE "C"')
        assets = tuple((a, n, json.dumps(json.loads(m), sort_keys=True))
                       for a, n, m in cursor.fetchall())
        cursor.execute('SELECT id, username, email FROM auth_user '
                       'ORDER BY id')
        users = tuple(cursor.fetchall())
    return assets, users


def normalise(fp: tuple) -> tuple:
    import json

    assets, users = fp
    return (tuple(sorted((a, n, json.dumps(json.loads(m), sort_keys=True))
                         for a, n, m in assets)), tuple(users))


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def age_standby(data_dir: Path, seconds: float) -> None:
    """Make the real standby *seconds* behind, as if replicate_changes
    had stopped then: a write on PostgreSQL it lacks, journaled
    *seconds* ago (the lag is the age of the oldest write the standby
    lacks, on PostgreSQL's clock; one is made if none is pending), and
    its position stamped then."""
    from anthias_rollback.engines import postgres_journal as pj
    from anthias_rollback.window import standby as window_standby

    position = window_standby.read_position(
        window_standby.standby_path(data_dir))
    assert position is not None
    if not pj.postgres_pending_entries('postgres', position.snapshot):
        missed = AssetFactory.build(name='written while it was stopped')
        missed.save(using='postgres')
    with connections['postgres'].cursor() as cursor:
        cursor.execute(
            f"UPDATE {pj.JOURNAL} SET at = clock_timestamp() - "
            "make_interval(secs => %s) WHERE NOT pg_visible_in_snapshot("
            "txid, %s::pg_snapshot)", [seconds, position.snapshot])
    conn = sqlite3.connect(window_standby.standby_path(data_dir))
    try:
        with conn:
            conn.execute(f'UPDATE {window_standby.POSITION_TABLE} SET '
                         'position_ts = ?', [time.time() - seconds])
    finally:
        conn.close()


def spoil_table_root(path, table: str) -> None:
    """Give *table*'s root page in the SQLite file at *path* a byte no
    b-tree page type has: a page broken on disk, which quick_check (not
    a mere open) finds. The WAL is checkpointed first."""
    conn = sqlite3.connect(path)
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    page_size = conn.execute('PRAGMA page_size').fetchone()[0]
    root = conn.execute('SELECT rootpage FROM sqlite_master WHERE '
                        'name = ?', [table]).fetchone()[0]
    conn.close()
    with open(path, 'r+b') as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b'\x00')


def scratch_files(live: Path) -> list[str]:
    """Names of half-built rollback files beside *live* (none may stay
    after a run, killed or not)."""
    return [p.name for p in live.parent.iterdir()
            if '.rollback-new-' in p.name or '.dry-run-' in p.name]
