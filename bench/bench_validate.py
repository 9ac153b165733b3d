"""Benchmark validate_migration against the PyPI tool reladiff.

    .venv/bin/python -m bench.bench_validate                 # 1,000,000
    .venv/bin/python -m bench.bench_validate --assets 100000 --repeat 3

Builds an Anthias-shaped SQLite file (bench/seed.py), loads the same rows
into PostgreSQL with COPY (a helper here: the transfer engine is not
used), then times `manage.py validate_migration` (checksum and --deep,
peak memory from /usr/bin/time) and reladiff on the same tables, first
identical, then with rows changed on PostgreSQL.

reladiff 0.6 has no SQLite driver, so it runs on two PostgreSQL copies of
the SQLite file, each diffed against the target's `assets`:

- `reladiff (typed PG copy)`: database `bench_mirror`, migrated and loaded
  by the same helper (real jsonb/timestamptz/boolean columns): the most
  favourable setting for it (md5 in the server on both sides).
- `reladiff (SQLite values as stored)`: database `bench_mirror_raw`, an
  `assets` table with the same column names, all `text`, holding the
  values exactly as SQLite stores them (Django's JSON text, datetimes as
  text, booleans as 0/1, NULL as NULL): what reladiff would see of the
  SQLite file itself. reladiff 0.6 refuses it: it logs "Incompatible
  types for column ..." for the first non-text target column and exits
  0 having compared nothing; the bench records such a refusal (or any
  false differences) as the result (--skip-raw-mirror).

PostgreSQL: ANTHIAS_BENCH_POSTGRES_URL if set (a server where we
may create databases), else an embedded server under bench/out/pg.
reladiff is run from its own venv (--reladiff, default
/tmp/reladiff-venv/bin/reladiff), never from this project's.
"""
import argparse
import contextlib
import io
import json
import os
import re
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
    from tests.helpers.pgserver import embedded_server

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


def _copy_rows(cursor, rows, table: str, columns: list[str],
               chunk: int) -> int:
    """COPY the sqlite3 cursor *rows* into *table*; returns rows."""
    names = ', '.join(f'"{c}"' for c in columns)
    total = 0
    while batch := rows.fetchmany(chunk):
        buffer = io.StringIO()
        for row in batch:
            buffer.write('\t'.join(map(_copy_text, row)) + '\n')
        buffer.seek(0)
        cursor.copy_expert(f'COPY "{table}" ({names}) FROM STDIN', buffer)
        total += len(batch)
    return total


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
            total += _copy_rows(cursor, rows, table, columns, chunk)
        cursor.execute('ANALYZE')
    target.commit()
    target.close()
    source.close()
    return total


