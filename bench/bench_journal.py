"""Benchmark: what the rollback window's change journal and write fence
cost on PostgreSQL. A script, not a test:

    python -m bench.bench_journal                  # the defaults below
    python -m bench.bench_journal --repeat 5 --sizes 1000 --writes 2000

1. Journal write overhead: in a child process (django.setup() on the
   reference host's settings), through the ORM on the postgres alias in
   autocommit, N single-row writes the way an app makes them (create an
   Asset, rename it, delete every 5th), one bulk_create of 1,000 rows
   and one .update() of 10,000 rows; once without the journal, once with
   it (window_journal.open_window), modes alternating across --repeat.
2. Fence and proof: with the journal installed and N assets loaded
   (TRUNCATE + COPY FREEZE, as migrate_to_postgres loads), the time of
   take_fence (no writer; one idle-in-transaction writer that commits
   after 0.5 s), opening the snapshot transaction, prove_copy (and its
   parts: journal query, one xmin scan + count per table) and lower_fence.

Medians of --repeat runs, all measured in one sitting. PostgreSQL:
ANTHIAS_BENCH_POSTGRES_URL if set (a local server only), else an
embedded one on a unix socket.
"""
import argparse
import csv
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_migrate import (
    host_env,
    manage,
    postgres_server_url,
    psycopg_connect,
    run_measured,
    with_database,
)
from bench.seed import ASSET_COLUMNS, OUT, asset_rows, make_sqlite, median

WRITES_DB = 'anthias_bench_journal'
FENCE_DB = 'anthias_bench_fence'
BASE_ROWS = 10_000        # rows the batch .update() rewrites
BULK_ROWS = 1_000
BATCH_REPS = 3            # batch samples per child run
WRITER_HOLD = 0.5         # seconds the idle writer keeps its transaction
FENCE_TIMEOUT = 10.0
JOURNAL_ROWS = 10_000     # journaled writes made before the fence
RESULT = 'RESULT '


# --------------------------------------------------------------- server

def check_local(url: str) -> None:
    """Refuse anything but a unix socket or loopback server."""
    parts = urllib.parse.urlsplit(url)
    host = dict(urllib.parse.parse_qsl(parts.query)).get('host') \
        or parts.hostname or ''
    if not (host.startswith('/') or host in ('localhost', '127.0.0.1',
                                             '::1')):
        raise SystemExit(f'bench_journal runs against a local server '
                         f'only, not host {host!r}')


def recreate(server_url: str, name: str) -> str:
    conn = psycopg_connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS {name}')
        cursor.execute(f'CREATE DATABASE {name}')
    conn.close()
    return with_database(server_url, name)


def drop(server_url: str, name: str) -> None:
    conn = psycopg_connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS {name}')
    conn.close()


def server_facts(url: str) -> dict:
    conn = psycopg_connect(url)
    facts = {}
    with conn.cursor() as cursor:
        for name in ('server_version', 'fsync', 'synchronous_commit',
                     'shared_buffers', 'data_checksums'):
            cursor.execute(f'SHOW {name}')
            facts[name] = cursor.fetchone()[0]
    conn.close()
    return facts


class _CsvStream(io.RawIOBase):
    """asset_rows as a CSV file object for copy_expert, made on the fly
    (the client generates while the server ingests: 2 cores)."""

    def __init__(self, n: int):
        self._rows = asset_rows(n)
        self._buffer = b''

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        text = io.StringIO()
        writer = csv.writer(text)
        while len(self._buffer) + text.tell() < max(size, 1 << 16):
            row = next(self._rows, None)
            if row is None:
                break
            writer.writerow(row)
        self._buffer += text.getvalue().encode()
        if size < 0:
            size = len(self._buffer)
        chunk, self._buffer = self._buffer[:size], self._buffer[size:]
        return chunk


def load_assets(url: str, n: int, freeze: bool) -> float:
    """TRUNCATE + COPY *n* seeded assets in one transaction (FREEZE, as
    migrate_to_postgres does), then VACUUM ANALYZE; seconds taken."""
    started = time.perf_counter()
    conn = psycopg_connect(url)
    with conn.cursor() as cursor:
        cursor.execute('TRUNCATE assets')
        cursor.copy_expert(
            f'COPY assets ({", ".join(ASSET_COLUMNS)}) FROM STDIN WITH '
            f'(FORMAT csv{", FREEZE" if freeze else ""})', _CsvStream(n),
            size=1 << 16)
    conn.commit()
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute('VACUUM ANALYZE assets')
    conn.close()
    return time.perf_counter() - started


