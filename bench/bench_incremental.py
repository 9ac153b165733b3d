"""Benchmark: incremental rollback against the full copy.

A device with N assets (default 1,000,000) is moved to PostgreSQL; then,
for each repeat, the device is switched to postgres (a new window: new
journal, new cutover file), 1,000 rows change on PostgreSQL (900
updates, 50 deletes, 50 inserts, through the journal's triggers), and
`rollback_migration --emergency --json` runs in a real process:

- incremental, base = the cutover file (no replicator ran);
- incremental, base = the standby (`replicate_changes --once` after the
  changes: the tail is empty);
- full (`--full`), the fallback.

The three are rotated within one sitting; medians of wall time
(including Python and Django start-up), of the rollback's own time (its
report's `seconds`) and of its phases. Targets (issue 14): incremental
<= 3 s end to end at 1,000,000 rows with 1,000 changed, >= 10x faster
than the full copy.

Usage: python -m bench.bench_incremental [--assets N] [--repeat R]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.bench_rollback import device, manage, postgres_url, psql
from bench.seed import median

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
    started = time.perf_counter()
    done = manage(env, 'rollback_migration', '--emergency', '--yes',
                  '--json', '--timeout-minutes', '30', *args)
    wall = time.perf_counter() - started
    result = json.loads(done.stdout)
    assert result['outcome'] == 'rolled back', result
    assert result['loss'] == 'proven-none', result['loss_detail']
    method = result['copy']['method']
    assert method == ('full' if case == 'full' else 'incremental'), result
    return {'wall': wall, 'inside': result['seconds'],
            'detail': result['copy'].get('detail')
            or result['copy'].get('reason'),
            **{p['name']: p['seconds'] for p in result['phases']}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--assets', type=int, default=1_000_000)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix='bench-incremental-'))
    base_url = postgres_url(workdir)
    env = device(workdir, base_url, args.assets)
    url = env['ANTHIAS_POSTGRES_URL']
    # The device is on postgres after device(); start from sqlite.
    manage(env, 'rollback_migration', '--emergency', '--yes', '--full')
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    round_no = 0
    for _ in range(args.repeat):
        for case in CASES:
            round_no += 1
            runs[case].append(one(env, url, case, round_no))
            print(f'# {case}: {runs[case][-1]["wall"]:.2f} s '
                  f'({runs[case][-1]["detail"]})', flush=True)
    load = Path('/proc/loadavg').read_text().split()[:3]
    print(f'\n# {args.assets:,} assets, 1,000 changed per run, '
          f'{args.repeat} runs per case rotated, medians; load average '
          f'{" ".join(load)}; wall includes Python + Django start-up')
    print(f'| case | wall s | rollback s | {" | ".join(PHASES)} |')
    print('|---|---:|---:|' + '---:|' * len(PHASES))
    walls, inside = {}, {}
    for case in CASES:
        walls[case] = median([r['wall'] for r in runs[case]])
        inside[case] = median([r['inside'] for r in runs[case]])
        cells = [f'{median([r.get(p, 0.0) for r in runs[case]]):.3f}'
                 for p in PHASES]
        print(f'| {case} | {walls[case]:.2f} | {inside[case]:.2f} | '
              + ' | '.join(cells) + ' |')
    for case in CASES[:2]:
        print(f'# full / {case}: {walls["full"] / walls[case]:.1f}x wall, '
              f'{inside["full"] / inside[case]:.1f}x inside the rollback')


if __name__ == '__main__':
    main()
