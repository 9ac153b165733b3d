"""Benchmark validate_migration against the PyPI tool reladiff.

    .venv/bin/python -m bench.bench_validate                 # 1,000,000
    .venv/bin/python -m bench.bench_validate --assets 100000 --repeat 3

Builds an Anthias-shaped SQLite file (bench/seed.py), loads the same rows
into PostgreSQL with COPY (a helper here: the transfer engine is not
used), then times `manage.py validate_migration` (checksum and --deep,
peak memory from /usr/bin/time) and reladiff on the same tables, first
identical, then with rows changed on PostgreSQL.

reladiff 0.6 has no SQLite driver, so it diffs a PostgreSQL copy of the
SQLite file (database `bench_mirror`, loaded by the same helper) against
the target: the most favourable setting for it (md5 in the server on both
sides). PostgreSQL: ANTHIAS_BENCH_POSTGRES_URL if set (a server where we
may create databases), else an embedded server under bench/out/pg.
reladiff is run from its own venv (--reladiff, default
/tmp/reladiff-venv/bin/reladiff), never from this project's.
"""
import argparse
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

import psycopg2

from bench.seed import ASSET_COLUMNS, OUT, ROOT, make_sqlite, median, timed

CHANGED_COLUMNS = ('name', 'metadata', 'start_date', 'is_enabled',
                   'play_order')


def database_url(server_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path=f'/{name}'))


def postgres_server_url() -> tuple[str, object]:
    url = os.environ.get('ANTHIAS_BENCH_POSTGRES_URL')
    if url:
        return url, None
    sys.path.insert(0, str(ROOT))
    from tests.pgserver import embedded_server

    (OUT / 'pg').mkdir(parents=True, exist_ok=True)
    server = embedded_server(Path(tempfile.mkdtemp(dir=OUT / 'pg')))
    return server.get_uri(), server


def postgres_recreate_database(server_url: str, name: str) -> str:
    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS {name}')
        cursor.execute(f'CREATE DATABASE {name}')
    conn.close()
    return database_url(server_url, name)


def host_env(sqlite_path: Path, postgres_url: str, data_dir: Path) -> dict:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE='settings_profiles.'
               'settings', ANTHIAS_DATA_DIR=str(data_dir),
               ANTHIAS_SQLITE_PATH=str(sqlite_path),
               ANTHIAS_POSTGRES_URL=postgres_url, PYTHONPATH=str(ROOT))
    env.pop('ANTHIAS_DB_PROFILE', None)
    return env


def manage(env: dict, *args: str, check: bool = True
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'manage.py'), *args],
                          env=env, cwd=ROOT, capture_output=True,
                          text=True, check=check)


def _copy_text(value) -> str:
    if value is None:
        return '\\N'
    if isinstance(value, bytes):
        return '\\\\x' + value.hex()
    return (str(value).replace('\\', '\\\\').replace('\t', '\\t')
            .replace('\n', '\\n').replace('\r', '\\r'))


def postgres_copy_from_sqlite(sqlite_path: Path, postgres_url: str,
                              chunk: int = 50_000) -> int:
    """Every non-empty table of the SQLite file into the (migrated)
    PostgreSQL database, replacing its rows. Returns rows copied."""
    source = sqlite3.connect(sqlite_path)
    tables = [r[0] for r in source.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT "
        "LIKE 'sqlite_%' AND name != 'django_migrations'")]
    target = psycopg2.connect(postgres_url)
    total = 0
    with target.cursor() as cursor:
        cursor.execute("SET timezone = 'UTC'")
        # Skip FK triggers while tables load in any order (superuser).
        cursor.execute('SET session_replication_role = replica')
        cursor.execute('TRUNCATE ' + ', '.join(f'"{t}"' for t in tables))
        for table in tables:
            columns = [r[1] for r in source.execute(
                f'PRAGMA table_info("{table}")')]
            rows = source.execute(
                f'SELECT {", ".join(columns)} FROM "{table}"')
            names = ', '.join(f'"{c}"' for c in columns)
            while batch := rows.fetchmany(chunk):
                buffer = io.StringIO()
                for row in batch:
                    buffer.write('\t'.join(map(_copy_text, row)) + '\n')
                buffer.seek(0)
                cursor.copy_expert(f'COPY "{table}" ({names}) FROM STDIN',
                                   buffer)
                total += len(batch)
        cursor.execute('ANALYZE')
    target.commit()
    target.close()
    source.close()
    return total


def change_rows_on_postgres(postgres_url: str, n: int) -> list[str]:
    """Change *n* assets on PostgreSQL in different ways; their keys."""
    conn = psycopg2.connect(postgres_url)
    with conn.cursor() as cursor:
        cursor.execute('SELECT asset_id FROM assets ORDER BY md5 LIMIT %s',
                       (n,))
        keys = [r[0] for r in cursor.fetchall()]
        for i, key in enumerate(keys):
            kind = CHANGED_COLUMNS[i % len(CHANGED_COLUMNS)]
            sql = {
                'name': "UPDATE assets SET name = name || ' (edited)'",
                'metadata': "UPDATE assets SET metadata = jsonb_set("
                            "metadata, '{source}', '\"changed\"')",
                'start_date': "UPDATE assets SET start_date = start_date "
                              "+ interval '1 microsecond'",
                'is_enabled': 'UPDATE assets SET is_enabled = '
                              'NOT is_enabled',
                'play_order': 'UPDATE assets SET play_order = '
                              'play_order + 1',
            }[kind]
            cursor.execute(sql + ' WHERE asset_id = %s', (key,))
    conn.commit()
    conn.close()
    return sorted(keys)