def migrated_database(server_url: str, name: str, env_base: dict) -> dict:
    url = recreate(server_url, name)
    env = dict(env_base, ANTHIAS_POSTGRES_URL=url)
    run_measured(manage('migrate', '--database', 'postgres', '-v0'), env)
    return env


def run_child(env: dict, *args: str) -> dict:
    _, _, out = run_measured(
        [sys.executable, '-m', 'bench.bench_journal', *args], env)
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f'child {args} printed no result:\n'
                           f'{out[-3000:]}')
    return json.loads(lines[-1][len(RESULT):])


# ------------------------------------------------------ child: writes

def _write_loop(alias: str, n: int, tag: str) -> float:
    """*n* single-row autocommit writes; seconds."""
    from anthias_app.models import Asset

    writes = i = 0
    started = time.perf_counter()
    while writes < n:   # every pass makes at least one write
        asset = Asset.objects.using(alias).create(
            asset_id=f'zw-{tag}-{i}', name=f'bench {i}',
            uri=f'https://cdn.example.com/{i}.mp4', mimetype='video',
            metadata={'n': i})
        writes += 1
        if writes < n:
            asset.name = f'bench {i} renamed'
            asset.save(using=alias, update_fields=['name'])
            writes += 1
        if i % 5 == 0 and writes < n:
            asset.delete(using=alias)
            writes += 1
        i += 1
    return time.perf_counter() - started


def _clean(alias: str) -> None:
    """Back to the BASE_ROWS seeded rows (hex ids: never "z..."), dead
    tuples vacuumed."""
    from django.db import connections

    from anthias_app.models import Asset

    Asset.objects.using(alias).filter(asset_id__startswith='z').delete()
    with connections[alias].cursor() as cursor:
        cursor.execute('VACUUM ANALYZE assets')


def child_writes(mode: str, n: int, tag: str) -> dict:
    import django

    django.setup()
    from django.db.models import F

    from anthias_app.models import Asset
    from anthias_rollback import profiles
    from anthias_rollback.engines import postgres_journal as pj
    from anthias_rollback.window import journal as window_journal

    alias = profiles.POSTGRES
    if pj.postgres_journal_installed(alias):
        window_journal.end_window(alias)
    if mode == 'journal':
        window_journal.open_window(profiles.SQLITE, alias)
    _clean(alias)
    _write_loop(alias, 50, f'{tag}-warm')      # connection, ORM caches
    _clean(alias)
    result = {'mode': mode, 'writes_s': _write_loop(alias, n, tag),
              'bulk_s': [], 'update_s': []}
    for rep in range(BATCH_REPS):
        _clean(alias)
        objs = [Asset(asset_id=f'zb-{tag}-{rep}-{j}', name=f'bulk {j}',
                      mimetype='image', metadata={'j': j})
                for j in range(BULK_ROWS)]
        started = time.perf_counter()
        Asset.objects.using(alias).bulk_create(objs)
        result['bulk_s'].append(time.perf_counter() - started)
        _clean(alias)
        started = time.perf_counter()
        done = Asset.objects.using(alias).update(
            play_order=F('play_order') + 1)
        result['update_s'].append(time.perf_counter() - started)
        assert done == BASE_ROWS, done
    if mode == 'journal':
        result['journal_entries'] = window_journal.window_state(alias).entries
        window_journal.end_window(alias)
    _clean(alias)
    return result


# ------------------------------------------------------- child: fence

def _hold_write(alias: str, pk: str, ready: threading.Event,
                errors: list) -> None:
    """An app thread mid-transaction: one journaled write, then idle in
    transaction for WRITER_HOLD seconds, then commit."""
    from django.db import DatabaseError, connections, transaction

    from anthias_app.models import Asset

    try:
        with transaction.atomic(using=alias):
            Asset.objects.using(alias).filter(pk=pk).update(name='held')
            ready.set()
            time.sleep(WRITER_HOLD)
    except DatabaseError as err:   # the parent fails on it
        errors.append(repr(err))
    finally:
        ready.set()
        connections[alias].close()


