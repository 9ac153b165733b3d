"""Benchmark: the rollback's full copy PostgreSQL -> a fresh SQLite file,
against the raw floor measured in the same sitting. A script, not a test:

    python -m bench.bench_reverse --assets 1000000 --repeat 3
    python -m bench.bench_reverse --assets 100000 --before /tmp/before

The floor: `psql \\copy (SELECT ...) TO` a CSV file per table, then one
`sqlite3` run that empties the tables and `.import`s every CSV into a copy
of the migrated (empty) Django schema, in one transaction. "ours": the
reverse copy (`transfer.transfer_data(profiles.POSTGRES, alias)` into a
copy of the same schema file) in a child process, once with the tree
given by --before (a git worktree of the commit before the change; left
out if missing) and once with this tree. The three run in turn, in a
rotating order, --repeat times; medians are reported. Both trees are
byte-compiled first, as an installed package is; each run's line ends
with the load average, since the machine is shared.

PostgreSQL: ANTHIAS_BENCH_POSTGRES_URL if set, else an embedded server.
psql: --psql, else /usr/bin/psql, else the embedded server's own.
"""
import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_migrate import (
    host_env,
    manage,
    postgres_server_url,
    recreate_database,
    run_measured,
)
from bench.seed import OUT, _schema_template, make_sqlite, median

# The reverse copy in a child, importing the tree given as argv[1].
CHILD = '''
import sys
sys.path.insert(0, sys.argv[1])
import django
django.setup()
from pathlib import Path
import anthias_rollback
from anthias_rollback import profiles, transfer
assert anthias_rollback.__file__.startswith(sys.argv[1]), \\
    anthias_rollback.__file__
with profiles.sqlite_file_alias(Path(sys.argv[2])) as alias:
    result = transfer.transfer_data(profiles.POSTGRES, alias, replace=True)
print(f'copied {result.rows} rows in {result.seconds:.3f}s')
'''


def psql_binary(given: str | None) -> str:
    if given:
        return given
    if Path('/usr/bin/psql').exists():
        return '/usr/bin/psql'
    from tests.helpers import pgserver

    return str(pgserver.embedded_bin_dir() / 'psql')


def copied_tables(url: str, data_dir: Path, src: Path) -> list[tuple]:
    """(table, columns) of every model the copy moves, in its order."""
    code = (
        'import django\n'
        'django.setup()\n'
        'from anthias_rollback import transfer\n'
        'for m in transfer.transfer_models():\n'
        '    cols = [f.column for f in m._meta.local_concrete_fields]\n'
        '    print(m._meta.db_table + "\\t" + ",".join(cols))\n')
    _, _, out = run_measured([sys.executable, '-c', code],
                             host_env(src, url, data_dir))
    found = []
    for line in out.splitlines():
        if '\t' in line:
            table, cols = line.split('\t')
            found.append((table, cols.split(',')))
    return found


def run_floor(psql: str, url: str, tables: list[tuple], template: Path,
              tmp: Path) -> tuple[float, str]:
    """psql exports, then one sqlite3 import; (wall seconds, detail)."""
    target = tmp / 'floor.db'
    target.unlink(missing_ok=True)
    shutil.copyfile(template, target)
    export = []
    imports = ['.mode csv', 'BEGIN;']
    for table, columns in tables:
        csv_path = tmp / f'{table}.csv'
        quoted = ', '.join(f'"{c}"' for c in columns)
        export.append(f'\\copy (SELECT {quoted} FROM "{table}") TO '
                      f"'{csv_path}' WITH (FORMAT csv)")
        imports.append(f'DELETE FROM "{table}";')
        imports.append(f'.import {csv_path} {table}')
    imports.append('COMMIT;')
    started = time.perf_counter()
    subprocess.run([psql, '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', url],
                   input='\n'.join(export) + '\n', text=True, check=True)
    exported = time.perf_counter() - started
    subprocess.run(['sqlite3', str(target)],
                   input='\n'.join(imports) + '\n', text=True, check=True)
    seconds = time.perf_counter() - started
    for table, _ in tables:
        (tmp / f'{table}.csv').unlink()
    return seconds, f'psql {exported:.2f} + sqlite3 {seconds - exported:.2f}'


