"""Composite primary keys (Django 5.2 CompositePrimaryKey) in the
rollback window, on real files, the real PostgreSQL and real processes:
the journal records a row's key tuple, the standby and the incremental
rollback apply inserts, updates, deletes and key changes row by row, and
export_unapplied_writes lists them by key tuple and exports a fixture
that loaddata restores.

The model (tests.kitchensink Shelf, key (aisle, order), 'order' a
reserved word, table Kitchensink_Shelf: mixed case) exists only in a
run with ANTHIAS_TEST_COMPOSITE=1: in the ordinary suite one test
starts that run of this file in a child pytest (its own PostgreSQL
server and databases) and fails with it.
Every comparison here is tests/helpers/raw_tables' (sqlite3 against
psycopg2), never the tool's own compare."""
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

COMPOSITE = os.environ.get('ANTHIAS_TEST_COMPOSITE') == '1'
TABLE = 'Kitchensink_Shelf'
QUOTED = f'"{TABLE}"'


if not COMPOSITE:
    def test_composite_keys_in_a_run_that_has_the_model(tmp_path):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(('ANTHIAS_', 'DJANGO_', 'PYTEST_'))}
        env['ANTHIAS_TEST_COMPOSITE'] = '1'
        env['ANTHIAS_TEST_RUN_DIR'] = str(tmp_path)
        done = subprocess.run(
            [sys.executable, '-m', 'pytest', __file__, '-q',
             '-p', 'no:cacheprovider'],
            env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=1500, check=False)
        summary = done.stdout.strip().splitlines()[-1:] or ['']
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert re.search(r'\b6 passed\b', summary[0]), summary
        assert 'skipped' not in summary[0] and 'failed' not in summary[0]


