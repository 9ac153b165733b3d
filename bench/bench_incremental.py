"""Benchmark: incremental rollback against the full copy (issue 22).

For each size (default 100,000 and 1,000,000 assets, one sitting), a
device is moved to PostgreSQL; then, for each repeat, the device is
switched to postgres (a new window: new journal, new cutover file),
1,000 rows change on PostgreSQL (900 updates, 50 deletes, 50 inserts,
through the journal's triggers), and `rollback_migration --emergency
--json` runs in a real process (bench.measured: peak RSS, bytes
written):

- incremental, base = the cutover file (no replicator ran);
- incremental, base = the standby (`replicate_changes --once` after the
  changes: the tail is empty, the standby checked and promoted);
- full (`--full`), the fallback.

The three are rotated within one sitting; medians of wall time
(including Python and Django start-up), of the rollback's own time (its
report's `seconds`), of its phases, of peak RSS and of the bytes handed
to write(2). Targets (issue 22), checked and printed at the end:
standby <= 1.5 s at 1,000,000; 1M within 2x of 100k (standby); >= 10x
faster than --full; cutover file <= 3 s; RSS < 150 MB.

The checkout's modules are compiled first (compileall): a device has
them compiled after its first run, and a machine with
PYTHONDONTWRITEBYTECODE set (this sandbox) would otherwise compile the
package in every rollback's start-up (0.25-0.3 s of its wall time).

Usage: python -m bench.bench_incremental [--assets N,M] [--repeat R]
"""
import argparse
import atexit
import compileall
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_rollback import device, manage, postgres_url, psql
from bench.seed import ROOT, median

PHASES = ('source', 'fence', 'build', 'verify', 'swap', 'proof',
          'post-verify')
CASES = ('incremental (cutover file)', 'incremental (standby)', 'full')


def change_1000(url: str, round_no: int) -> None:
    """900 updates, 50 deletes, 50 inserts on PostgreSQL (journaled)."""
    psql(url, f"""
        UPDATE assets SET name = name || ' r{round_no}'
         WHERE asset_id IN (SELECT asset_id FROM assets
                            ORDER BY md5(asset_id || '{round_no}u')
                            LIMIT 900);
        DELETE FROM assets WHERE asset_id IN (
            SELECT asset_id FROM assets
             ORDER BY md5(asset_id || '{round_no}d') LIMIT 50);
        CREATE TEMP TABLE fresh AS SELECT * FROM assets
         ORDER BY md5(asset_id || '{round_no}i') LIMIT 50;
        UPDATE fresh SET asset_id = md5(asset_id || 'new{round_no}');
        INSERT INTO assets SELECT * FROM fresh;
    """)


def one(env: dict, url: str, case: str, round_no: int) -> dict:
    manage(env, 'switch_database', '--to', 'postgres', '--no-restart')
    change_1000(url, round_no)
    args = ['--full'] if case == 'full' else []
    if case == 'incremental (standby)':
        manage(env, 'replicate_changes', '--once')
    cost = Path(tempfile.mktemp(prefix='bench-cost-', suffix='.json'))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, '-m', 'bench.measured', str(cost),
         'rollback_migration', '--emergency', '--yes', '--json',
         '--timeout-minutes', '30', *args],
        env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f'rollback failed ({done.returncode}):\n'
                         f'{done.stderr[-2000:]}')
    measured = json.loads(cost.read_text())
    cost.unlink()
    result = json.loads(done.stdout)
    assert result['outcome'] == 'rolled back', result
    assert result['loss'] == 'proven-none', result['loss_detail']
    method = result['copy']['method']
    assert method == ('full' if case == 'full' else 'incremental'), result
    if case == 'incremental (standby)':
        assert result['copy'].get('promoted'), result['copy']
    return {'wall': wall, 'inside': result['seconds'],
            'rss': measured['maxrss_mb'], 'anon': measured['anon_mb'],
            'written': measured['wchar_mb'],
            'detail': result['copy'].get('detail')
            or result['copy'].get('reason'),
            **{p['name']: p['seconds'] for p in result['phases']}}