def postgres_raw_copy_from_sqlite(sqlite_path: Path, postgres_url: str,
                                  table: str = 'assets',
                                  chunk: int = 50_000) -> int:
    """*table* of the SQLite file into a new all-`text` table of the same
    name and columns, each value as SQLite stores it. Returns rows."""
    source = sqlite3.connect(sqlite_path)
    info = list(source.execute(f'PRAGMA table_info("{table}")'))
    columns = [r[1] for r in info]
    # The same primary key as the typed copy, so reladiff's key-range
    # segments cost it the same on both baselines.
    keys = [r[1] for r in sorted(info, key=lambda r: r[5]) if r[5]]
    names = ', '.join(f'"{c}"' for c in columns)
    definition = ', '.join(f'"{c}" text' for c in columns)
    if keys:
        definition += (', PRIMARY KEY ('
                       + ', '.join(f'"{c}"' for c in keys) + ')')
    target = psycopg2.connect(postgres_url)
    total = 0
    with target.cursor() as cursor:
        cursor.execute(f'DROP TABLE IF EXISTS "{table}"')
        cursor.execute(f'CREATE TABLE "{table}" ({definition})')
        rows = source.execute(f'SELECT {names} FROM "{table}"')
        # str() of what sqlite3 returns is the stored value: TEXT as is,
        # INTEGER (booleans too) as its decimal digits.
        total += _copy_rows(cursor, rows, table, columns, chunk)
        cursor.execute(f'ANALYZE "{table}"')
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
                 ) -> tuple[float, int, set[str], str | None]:
    """(seconds, exit code, keys reported, None or "refused: <why>" /
    "failed: <why>") for reladiff on `assets`."""
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
    lines = [line.strip() for line in result.stderr.splitlines()
             if line.strip()]
    # reladiff 0.6 refuses a diff (e.g. text vs timestamptz columns) by
    # logging "ERROR - <reason>" and exiting 0 with no rows: not a clean
    # comparison, so the log line is the result.
    errors = [line.split(' ERROR - ', 1)[1] for line in lines
              if ' ERROR - ' in line]
    failure = None
    if errors:
        failure = 'refused: ' + errors[0]
    elif result.returncode != 0:
        # The last stderr line is the exception reladiff died of.
        failure = 'failed: ' + (lines[-1] if lines else 'no message')
    if failure:
        # "<sqeleton...Boolean object at 0x7f..>" -> "Boolean()"
        failure = re.sub(r'<[\w.]*?(\w+) object at 0x[0-9a-f]+>', r'\1()',
                         ' '.join(failure.split()))[:200]
    return seconds, result.returncode, keys, failure


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
    parser.add_argument('--skip-raw-mirror', action='store_true',
                        help='no reladiff run on the SQLite values as '
                             'stored (bench_mirror_raw)')
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
    baselines = [('reladiff (typed PG copy)', mirror_url)]
    if not args.skip_reladiff and not args.skip_raw_mirror:
        raw_url = postgres_recreate_database(server_url, 'bench_mirror_raw')
        raw_seconds, raw_rows = timed(postgres_raw_copy_from_sqlite,
                                      sqlite_path, raw_url)
        print(f'bench_mirror_raw.assets: {raw_rows} rows as text in '
              f'{raw_seconds:.1f}s')
        baselines.append(('reladiff (SQLite values as stored)', raw_url))

    # (case, tool, seconds, exit code, rows found or why none were,
    #  exact or None, peak MB or None)
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
            print(f'  {case:10} {mode:34} {seconds:7.1f}s exit {code} '
                  f'found {len(found)} exact={exact} peak {peak} MB',
                  flush=True)
        if args.skip_reladiff:
            return
        for label, url in baselines:
            seconds, code, keys, failure = run_reladiff(
                args.reladiff, reladiff_url(url), reladiff_url(target_url))
            if failure and not keys:
                # Nothing compared: no row count to report, no exactness.
                found, exact = failure, None
            else:
                found, exact = len(keys), sorted(keys) == expected
            rows.append((case, label, seconds, code, found, exact, None))
            print(f'  {case:10} {label:34} {seconds:7.1f}s exit {code} '
                  f'found {found} exact={"-" if exact is None else exact}',
                  flush=True)
            if failure and keys:
                print(f'    (and {failure})', flush=True)

    measure('identical', [])
    changed = change_rows_on_postgres(target_url, args.changed)
    measure(f'{args.changed} changed', changed)

    print('\n| case | tool | seconds (median of '
          f'{args.repeat}) | rows found | exact | peak RSS |')
    print('|---|---|---|---|---|---|')
    for case, mode, seconds, _, found, exact, peak in rows:
        verdict = '-' if exact is None else 'yes' if exact else 'NO'
        print(f'| {case} | {mode} | {seconds:.1f} | {found} | {verdict} | '
              f'{f"{peak} MB" if peak else "-"} |')
    by = {(c, m): (s, f) for c, m, s, _, f, *_ in rows}
    print()
    for case in ('identical', f'{args.changed} changed'):
        base = by[(case, 'validate_migration')][0]
        for tool in ['validate_migration --deep'] + [b for b, _ in
                                                     baselines]:
            if (case, tool) not in by:
                continue
            seconds, found = by[(case, tool)]
            # A refusal's time is not a comparison's: say so beside it.
            note = (f' ({found.split(":")[0]}, nothing compared)'
                    if isinstance(found, str) else '')
            print(f'{case}: {tool} / validate_migration: '
                  f'{seconds / base:.2f}x{note}')
    if server is not None:
        server.cleanup()
        # The server deletes only pgdata; its (now empty) parent is ours.
        with contextlib.suppress(OSError):
            server.pgdata.parent.rmdir()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