def run_validate(env: dict, *args: str) -> tuple[float, int, dict, int]:
    """(seconds, exit code, JSON report, peak RSS in MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / 'report.json'
        rss = Path(tmp) / 'rss'
        command = ['/usr/bin/time', '-f', '%M', '-o', str(rss),
                   sys.executable, str(ROOT / 'manage.py'),
                   'validate_migration', '--no-performance-test',
                   '--json', str(report), *args]
        seconds, result = timed(subprocess.run, command, env=env, cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode not in (0, 3):
            raise SystemExit(f'validate_migration failed: {result.stderr}')
        data = json.loads(report.read_text())
        peak = int(rss.read_text().split()[-1]) // 1024
        return seconds, result.returncode, data, peak


def run_reladiff(reladiff: str, left_url: str, right_url: str
                 ) -> tuple[float, int, set[str]]:
    """(seconds, exit code, keys reported) for reladiff on `assets`."""
    columns = [c for c in ASSET_COLUMNS if c != 'asset_id']
    command = [reladiff, left_url, 'assets', right_url, 'assets',
               '-k', 'asset_id', '--json']
    for column in columns:
        command += ['-c', column]
    # reladiff prints through rich, which wraps lines at 80 columns when
    # not on a terminal; a wide console keeps one JSON document a line.
    env = dict(os.environ, COLUMNS='1000000')
    seconds, result = timed(subprocess.run, command, capture_output=True,
                            text=True, env=env)
    keys = set()
    for line in result.stdout.splitlines():
        try:
            # One `["-"|"+", [key, columns...]]` per differing row side.
            keys.add(json.loads(line)[1][0])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    if result.returncode != 0:
        sys.stderr.write(f'reladiff exit {result.returncode}: '
                         f'{result.stderr[-400:]}\n')
    return seconds, result.returncode, keys


def reladiff_url(url: str) -> str:
    # reladiff's DSN parser wants the socket dir as the host.
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if 'host' in query:
        host = urllib.parse.quote(query['host'][0], safe='')
        return f'postgresql://{parts.username}@{host}{parts.path}'
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--assets', type=int, default=1_000_000)
    parser.add_argument('--changed', type=int, default=10)
    parser.add_argument('--repeat', type=int, default=1)
    parser.add_argument('--reladiff',
                        default='/tmp/reladiff-venv/bin/reladiff')
    parser.add_argument('--skip-reladiff', action='store_true')
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix='bench-validate-', dir=OUT))
    sqlite_path = make_sqlite(work / 'anthias.db', args.assets)
    server_url, server = postgres_server_url()
    target_url = postgres_recreate_database(server_url, 'bench_target')
    mirror_url = postgres_recreate_database(server_url, 'bench_mirror')
    env = host_env(sqlite_path, target_url, work / 'data')
    (work / 'data').mkdir()
    for url in (target_url, mirror_url):
        manage(dict(env, ANTHIAS_POSTGRES_URL=url), 'migrate',
               '--database', 'postgres', '-v0')
    load_seconds, copied = timed(postgres_copy_from_sqlite, sqlite_path,
                                 target_url)
    postgres_copy_from_sqlite(sqlite_path, mirror_url)
    print(f'{args.assets} assets; PostgreSQL loaded with {copied} rows '
          f'in {load_seconds:.1f}s (COPY)')

    rows = []

    def measure(case: str, expected: list[str]) -> None:
        for mode, extra in (('validate_migration', ()),
                            ('validate_migration --deep', ('--deep',))):
            runs = [run_validate(env, *extra) for _ in range(args.repeat)]
            seconds = median([r[0] for r in runs])
            _, code, data, peak = runs[-1]
            asset = next(m for m in data['models']
                         if m['label'] == 'anthias_app.Asset')
            found = sorted([c['pk'] for c in asset['changed']]
                           + asset['missing_keys'] + asset['extra_keys'])
            exact = found == expected
            rows.append((case, mode, seconds, code, len(found), exact,
                         peak))
            print(f'  {case:10} {mode:27} {seconds:7.1f}s exit {code} '
                  f'found {len(found)} exact={exact} peak {peak} MB',
                  flush=True)
        if args.skip_reladiff:
            return
        seconds, code, keys = run_reladiff(args.reladiff,
                                           reladiff_url(mirror_url),
                                           reladiff_url(target_url))
        exact = sorted(keys) == expected
        rows.append((case, 'reladiff (PG copy vs PG)', seconds, code,
                     len(keys), exact, None))
        print(f'  {case:10} {"reladiff":27} {seconds:7.1f}s exit {code} '
              f'found {len(keys)} exact={exact}', flush=True)

    measure('identical', [])
    changed = change_rows_on_postgres(target_url, args.changed)
    measure(f'{args.changed} changed', changed)

    print('\n| case | tool | seconds (median of '
          f'{args.repeat}) | rows found | exact | peak RSS |')
    print('|---|---|---|---|---|---|')
    for case, mode, seconds, _, found, exact, peak in rows:
        print(f'| {case} | {mode} | {seconds:.1f} | {found} | '
              f'{"yes" if exact else "NO"} | '
              f'{f"{peak} MB" if peak else "-"} |')
    by = {(c, m): s for c, m, s, *_ in rows}
    case = f'{args.changed} changed'
    base = by.get((case, 'validate_migration'))
    if base:
        deep = by[(case, 'validate_migration --deep')]
        print(f'\n--deep / default: {deep / base:.2f}x')
        rel = by.get((case, 'reladiff (PG copy vs PG)'))
        if rel:
            print(f'reladiff / default: {rel / base:.1f}x')
    if server is not None:
        server.cleanup()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
