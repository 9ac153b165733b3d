"""backup.py on real SQLite files (no Django alias involved)."""
import json
import os
import shutil
import sqlite3
import stat
from datetime import UTC, datetime, timedelta

import pytest

from anthias_rollback import backup
from anthias_rollback.exceptions import BackupError
from tests.helpers import backup as bh


def final_names(folder):
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith('anthias_backup_'))


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def source(tmp_path):
    return bh.make_plain_db(tmp_path / 'live.db', rows=300)


def test_backup_is_verified_named_and_private(tmp_path, source):
    backups = tmp_path / 'backups'
    events = []
    before = source.read_bytes()
    result = backup.create_backup(source, backups, progress=events.append)
    assert source.read_bytes() == before
    assert result.path.name.startswith('anthias_backup_')
    assert result.path.name.endswith('.db')
    assert result.manifest_path == backup.manifest_path_for(result.path)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest['tool'] == 'anthias_rollback'
    assert manifest['row_counts'] == {'items': 300, 'parent': 1}
    assert manifest['sha256'] == result.sha256
    assert manifest['size'] == result.size == result.path.stat().st_size
    assert manifest['source_path'] == str(source)
    assert manifest['sqlite_version'] == sqlite3.sqlite_version
    assert datetime.fromisoformat(manifest['created_at']).tzinfo
    assert [(e.kind, e.name) for e in events] == [
        ('phase-start', 'copy'), ('phase-start', 'verify'),
        ('phase-done', 'backup')]
    assert events[0].detail == str(source)
    assert events[-1].detail == str(result.path)
    # Modes: files 0600, the dir it created 0700; no temp files left.
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(result.manifest_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in backups.iterdir()) == [
        result.path.name, result.manifest_path.name]
    # One self-contained file: rollback journal, not WAL.
    assert result.path.read_bytes()[18:20] == b'\x01\x01'
    check = backup.verify_backup(result.path)
    assert check.valid and check.state == 'verified', check.reasons
    assert check.row_counts == manifest['row_counts']


def test_existing_backup_dir_keeps_its_mode(tmp_path, source):
    backups = tmp_path / 'shared'
    backups.mkdir(mode=0o750)
    backups.chmod(0o750)
    backup.create_backup(source, backups)
    assert stat.S_IMODE(backups.stat().st_mode) == 0o750


def test_same_second_gets_a_suffix_never_overwrites(tmp_path, source):
    backups = tmp_path / 'b'
    first = backup.create_backup(source, backups)
    stamp = first.path.name[len('anthias_backup_'):-3]
    # Occupy the next names too, as if several backups shared a second.
    taken = backups / f'anthias_backup_{stamp}_1.db'
    taken.write_bytes(b'someone else')
    results = [backup.create_backup(source, backups) for _ in range(2)]
    names = {r.path.name for r in results} | {first.path.name}
    assert len(names) == 3
    assert taken.read_bytes() == b'someone else'
    assert first.path.read_bytes()  # untouched
    assert backup.verify_backup(first.path).valid


def test_manifest_records_django_migrations(tmp_path, source):
    conn = sqlite3.connect(source)
    conn.execute('CREATE TABLE django_migrations (id INTEGER PRIMARY KEY, '
                 'app TEXT, name TEXT, applied TEXT)')
    conn.execute("INSERT INTO django_migrations (app, name, applied) "
                 "VALUES ('auth', '0001_initial', 'now')")
    conn.commit()
    conn.close()
    result = backup.create_backup(source, tmp_path / 'b')
    assert result.manifest['migrations'] == ['auth.0001_initial']
    # A backup whose migrations no longer match its manifest is invalid.
    manifest = dict(result.manifest, migrations=['auth.0002_other'])
    result.manifest_path.write_text(json.dumps(manifest))
    reasons = backup.verify_backup(result.path).reasons
    assert reasons == ('applied migrations differ from the manifest',)


def test_concurrent_writer_every_backup_is_an_exact_snapshot(tmp_path):
    db = bh.make_writer_db(tmp_path / 'live.db')
    log = tmp_path / 'writer.log'
    backups = tmp_path / 'backups'
    writer = bh.start_writer(db, log)
    results = []
    try:
        for _ in range(6):
            _, before = bh.committed(log)
            result = backup.create_backup(db, backups)
            _, _, begun_after = bh.read_log(log)
            results.append((result, before, begun_after))
    finally:
        bh.stop_writer(writer)
    done, _, _ = bh.read_log(log)
    seen = set()
    for result, before, begun_after in results:
        assert backup.verify_backup(result.path).valid
        groups, counter = bh.backup_content(result.path)
        last = max(groups)
        # Every transaction committed before the backup began is in it;
        # nothing begun after it ended; exactly the committed ones between.
        assert before <= last <= begun_after
        assert set(groups) == {s for s in done if s <= last}
        assert counter == last
        for seq, rows in groups.items():
            assert rows == [(p, bh.payload(seq, p))
                            for p in range(bh.PARTS)]
        seen.add(last)
    assert len(seen) > 1  # the writer really moved on between backups
    # ...and committed while at least one backup was running.
    assert any(after - before > 2 for _, before, after in results)


