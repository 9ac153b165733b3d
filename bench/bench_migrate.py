"""Benchmark: SQLite -> PostgreSQL with migrate_to_postgres, against the
floor (the same rows as CSV through a bare COPY), pgloader and Django's
dumpdata + loaddata; and the reverse direction (PostgreSQL -> a new
SQLite file). A script, not a test:

    python bench/bench_migrate.py                 # 100,000 and 1,000,000
    python bench/bench_migrate.py 100000 --repeat 3 --no-dumpdata

PostgreSQL: ANTHIAS_BENCH_POSTGRES_URL if set, else an embedded server.
Each tool runs in its own process; wall seconds, rows/s and peak RSS
(ru_maxrss of that process) are measured, medians of --repeat runs, with
ratios to the floor measured in the same run.
"""
import argparse
import csv
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed import OUT, _schema_template, make_sqlite, median

BENCH_DB = 'anthias_bench'


# ----------------------------------------------------------- processes

def run_measured(cmd: list[str], env: dict, cwd: Path = ROOT,
                 stdin=None) -> tuple[float, float, str]:
    """Run *cmd*; (wall seconds, peak RSS in MB, output). Raises on a
    non-zero exit."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    output = b''
    # Read while it runs (a full pipe would stall the child), then reap
    # it with wait4 to get this child's own peak RSS.
    for chunk in iter(lambda: proc.stdout.read(65536), b''):
        output += chunk
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    text = output.decode(errors='replace')
    if proc.returncode != 0:
        raise RuntimeError(f'{cmd[:3]} failed ({proc.returncode}):\n'
                           f'{text[-3000:]}')
    return seconds, usage.ru_maxrss / 1024, text


def host_env(sqlite_path: Path, url: str, data_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(DJANGO_SETTINGS_MODULE='settings_profiles.settings',
               ANTHIAS_SQLITE_PATH=str(sqlite_path),
               ANTHIAS_POSTGRES_URL=url, ANTHIAS_DATA_DIR=str(data_dir),
               PYTHONPATH=str(ROOT))
    env.pop('ANTHIAS_DB_PROFILE', None)
    return env


def manage(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / 'manage.py'), *args]


# ------------------------------------------------------------ postgres

def postgres_server_url() -> tuple[str, object]:
    url = os.environ.get('ANTHIAS_BENCH_POSTGRES_URL')
    if url:
        return url, None
    from tests.helpers import pgserver

    server = pgserver.embedded_server()
    return server.get_uri(), server


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path='/' + name))


def psycopg_connect(url: str):
    import psycopg2

    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    return psycopg2.connect(
        dbname=parts.path.lstrip('/'), user=parts.username or None,
        password=parts.password or None,
        host=query.get('host') or parts.hostname,
        port=parts.port or query.get('port') or 5432)


def recreate_database(server_url: str) -> str:
    conn = psycopg_connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS {BENCH_DB}')
        cursor.execute(f'CREATE DATABASE {BENCH_DB}')
    conn.close()
    return with_database(server_url, BENCH_DB)


def pgloader_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    user = parts.username or 'postgres'
    auth = user + (f':{parts.password}' if parts.password else '')
    if query.get('host', '').startswith('/'):
        return (f'postgresql://{auth}@unix:{query["host"]}:5432'
                f'{parts.path}')
    return f'postgresql://{auth}@{parts.hostname}:{parts.port or 5432}' \
           f'{parts.path}'


# ---------------------------------------------------------- the tools

def run_ours(src: Path, url: str, data_dir: Path) -> tuple[float, float]:
    env = host_env(src, url, data_dir)
    seconds, rss, out = run_measured(
        manage('migrate_to_postgres', '--replace', '-v0'), env)
    assert 'copied' in out, out
    return seconds, rss


def run_reverse(src: Path, url: str, data_dir: Path, n: int
                ) -> tuple[float, float]:
    target = data_dir / f'reverse_{n}.db'
    target.unlink(missing_ok=True)
    shutil.copyfile(_schema_template(), target)
    env = host_env(src, url, data_dir)
    seconds, rss, out = run_measured(
        [sys.executable, str(Path(__file__)), '--child-reverse',
         str(target)], env)
    check = sqlite3.connect(target)
    copied = check.execute('SELECT count(*) FROM assets').fetchone()[0]
    check.close()
    assert copied == n, (copied, out)
    return seconds, rss


def child_reverse(target: str) -> None:
    """In a child process: PostgreSQL -> the new SQLite file *target*."""
    import django

    django.setup()
    from anthias_rollback import profiles, transfer

    with profiles.sqlite_file_alias(Path(target)) as alias:
        result = transfer.transfer_data(profiles.POSTGRES, alias,
                                        replace=True)
    print(f'copied {result.rows} rows in {result.seconds:.1f}s')


def export_csv(src: Path, path: Path) -> list[str]:
    conn = sqlite3.connect(src)
    cursor = conn.execute('SELECT * FROM assets')
    columns = [d[0] for d in cursor.description]
    with open(path, 'w', newline='') as handle:
        writer = csv.writer(handle)
        for rows in iter(lambda: cursor.fetchmany(10000), []):
            writer.writerows(rows)
    conn.close()
    return columns


def run_floor(csv_path: Path, columns: list[str], url: str
              ) -> tuple[float, float]:
    """Bare COPY of the CSV into the emptied assets table, in a child
    (psql-like: the client only streams the file)."""
    code = (
        f'import sys\n'
        f'sys.path.insert(0, {str(ROOT)!r})\n'
        f'from bench.bench_migrate import psycopg_connect\n'
        f'conn = psycopg_connect({url!r})\n'
        f'cur = conn.cursor()\n'
        f'cur.execute("TRUNCATE assets")\n'
        f'with open({str(csv_path)!r}, "rb") as f:\n'
        f'    cur.copy_expert("COPY assets ({", ".join(columns)}) FROM '
        f'STDIN WITH (FORMAT csv)", f, size=1 << 16)\n'
        f'conn.commit()\n')
    seconds, rss, _ = run_measured([sys.executable, '-c', code],
                                   dict(os.environ))
    return seconds, rss


def run_pgloader(src: Path, url: str, n: int, tmp: Path
                 ) -> tuple[float, float]:
    load = tmp / 'load.pgloader'
    load.write_text(
        f"LOAD DATABASE FROM sqlite://{src}\n"
        f"     INTO {pgloader_url(url)}\n"
        "WITH data only, truncate, disable triggers, reset sequences\n"
        "EXCLUDING TABLE NAMES LIKE 'sqlite_sequence';\n")
    cmd = ['pgloader', '--no-ssl-cert-verification', '--quiet']
    if n >= 500_000:
        cmd += ['--dynamic-space-size', '4096']
    seconds, rss, _ = run_measured(cmd + [str(load)], dict(os.environ),
                                   cwd=tmp)
    return seconds, rss


def run_dumpdata_loaddata(src: Path, url: str, data_dir: Path, tmp: Path
                          ) -> tuple[float, float]:
    env = host_env(src, url, data_dir)
    dump = tmp / 'dump.json'
    # What people do: skip the tables migrate already filled.
    excludes = ['-e', 'contenttypes', '-e', 'auth.permission',
                '-e', 'admin.logentry', '-e', 'sessions']
    s1, r1, _ = run_measured(manage('dumpdata', '--database', 'sqlite',
                                    *excludes, '-o', str(dump)), env)
    truncate_assets(url)
    s2, r2, _ = run_measured(manage('loaddata', '--database', 'postgres',
                                    str(dump)), env)
    dump.unlink()
    return s1 + s2, max(r1, r2)


def truncate_assets(url: str) -> None:
    conn = psycopg_connect(url)
    with conn.cursor() as cursor:
        cursor.execute('TRUNCATE assets, auth_user CASCADE')
    conn.commit()
    conn.close()


# ----------------------------------------------------------------- main

def bench_size(n: int, repeat: int, server_url: str, tmp: Path,
               dumpdata: bool) -> list[tuple]:
    src = make_sqlite(OUT / f'bench_src_{n}.db', n)
    rows = n + 20   # assets + users (plus a few hundred migrate rows)
    url = recreate_database(server_url)
    data_dir = tmp / 'data'
    data_dir.mkdir(exist_ok=True)
    run_measured(manage('migrate', '--database', 'postgres', '-v0'),
                 host_env(src, url, data_dir))
    csv_path = tmp / 'assets.csv'
    columns = export_csv(src, csv_path)
    results = {'floor': [], 'ours': [], 'pgloader': [], 'reverse': []}
    for _ in range(repeat):
        results['floor'].append(run_floor(csv_path, columns, url))
        results['ours'].append(run_ours(src, url, data_dir))
        if shutil.which('pgloader'):
            results['pgloader'].append(run_pgloader(src, url, n, tmp))
            # Leave what ours loaded for the reverse copy.
            run_ours(src, url, data_dir)
        results['reverse'].append(run_reverse(src, url, data_dir, n))
    if dumpdata:
        results['dumpdata+loaddata'] = [
            run_dumpdata_loaddata(src, url, data_dir, tmp)]
        run_ours(src, url, data_dir)
    csv_path.unlink()
    floor = median([s for s, _ in results['floor']])
    table = []
    for name, runs in results.items():
        if not runs:
            continue
        seconds = median([s for s, _ in runs])
        rss = max(r for _, r in runs)
        table.append((n, name, len(runs), seconds, rows / seconds, rss,
                      seconds / floor))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('sizes', nargs='*', type=int,
                        default=[100_000, 1_000_000])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--repeat-large', type=int, default=2,
                        help='repetitions at 1,000,000 rows and above')
    parser.add_argument('--no-dumpdata', action='store_true')
    parser.add_argument('--dumpdata-max', type=int, default=100_000,
                        help='largest size to run dumpdata+loaddata at '
                             '(it holds everything in memory)')
    parser.add_argument('--child-reverse', metavar='SQLITE_PATH')
    args = parser.parse_args()
    if args.child_reverse:
        return child_reverse(args.child_reverse)
    server_url, server = postgres_server_url()
    table = []
    with tempfile.TemporaryDirectory(prefix='anthias-bench-') as tmp:
        os.chmod(tmp, 0o755)   # pgloader/server users may read files
        for n in args.sizes:
            repeat = args.repeat if n < 1_000_000 else args.repeat_large
            dumpdata = not args.no_dumpdata and n <= args.dumpdata_max
            table += bench_size(n, repeat, server_url, Path(tmp), dumpdata)
            print_table(table)
    if server is not None:
        server.cleanup()


def print_table(table: list[tuple]) -> None:
    print('| rows | tool | runs | median s | rows/s | peak RSS MB | '
          'x floor |')
    print('|---:|---|---:|---:|---:|---:|---:|')
    for n, name, runs, seconds, rate, rss, ratio in table:
        print(f'| {n:,} | {name} | {runs} | {seconds:.2f} | {rate:,.0f} | '
              f'{rss:.0f} | {ratio:.2f} |')
    sys.stdout.flush()


if __name__ == '__main__':
    main()