def run_copy(tree: Path, url: str, src: Path, data_dir: Path,
             template: Path, n: int) -> tuple[float, str]:
    """Our reverse copy with *tree*'s code; (wall seconds, detail)."""
    target = data_dir / 'reverse.db'
    target.unlink(missing_ok=True)
    shutil.copyfile(template, target)
    env = host_env(src, url, data_dir)
    env['PYTHONPATH'] = str(tree)
    seconds, rss, out = run_measured(
        [sys.executable, '-c', CHILD, str(tree), str(target)], env,
        cwd=tree)
    check = sqlite3.connect(target)
    copied = check.execute('SELECT count(*) FROM assets').fetchone()[0]
    check.close()
    assert copied == n, (copied, out)
    inner = out.strip().splitlines()[-1].split()[-1]
    return seconds, f'transfer {inner}, peak RSS {rss:.0f} MB'


def load_average() -> str:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def compile_tree(tree: Path) -> None:
    """Byte-compile *tree*'s packages first, as an installed package is:
    with PYTHONDONTWRITEBYTECODE set (this sandbox sets it) every child
    would otherwise compile them again, and a tree without __pycache__
    (the --before worktree) more than one with it."""
    packages = [str(tree / name) for name in
                ('anthias_rollback', 'anthias_app', 'settings_profiles')
                if (tree / name).is_dir()]
    subprocess.run([sys.executable, '-m', 'compileall', '-q', *packages],
                   check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--assets', type=int, default=100_000)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--before', type=Path,
                        default=Path('/tmp/reverse-before'),
                        help='tree of the code before the change')
    parser.add_argument('--psql')
    args = parser.parse_args()
    psql = psql_binary(args.psql)
    print(f'load average at start: {load_average()}', flush=True)
    server_url, server = postgres_server_url()
    n = args.assets
    trees = {'floor': None}
    if (args.before / 'anthias_rollback').is_dir():
        trees['before'] = args.before
    trees['after'] = ROOT
    runs: dict[str, list] = {name: [] for name in trees}
    for tree in trees.values():
        if tree is not None:
            compile_tree(tree)
    try:
        with tempfile.TemporaryDirectory(prefix='anthias-bench-') as tmp:
            tmp = Path(tmp)
            os.chmod(tmp, 0o755)
            data_dir = tmp / 'data'
            data_dir.mkdir()
            src = make_sqlite(OUT / f'bench_src_{n}.db', n)
            url = recreate_database(server_url)
            env = host_env(src, url, data_dir)
            run_measured(manage('migrate', '--database', 'postgres', '-v0'),
                         env)
            run_measured(manage('migrate_to_postgres', '--replace', '-v0'),
                         env)
            template = _schema_template()
            tables = copied_tables(url, data_dir, src)
            names = list(trees)
            for i in range(args.repeat):
                order = names[i % len(names):] + names[:i % len(names)]
                for name in order:
                    if name == 'floor':
                        result = run_floor(psql, url, tables, template, tmp)
                    else:
                        result = run_copy(trees[name], url, src, data_dir,
                                          template, n)
                    runs[name].append(result)
                    print(f'  run {i + 1} {name}: {result[0]:.2f}s '
                          f'({result[1]}; load {load_average()})',
                          flush=True)
    finally:
        if server is not None:
            server.cleanup()
    print(f'load average at end: {load_average()}')
    floor = median([s for s, _ in runs['floor']])
    print(f'\n{n:,} assets, PostgreSQL -> fresh SQLite, '
          f'{args.repeat} runs each\n')
    print('| what | median s | runs (s) | x floor |')
    print('|---|---:|---|---:|')
    for name, results in runs.items():
        seconds = median([s for s, _ in results])
        listed = ', '.join(f'{s:.2f}' for s, _ in results)
        print(f'| {name} | {seconds:.2f} | {listed} | '
              f'{seconds / floor:.2f} |')


if __name__ == '__main__':
    main()