def test_plain_copy_without_wal_loses_rows(tmp_path):
    """The failure the backup API prevents: a file copy misses the WAL."""
    db = bh.make_writer_db(tmp_path / 'live.db')
    log = tmp_path / 'writer.log'
    writer = bh.start_writer(db, log, autocheckpoint=0)
    try:
        result = backup.create_backup(db, tmp_path / 'backups')
    finally:
        bh.stop_writer(writer)
    done, _, _ = bh.read_log(log)
    copy = tmp_path / 'copy.db'
    shutil.copyfile(db, copy)
    copied, _ = bh.backup_content(copy)
    backed_up, _ = bh.backup_content(result.path)
    assert len(copied) < len(backed_up)
    assert set(backed_up) <= done and len(backed_up) >= 20


def test_missing_source(tmp_path):
    with pytest.raises(BackupError, match='does not exist'):
        backup.create_backup(tmp_path / 'nope.db', tmp_path / 'b')
    assert not final_names(tmp_path / 'b')


@pytest.mark.parametrize('content', [b'', b'hello, not a database' * 50,
                                     os.urandom(8192)])
def test_not_sqlite_or_garbage_or_encrypted(tmp_path, content):
    bad = tmp_path / 'bad.db'
    bad.write_bytes(content)
    with pytest.raises(BackupError, match='not a SQLite database'):
        backup.create_backup(bad, tmp_path / 'b')
    assert bad.read_bytes() == content
    assert not final_names(tmp_path / 'b')


def test_damaged_source_is_refused_and_nothing_kept(tmp_path, source):
    conn = sqlite3.connect(source)
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.close()
    data = bytearray(source.read_bytes())
    page = 4096
    data[3 * page + 100:3 * page + 400] = os.urandom(300)
    source.write_bytes(bytes(data))
    with pytest.raises(BackupError) as excinfo:
        backup.create_backup(source, tmp_path / 'b')
    assert 'no backup was kept' in str(excinfo.value)
    assert os.listdir(tmp_path / 'b') == []


def test_locked_past_timeout(tmp_path):
    source = bh.make_plain_db(tmp_path / 'live.db', wal=False)
    before = source.read_bytes()
    holder = sqlite3.connect(source, isolation_level=None)
    holder.execute('BEGIN EXCLUSIVE')
    try:
        with pytest.raises(BackupError,
                           match=r'locked for more than 0\.3s'):
            backup.create_backup(source, tmp_path / 'b', timeout=0.3)
    finally:
        holder.execute('ROLLBACK')
        holder.close()
    assert os.listdir(tmp_path / 'b') == []
    assert source.read_bytes() == before


def test_unwritable_backup_dir(readonly_dir, source):
    with pytest.raises(BackupError, match='not writable'):
        backup.create_backup(source, readonly_dir)
    assert os.listdir(readonly_dir) == []


def test_disk_full_part_way_leaves_no_final_file(tmp_path, small_fs):
    source = bh.make_plain_db(tmp_path / 'live.db', rows=3000)
    assert source.stat().st_size > 1_000_000
    backups = small_fs('512k')
    with pytest.raises(BackupError) as excinfo:
        backup.create_backup(source, backups)
    assert 'full' in str(excinfo.value)
    assert os.listdir(backups) == []  # temp file removed as well
    assert sqlite3.connect(source).execute(
        'SELECT count(*) FROM items').fetchone()[0] == 3000


def test_byte_flip_fails_on_the_checksum(tmp_path, source):
    result = backup.create_backup(source, tmp_path / 'b')
    flip_byte(result.path)
    check = backup.verify_backup(result.path)
    assert not check.valid and check.state == 'invalid'
    assert 'sha256 checksum mismatch' in check.reasons[0]