def _prove_parts(alias: str, snapshot: str, copied: dict) -> dict:
    """prove_copy's reads, timed one by one (same calls; *copied*
    is what prove_copy compares the counts with)."""
    from anthias_rollback import models_graph
    from anthias_rollback.engines import postgres_journal as pj

    plan = models_graph.plan_models().models
    times = {}
    started = time.perf_counter()
    pj.postgres_changes_after(alias, snapshot)
    times['journal query'] = time.perf_counter() - started
    # One pass per table since the count and the xmin scan were merged.
    scans = 0.0
    for model in plan:
        started = time.perf_counter()
        pj.postgres_table_after(alias, model._meta.db_table,
                                model._meta.pk.column, snapshot)
        took = time.perf_counter() - started
        scans += took
        if model._meta.db_table == 'assets':
            times['xmin scan + count, assets'] = took
    times['xmin scan + count, all tables'] = scans
    return times


def _counts(alias: str) -> dict:
    from anthias_rollback import models_graph

    return {m._meta.label: m._base_manager.using(alias).count()
            for m in models_graph.plan_models().models}


def _sanity(alias: str, n: int) -> list[str]:
    """Untimed checks that the fence and the proof do their job."""
    from django.db import DatabaseError, connections

    from anthias_app.models import Asset
    from anthias_rollback.window import journal as window_journal

    problems = []
    taken = window_journal.take_fence(alias, FENCE_TIMEOUT)
    try:
        Asset.objects.using(alias).create(asset_id='fenced', name='x')
        problems.append('a write went through the raised fence')
    except DatabaseError as err:
        if 'fenced' not in str(err):
            problems.append(f'fenced write failed oddly: {err!r}')
    connections[alias].close()
    window_journal.lower_fence(alias)
    if not taken.taken:
        problems.append(f'take_fence not taken: {taken}')
    with window_journal.snapshot_transaction(alias) as snapshot:
        copied = _counts(alias)
    pk = Asset.objects.using(alias).values_list('pk', flat=True).first()
    Asset.objects.using(alias).create(asset_id='after-1', name='new')
    Asset.objects.using(alias).filter(pk=pk).update(name='changed')
    with connections[alias].cursor() as cursor:
        # PostgreSQL: replica role skips ordinary triggers (superuser
        # only): a write the journal misses, for the xmin check.
        cursor.execute('SET session_replication_role = replica')
        cursor.execute("UPDATE assets SET name = 'bypass' WHERE asset_id "
                       '= (SELECT max(asset_id) FROM assets)')
        cursor.execute('SET session_replication_role = DEFAULT')
    proof = window_journal.prove_copy(alias, snapshot, copied)
    got = {(w.pk, w.operation) for w in proof.lost}
    want = {('after-1', 'insert'), (pk, 'update')}
    if not want <= got:
        problems.append(f'proof missed journaled writes: {proof.lost}')
    if not any(op == 'write' for _, op in got):
        problems.append(f'xmin scan missed the trigger-less write: '
                        f'{proof.lost}')
    if proof.count_differences.get('anthias_app.Asset') != (n, n + 1):
        problems.append(f'count difference wrong: '
                        f'{proof.count_differences}')
    return problems