if COMPOSITE:
    from django.db import connections

    from anthias_rollback.engines import postgres_journal as pj
    from anthias_rollback.window import replicator as window_replicator
    from anthias_rollback.window import standby as window_standby
    from tests.conftest import postgres_stopped, postgres_url_for, run_manage
    from tests.helpers import raw_tables
    from tests.helpers.rollback import seed_device
    from tests.kitchensink.models import Shelf

    ALL = ['default', 'sqlite', 'postgres']
    PG = 'postgres'

    def seed_shelves(settings, n_assets: int = 3):
        """Shelves on SQLite ((a|b|c), 1..5: the same 'order' in several
        aisles), then the seeded device switched to PostgreSQL."""
        Shelf.objects.using('sqlite').bulk_create([
            Shelf(aisle=a, order=o, label=f'{a}{o}',
                  blob=bytes([o, 0, o]) if o % 2 else None)
            for a in 'abc' for o in range(1, 6)])
        return seed_device(settings, n_assets=n_assets)

    def composite_writes() -> None:
        """Insert, update, delete, delete then reinsert, a changed key
        (one component only), all on rows whose single components
        repeat across keys."""
        Shelf.objects.using(PG).create(aisle='new', order=1, label='new 🆕',
                                       blob=b'\x00\x01')
        Shelf.objects.using(PG).filter(pk=('a', 1)).update(
            label='edited ✏️')
        Shelf.objects.using(PG).filter(pk=('a', 2)).delete()
        Shelf.objects.using(PG).filter(pk=('b', 3)).delete()
        Shelf.objects.using(PG).create(aisle='b', order=3, label='reborn')
        with connections[PG].cursor() as cursor:
            cursor.execute(f'UPDATE {QUOTED} SET "order" = 50 WHERE '
                           "aisle = 'c' AND \"order\" = 4")

    def shelves(path: Path) -> dict[tuple, str]:
        conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
        try:
            return {(a, o): label for a, o, label in conn.execute(
                f'SELECT aisle, "order", label FROM {QUOTED}')}
        finally:
            conn.close()

    def assert_equal_to_postgres(path: Path) -> None:
        diff = raw_tables.compare_all(path, postgres_url_for(PG))
        assert diff.differing == {}, diff.differing
        assert TABLE in diff.compared

    def assert_writes_there(path: Path) -> None:
        rows = shelves(path)
        assert rows[('new', 1)] == 'new 🆕'
        assert rows[('a', 1)] == 'edited ✏️'
        assert ('a', 2) not in rows
        assert rows[('b', 3)] == 'reborn'
        assert ('c', 4) not in rows and rows[('c', 50)] == 'c4'
        assert rows[('a', 4)] == 'a4' and rows[('b', 4)] == 'b4'

    @pytest.mark.django_db(databases=ALL, transaction=True)
    def test_the_journal_records_each_key_tuple(data_dir, settings):
        seed_shelves(settings)
        with connections[PG].cursor() as cursor:
            cursor.execute(f'SELECT count(*) FROM {QUOTED}')
            assert cursor.fetchone()[0] == 15
            cursor.execute(f'SELECT min(id) FROM {pj.JOURNAL}')
            start = cursor.fetchone()[0] or 0
        composite_writes()
        with connections[PG].cursor() as cursor:
            cursor.execute(f'SELECT op, pk FROM {pj.JOURNAL} WHERE tbl = '
                           '%s AND id >= %s ORDER BY id', [TABLE, start])
            entries = [(op, json.loads(pk)) for op, pk in cursor.fetchall()]
        assert entries == [('I', ['new', 1]), ('U', ['a', 1]),
                           ('D', ['a', 2]), ('D', ['b', 3]),
                           ('I', ['b', 3]), ('D', ['c', 4]),
                           ('I', ['c', 50])]

    @pytest.mark.django_db(databases=ALL, transaction=True)
    def test_composite_key_writes_reach_the_standby(data_dir, settings):
        seed_shelves(settings)
        window_replicator.run_replicator(PG, data_dir=data_dir, once=True)
        standby = window_standby.standby_path(data_dir)
        assert_equal_to_postgres(standby)
        composite_writes()
        result = window_replicator.run_replicator(PG, data_dir=data_dir,
                                                  once=True)
        assert result.entries >= 7
        assert_writes_there(standby)
        assert_equal_to_postgres(standby)
        # A key changed back and a row deleted in one transaction.
        with connections[PG].cursor() as cursor:
            cursor.execute(f'UPDATE {QUOTED} SET "order" = 4 WHERE '
                           "aisle = 'c' AND \"order\" = 50")
            cursor.execute(f"DELETE FROM {QUOTED} WHERE aisle = 'new'")
        window_replicator.run_replicator(PG, data_dir=data_dir, once=True)
        rows = shelves(standby)
        assert rows[('c', 4)] == 'c4' and ('new', 1) not in rows
        assert_equal_to_postgres(standby)

    @pytest.mark.django_db(databases=ALL, transaction=True)
    def test_the_incremental_rollback_applies_them(data_dir, settings,
                                                   host_env):
        device = seed_shelves(settings)
        composite_writes()
        # The window's PostgreSQL, as the rollback leaves it (fenced).
        connections['sqlite'].close()
        done = run_manage(host_env, 'rollback_migration', '--emergency')
        assert done.returncode == 0, done.stdout + done.stderr
        assert ('copy:          incremental: cutover file (promoted in '
                'place, not copied) as of') in done.stdout, done.stdout
        # Read back key tuple by key tuple, not left to the row counts.
        assert '6 changed key(s) re-read and checked equal' in done.stdout
        assert 'not compared key by key' not in done.stdout
        assert 'data loss: none (proven' in done.stdout.splitlines()[-1]
        assert_writes_there(device.live)
        assert_equal_to_postgres(device.live)

    @pytest.mark.django_db(databases=ALL, transaction=True)
    def test_a_standby_with_stale_composite_rows_is_caught(
            data_dir, settings, host_env):
        """The standby applied the writes, then two of those rows went
        back to stale values while its position stayed: the key tuples
        it applied are re-read against PostgreSQL, so the full copy is
        taken and the result is PostgreSQL's."""
        device = seed_shelves(settings)
        window_replicator.run_replicator(PG, data_dir=data_dir, once=True)
        composite_writes()
        window_replicator.run_replicator(PG, data_dir=data_dir, once=True)
        conn = sqlite3.connect(window_standby.standby_path(data_dir))
        with conn:
            conn.execute(f"UPDATE {QUOTED} SET label = 'stale' WHERE "
                         "(aisle = 'a' AND \"order\" = 1) OR aisle = 'new'")
        conn.close()
        Shelf.objects.using(PG).filter(pk=('b', 1)).update(
            label='in the tail')
        connections['sqlite'].close()
        done = run_manage(host_env, 'rollback_migration', '--emergency')
        assert done.returncode == 0, done.stdout + done.stderr
        assert 'copy:          full: 2 changed key(s) did not read back ' \
            'equal' in done.stdout, done.stdout
        assert "kitchensink.Shelf pk=('a', 1)" in done.stdout + done.stderr
        assert 'data loss: none (proven' in done.stdout.splitlines()[-1]
        assert_writes_there(device.live)
        assert shelves(device.live)[('b', 1)] == 'in the tail'
        assert_equal_to_postgres(device.live)

    @pytest.mark.django_db(databases=ALL, transaction=True)
    def test_unapplied_writes_are_listed_by_key_tuple_and_exported(
            data_dir, settings, host_env):
        device = seed_shelves(settings)
        window_replicator.run_replicator(PG, data_dir=data_dir, once=True)
        composite_writes()
        connections['sqlite'].close()
        with postgres_stopped():
            done = run_manage(host_env, 'rollback_migration', '--emergency')
        assert done.returncode == 4, done.stdout + done.stderr
        assert 'source:        standby' in done.stdout
        assert ('a', 1) in shelves(device.live)
        assert shelves(device.live)[('a', 1)] == 'a1'   # the standby's

        done = run_manage(host_env, 'export_unapplied_writes')
        assert done.returncode == 3, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        label = 'kitchensink.Shelf'
        for key, op in ((['new', 1], 'insert'), (['a', 1], 'update'),
                        (['a', 2], 'delete'), (['b', 3], 'delete'),
                        (['b', 3], 'insert'), (['c', 4], 'delete'),
                        (['c', 50], 'insert')):
            line = f'  {label} pk={json.dumps(key)} {op}'
            assert line in lines, (line, lines)
        fixture = re.search(r'exported to (\S+) \(loaddata',
                            lines[-1]).group(1)
        exported = json.loads(Path(fixture).read_text())
        keys = {tuple(o['pk']) for o in exported
                if o['model'] == 'kitchensink.shelf'}
        assert keys == {('new', 1), ('a', 1), ('b', 3), ('c', 50)}
        loaded = run_manage(host_env, 'loaddata', fixture, '--database',
                            'sqlite')
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        rows = shelves(device.live)
        assert rows[('a', 1)] == 'edited ✏️'
        assert rows[('new', 1)] == 'new 🆕'
        assert rows[('b', 3)] == 'reborn' and rows[('c', 50)] == 'c4'

    @pytest.mark.django_db(databases=ALL, transaction=True)
    def test_a_composite_table_made_in_the_window_is_journaled_by_key(
            data_dir, settings):
        seed_device(settings, n_assets=3)      # no shelves yet
        window_replicator.run_replicator(PG, data_dir=data_dir, once=True)
        # The (empty) table made again mid-window (the DDL `migrate` runs): the
        # event trigger gives it a row trigger keyed by the tuple.
        with connections[PG].cursor() as cursor:
            cursor.execute(f'DROP TABLE {QUOTED}')
        with connections[PG].schema_editor() as editor:
            editor.create_model(Shelf)
        with connections[PG].cursor() as cursor:
            cursor.execute(f'SELECT max(id) FROM {pj.JOURNAL}')
            start = cursor.fetchone()[0] or 0
        Shelf.objects.using(PG).create(aisle='z', order=7, label='made')
        Shelf.objects.using(PG).create(aisle='z', order=8, label='gone')
        Shelf.objects.using(PG).filter(pk=('z', 8)).delete()
        with connections[PG].cursor() as cursor:
            cursor.execute(f'SELECT op, pk FROM {pj.JOURNAL} WHERE tbl = '
                           '%s AND id > %s ORDER BY id', [TABLE, start])
            entries = [(op, pk and json.loads(pk))
                       for op, pk in cursor.fetchall()]
        assert entries == [('I', ['z', 7]), ('I', ['z', 8]),
                           ('D', ['z', 8])]
        window_replicator.run_replicator(PG, data_dir=data_dir, once=True)
        standby = window_standby.standby_path(data_dir)
        assert shelves(standby) == {('z', 7): 'made'}
        assert_equal_to_postgres(standby)