def sitting(workdir: Path, base_url: str, assets: int,
            repeat: int) -> dict[str, list[dict]]:
    env = device(workdir, base_url, assets)
    url = env['ANTHIAS_POSTGRES_URL']
    # The device is on postgres after device(); start from sqlite.
    manage(env, 'rollback_migration', '--emergency', '--yes', '--full')
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    round_no = 0
    for _ in range(repeat):
        for case in CASES:
            round_no += 1
            runs[case].append(one(env, url, case, round_no))
            print(f'# {assets:,} {case}: {runs[case][-1]["wall"]:.2f} s '
                  f'({runs[case][-1]["detail"]})', flush=True)
    return runs


def table(assets: int, runs: dict[str, list[dict]]) -> dict[str, float]:
    print(f'\n# {assets:,} assets, 1,000 changed per run, medians')
    print(f'| case | wall s | rollback s | peak RSS MB | of it anonymous '
          f'MB | written MB | '
          f'{" | ".join(PHASES)} |')
    print('|---|---:|---:|---:|---:|---:|' + '---:|' * len(PHASES))
    walls = {}
    for case in CASES:
        def med(key: str, rows: list[dict] = runs[case]) -> float:
            return median([r.get(key, 0.0) for r in rows])
        walls[case] = med('wall')
        cells = [f'{med(p):.3f}' for p in PHASES]
        print(f'| {case} | {walls[case]:.2f} | {med("inside"):.2f} | '
              f'{med("rss"):.0f} | {med("anon"):.0f} | '
              f'{med("written"):.0f} | '
              + ' | '.join(cells) + ' |')
        walls[f'rss {case}'] = max(r['rss'] for r in runs[case])
        walls[f'anon {case}'] = max(r['anon'] for r in runs[case])
    return walls


def verdict(name: str, ok: bool, figure: str) -> bool:
    print(f'{"PASS" if ok else "FAIL"}  {name}: {figure}')
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--assets', default='100000,1000000',
                        type=lambda v: [int(n) for n in v.split(',')],
                        help='sizes, comma-separated, in one sitting')
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    for package in ('anthias_rollback', 'anthias_app', 'settings_profiles'):
        compileall.compile_dir(str(ROOT / package), quiet=1)
    workdir = Path(tempfile.mkdtemp(prefix='bench-incremental-'))
    # Registered before the server's own handler, so it runs after the
    # server has stopped (atexit is last-in, first-out): every run left
    # 3-6 GB (two devices, standbys, backups) in /tmp.
    atexit.register(shutil.rmtree, workdir, True)
    base_url = postgres_url(workdir)
    results = {n: sitting(workdir, base_url, n, args.repeat)
               for n in args.assets}
    load = Path('/proc/loadavg').read_text().split()[:3]
    print(f'\n# {args.repeat} runs per case rotated; load average '
          f'{" ".join(load)}; wall includes Python + Django start-up')
    walls = {n: table(n, runs) for n, runs in results.items()}
    big, small = max(walls), min(walls)
    w = walls[big]
    print()
    standby, cutover = 'incremental (standby)', 'incremental (cutover file)'
    verdict(f'standby <= 1.5 s at {big:,}', w[standby] <= 1.5,
            f'{w[standby]:.2f} s')
    if big != small:
        ratio = w[standby] / walls[small][standby]
        verdict(f'{big:,} within 2x of {small:,} (standby)', ratio <= 2,
                f'{ratio:.2f}x')
    for case in (standby, cutover):
        speedup = w['full'] / w[case]
        verdict(f'>= 10x faster than --full ({case})', speedup >= 10,
                f'{speedup:.1f}x')
    verdict(f'cutover file <= 3 s at {big:,}', w[cutover] <= 3.0,
            f'{w[cutover]:.2f} s')
    for case in CASES:
        # Peak RSS counts the file pages SQLite maps for its checks
        # (clean page cache); the anonymous part is what was allocated.
        verdict(f'peak RSS < 150 MB ({case})', w[f'rss {case}'] < 150,
                f'{w[f"rss {case}"]:.0f} MB, of it anonymous '
                f'{w[f"anon {case}"]:.0f} MB')


if __name__ == '__main__':
    main()