def child_fence(n: int, repeat: int) -> dict:
    import django

    django.setup()
    from django.db.models import F

    from anthias_app.models import Asset
    from anthias_rollback import profiles
    from anthias_rollback.window import journal as window_journal

    alias = profiles.POSTGRES
    window_journal.open_window(profiles.SQLITE, alias)
    # Journaled app writes made during the window, before the fence.
    pks = list(Asset.objects.using(alias).values_list('pk', flat=True)
               [:JOURNAL_ROWS])
    Asset.objects.using(alias).filter(pk__in=pks).update(
        play_order=F('play_order') + 1)
    total = Asset.objects.using(alias).count()
    steps: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        steps.setdefault(name, []).append(seconds)

    for rep in range(repeat + 1):          # run 0 warms caches, dropped
        record = add if rep else (lambda name, seconds: None)
        started = time.perf_counter()
        result = window_journal.take_fence(alias, FENCE_TIMEOUT)
        record('take_fence, no writer', time.perf_counter() - started)
        assert result.taken, result
        started = time.perf_counter()
        window_journal.lower_fence(alias)
        record('lower_fence', time.perf_counter() - started)

        ready, errors = threading.Event(), []
        writer = threading.Thread(target=_hold_write,
                                  args=(alias, pks[rep % len(pks)], ready,
                                        errors))
        writer.start()
        ready.wait(FENCE_TIMEOUT)
        started = time.perf_counter()
        result = window_journal.take_fence(alias, FENCE_TIMEOUT)
        record(f'take_fence, 1 writer idle {WRITER_HOLD:g} s',
               time.perf_counter() - started)
        writer.join(FENCE_TIMEOUT)
        assert result.taken and not result.terminated, result
        assert not errors, errors

        started = time.perf_counter()
        with window_journal.snapshot_transaction(alias) as snapshot:
            record('snapshot_transaction open',
                   time.perf_counter() - started)
            copied = _counts(alias)          # stands in for the copy
            started = time.perf_counter()
        record('snapshot_transaction close', time.perf_counter() - started)

        started = time.perf_counter()
        proof = window_journal.prove_copy(alias, snapshot, copied)
        record('prove_copy (total)', time.perf_counter() - started)
        assert proof.proven_none, proof
        for name, seconds in _prove_parts(alias, snapshot, copied).items():
            record(f'  {name}', seconds)
        started = time.perf_counter()
        window_journal.lower_fence(alias)
        record('lower_fence', time.perf_counter() - started)
    entries = window_journal.window_state(alias).entries
    problems = _sanity(alias, total)
    window_journal.end_window(alias)
    return {'steps': steps, 'assets': total, 'rewritten': len(pks),
            'journal_entries': entries, 'problems': problems}


# ----------------------------------------------------------------- main

def bench_writes(server_url: str, env_base: dict, repeat: int, n: int
                 ) -> dict:
    env = migrated_database(server_url, WRITES_DB, env_base)
    load_assets(env['ANTHIAS_POSTGRES_URL'], BASE_ROWS, freeze=True)
    runs = {'plain': [], 'journal': []}
    for rep in range(repeat):
        # Alternate which mode goes first, so drift hits both.
        order = ('plain', 'journal') if rep % 2 == 0 else ('journal',
                                                           'plain')
        for mode in order:
            runs[mode].append(run_child(env, '--child-writes', mode,
                                        '--writes', str(n),
                                        '--tag', f'{rep}{mode[0]}'))
    drop(server_url, WRITES_DB)
    return runs


def print_writes(runs: dict, n: int) -> None:
    def rate(mode: str, key: str, rows: int) -> tuple[float, float]:
        samples = []
        for run in runs[mode]:
            value = run[key]
            samples += value if isinstance(value, list) else [value]
        seconds = median(samples)
        return seconds, rows / seconds

    print(f'\n## 1. Journal write overhead (ORM, postgres alias, '
          f'autocommit; {len(runs["plain"])} child runs per mode, '
          f'alternating)\n')
    print('| workload | no journal s | journal s | no journal rows/s | '
          'journal rows/s | journal / no journal |')
    print('|---|---:|---:|---:|---:|---:|')
    for label, key, rows in (
            (f'{n:,} single-row writes (create, rename, delete 1 in 5)',
             'writes_s', n),
            (f'bulk_create of {BULK_ROWS:,} rows', 'bulk_s', BULK_ROWS),
            (f'.update() of {BASE_ROWS:,} rows', 'update_s', BASE_ROWS)):
        s0, r0 = rate('plain', key, rows)
        s1, r1 = rate('journal', key, rows)
        print(f'| {label} | {s0:.3f} | {s1:.3f} | {r0:,.0f} | {r1:,.0f} '
              f'| {r1 / r0:.2f} |')
    entries = [r.get('journal_entries', 0) for r in runs['journal']]
    print(f'\nJournal entries per journal run (all writes incl. untimed '
          f'clean-up): {", ".join(f"{e:,}" for e in entries)}')
    sys.stdout.flush()