def test_truncated_backup_is_invalid(tmp_path, source):
    result = backup.create_backup(source, tmp_path / 'b')
    size = result.path.stat().st_size
    with open(result.path, 'r+b') as fh:
        fh.truncate(size // 2)
    check = backup.verify_backup(result.path)
    assert not check.valid
    assert 'sha256' in check.reasons[0]
    assert any('size mismatch' in r for r in check.reasons)
    assert len(check.reasons) >= 3  # SQLite sees the damage too


def test_backup_without_manifest_is_checked_but_unverified(tmp_path,
                                                           source):
    result = backup.create_backup(source, tmp_path / 'b')
    result.manifest_path.unlink()
    check = backup.verify_backup(result.path)
    assert not check.valid and not check.has_manifest
    assert check.state == 'unverified'
    expected = (f'no manifest ({result.manifest_path.name}): '
                'checked as far as possible, unverified')
    assert check.reasons == (expected,)
    assert check.row_counts == {'items': 300, 'parent': 1}


def test_manifest_from_another_tool_or_garbled(tmp_path, source):
    result = backup.create_backup(source, tmp_path / 'b')
    result.manifest_path.write_text(json.dumps({'tool': 'dbbackup'}))
    check = backup.verify_backup(result.path)
    assert not check.valid and check.has_manifest
    assert 'another tool (dbbackup)' in check.reasons[0]
    result.manifest_path.write_text('{not json')
    assert 'not valid JSON' in backup.verify_backup(result.path).reasons[0]


def test_unreadable_manifest_or_path_cannot_be_checked(tmp_path, source):
    result = backup.create_backup(source, tmp_path / 'b')
    with pytest.raises(BackupError, match='does not exist|cannot read'):
        backup.verify_backup(tmp_path / 'missing.db')
    with pytest.raises(BackupError, match='is a directory'):
        backup.verify_backup(tmp_path)
    result.manifest_path.unlink()
    result.manifest_path.mkdir()
    with pytest.raises(BackupError, match='cannot read manifest'):
        backup.verify_backup(result.path)


def _age(result, days):
    """Pretend *result* was made *days* ago (manifest still matches)."""
    manifest = dict(result.manifest)
    created = datetime.now(UTC) - timedelta(days=days)
    manifest['created_at'] = created.isoformat()
    result.manifest_path.write_text(json.dumps(manifest))


def test_list_newest_first(tmp_path, source):
    backups = tmp_path / 'b'
    made = [backup.create_backup(source, backups) for _ in range(3)]
    for days, result in zip((3, 2, 1), made):
        _age(result, days)
    flip_byte(made[2].path)
    infos = backup.list_backups(backups, verify=True)
    assert [i.path for i in infos] == [r.path for r in reversed(made)]
    assert [i.state for i in infos] == ['invalid', 'verified', 'verified']
    assert infos[1].row_counts == {'items': 300, 'parent': 1}
    assert backup.latest_verified_backup(backups).path == made[1].path
    assert backup.list_backups(tmp_path / 'none') == []


def test_retention_keeps_newest_verified_even_if_old(tmp_path, source):
    backups = tmp_path / 'b'
    made = [backup.create_backup(source, backups) for _ in range(4)]
    for days, result in zip((40, 30, 20, 0), made):
        _age(result, days)
    flip_byte(made[3].path)  # the only recent backup is corrupt
    stale_tmp = backups / '.anthias_backup_crashed.db.tmp'
    stale_tmp.write_bytes(b'x')
    os.utime(stale_tmp, (0, 0))
    removed = backup.apply_retention(backups, days=7)
    assert set(removed) == {made[0].path, made[0].manifest_path,
                            made[1].path, made[1].manifest_path, stale_tmp}
    assert made[2].path.exists()  # newest verified, 20 days old: kept
    assert made[3].path.exists()  # recent (corrupt, but within limit)
    # Nothing verified any more: old corrupt backups go as well...
    flip_byte(made[2].path)
    assert backup.apply_retention(backups, days=7) == [made[2].path,
                                                       made[2].manifest_path]
    # ...but never the newest one, however old: it may still hold rows
    # that exist nowhere else.
    _age(made[3], 30)
    assert backup.apply_retention(backups, days=7) == []
    assert made[3].path.exists()


def test_a_backup_made_with_the_clock_ahead_is_not_newest(tmp_path, source):
    """The device's clock ran two days ahead for one backup (no RTC, a
    manual set): the backup made after the clock was fixed is newer, and
    is the one a rollback must take."""
    backups = tmp_path / 'b'
    ahead = backup.create_backup(source, backups)
    manifest = json.loads(ahead.manifest_path.read_text())
    manifest['created_at'] = (datetime.now(UTC)
                              + timedelta(days=2)).isoformat()
    ahead.manifest_path.write_text(json.dumps(manifest))
    fixed = backup.create_backup(source, backups)
    infos = backup.list_backups(backups)
    assert [i.path for i in infos] == [fixed.path, ahead.path]
    assert backup.latest_verified_backup(backups).path == fixed.path
    assert [backup.manifest_sequence(i.manifest) for i in infos] == [2, 1]
