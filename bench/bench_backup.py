"""Benchmark: backup_database (with its verification) vs the floor vs cp.

    .venv/bin/python bench/bench_backup.py            # 100k and 1M assets
    .venv/bin/python bench/bench_backup.py 100000 --runs 7

floor = Python's sqlite3.Connection.backup into a new file, then a sha256
of it and a PRAGMA integrity_check: the least a verified backup can cost.
cp = shutil.copyfile of the main file only (not safe, only fast). All
three run interleaved on the same warm-cache WAL file; medians printed.
"""
import argparse
import hashlib
import os
import shutil
import sqlite3
import sys
import tempfile
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'settings_profiles.settings')
os.environ.setdefault('ANTHIAS_DATA_DIR', str(ROOT / 'bench' / 'out' /
                                              'template_data'))

# After sys.path: run as a script from anywhere.
from bench.seed import OUT, make_sqlite, median, timed


def floor(source: Path, target: Path) -> None:
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    src.backup(dst)
    dst.close()
    src.close()
    with open(target, 'rb') as fh:
        hashlib.file_digest(fh, 'sha256').hexdigest()
    conn = sqlite3.connect(target)
    assert conn.execute('PRAGMA integrity_check').fetchone()[0] == 'ok'
    conn.close()


def command(source: Path, backup_dir: Path) -> None:
    from django.core.management import call_command

    out = StringIO()
    call_command('backup_database', '--source-db', str(source),
                 '--backup-dir', str(backup_dir), verbosity=0, stdout=out)
    assert Path(out.getvalue().strip()).exists()


def copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def bench(n: int, runs: int) -> dict:
    source = make_sqlite(OUT / f'bench_backup_{n}.db', n)
    size = source.stat().st_size
    times = {'backup_database': [], 'floor': [], 'cp': []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=OUT) as scratch:
            scratch = Path(scratch)
            seconds, _ = timed(command, source, scratch / 'backups')
            times['backup_database'].append(seconds)
            seconds, _ = timed(floor, source, scratch / 'floor.db')
            times['floor'].append(seconds)
            seconds, _ = timed(copy, source, scratch / 'cp.db')
            times['cp'].append(seconds)
    return {'n': n, 'size': size, 'runs': runs,
            'median': {k: median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('sizes', nargs='*', type=int,
                        default=[100_000, 1_000_000])
    parser.add_argument('--runs', type=int, default=None,
                        help='runs per size (default 7 at 100k, 3 at 1M)')
    args = parser.parse_args()
    import django

    django.setup()
    print(f'SQLite {sqlite3.sqlite_version}, Python '
          f'{sys.version.split()[0]}, {os.cpu_count()} CPUs')
    print('| assets | DB MB | runs | what | median s | MB/s | vs floor |')
    print('|---:|---:|---:|---|---:|---:|---:|')
    for n in args.sizes:
        runs = args.runs or (7 if n <= 100_000 else 3)
        result = bench(n, runs)
        mb = result['size'] / 1e6
        base = result['median']['floor']
        for what, seconds in result['median'].items():
            print(f'| {n:,} | {mb:.0f} | {runs} | {what} | {seconds:.3f} | '
                  f'{mb / seconds:.0f} | {seconds / base:.2f}x |',
                  flush=True)


if __name__ == '__main__':
    main()