def bench_fence(server_url: str, env_base: dict, repeat: int, n: int,
                freeze: bool) -> dict:
    env = migrated_database(server_url, FENCE_DB, env_base)
    load_s = load_assets(env['ANTHIAS_POSTGRES_URL'], n, freeze)
    result = run_child(env, '--child-fence', str(n), '--repeat',
                       str(repeat))
    drop(server_url, FENCE_DB)
    result['load_s'] = load_s
    return result


def print_fence(results: dict, repeat: int) -> None:
    sizes = list(results)
    print(f'\n## 2. Fence and proof, milliseconds (median of {repeat}, '
          f'after 1 warm-up run)\n')
    print('| step | ' + ' | '.join(f'{n:,} assets' for n in sizes) + ' |')
    print('|---|' + '---:|' * len(sizes))
    names = list(results[sizes[0]]['steps'])
    for name in names:
        cells = [f'{median(results[n]["steps"][name]) * 1000:.1f}'
                 for n in sizes]
        label = name.replace('  ', '&nbsp;&nbsp;- ', 1) \
            if name.startswith('  ') else name
        print(f'| {label} | ' + ' | '.join(cells) + ' |')
    print()
    for n, res in results.items():
        problems = '; '.join(res['problems']) or 'none'
        print(f'- {n:,} assets: loaded in {res["load_s"]:.1f}s; '
              f'{res["rewritten"]:,} of {res["assets"]:,} rows rewritten '
              f'(journaled) in the window before the fence; '
              f'journal {res["journal_entries"]:,} entries; sanity '
              f'problems: {problems}')
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--sizes', type=int, nargs='+',
                        default=[1_000, 1_000_000],
                        help='assets for the fence and proof part')
    parser.add_argument('--writes', type=int, default=5_000,
                        help='single-row writes per run (part 1)')
    parser.add_argument('--skip-writes', action='store_true')
    parser.add_argument('--no-freeze', action='store_true',
                        help='load without COPY FREEZE: every row keeps '
                             'a live xmin (the xmin scan worst case)')
    parser.add_argument('--child-writes', choices=('plain', 'journal'))
    parser.add_argument('--child-fence', type=int, metavar='N')
    parser.add_argument('--tag', default='x')
    args = parser.parse_args()
    if args.repeat < 1 or args.writes < 1:
        parser.error('--repeat and --writes must be at least 1')
    if args.child_writes:
        result = child_writes(args.child_writes, args.writes, args.tag)
        print(RESULT + json.dumps(result), flush=True)
        return
    if args.child_fence:
        result = child_fence(args.child_fence, args.repeat)
        print(RESULT + json.dumps(result), flush=True)
        return

    started = time.perf_counter()
    server_url, server = postgres_server_url()
    check_local(server_url)
    try:
        facts = server_facts(server_url)
        cpus = len(os.sched_getaffinity(0))
        print('# bench_journal: change journal + write fence on '
              'PostgreSQL\n')
        print(f'- machine: {cpus} CPUs (nproc), {platform.machine()}, '
              f'Python {platform.python_version()}')
        print(f'- PostgreSQL {facts["server_version"]} '
              f'({"embedded, unix socket" if server else "local"}); '
              f'fsync={facts["fsync"]}, synchronous_commit='
              f'{facts["synchronous_commit"]}, shared_buffers='
              f'{facts["shared_buffers"]}, data_checksums='
              f'{facts["data_checksums"]}')
        print(f'- --repeat {args.repeat} --writes {args.writes} --sizes '
              f'{" ".join(map(str, args.sizes))}'
              f'{" --no-freeze" if args.no_freeze else ""}')
        sys.stdout.flush()
        with tempfile.TemporaryDirectory(prefix='bench-journal-') as tmp:
            data_dir = Path(tmp) / 'data'
            data_dir.mkdir()
            sqlite_path = make_sqlite(OUT / 'bench_journal_src.db', 1_000)
            env_base = host_env(sqlite_path, server_url, data_dir)
            if not args.skip_writes:
                runs = bench_writes(server_url, env_base, args.repeat,
                                    args.writes)
                print_writes(runs, args.writes)
            results = {}
            for n in args.sizes:
                results[n] = bench_fence(server_url, env_base, args.repeat,
                                         n, not args.no_freeze)
            if results:
                print_fence(results, args.repeat)
    finally:
        if server is not None:
            server.cleanup()
    print(f'\nTotal wall time: {time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
