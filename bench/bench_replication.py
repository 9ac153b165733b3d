"""Benchmark: how far behind `replicate_changes` keeps the standby under a
steady write load, and how much memory it needs. A script, not a test:

    python -m bench.bench_replication                  # the defaults below
    python -m bench.bench_replication --sizes 10000 --seconds 10 --repeat 1

For each database size (assets) and each of --repeat runs, in one sitting:
a fresh data dir with the SQLite file of bench/seed.py, a fresh PostgreSQL
database filled by `migrate_to_postgres`, `switch_database --to postgres`
(opens the rollback window, takes the cutover file), then
`replicate_changes` as a real process with its default interval, and an
ORM writer process (the reference host's settings, postgres alias,
autocommit) making --rate single-row writes a second for --seconds:
inserts, updates and deletes of assets (2:2:1), each logged with the time
its ORM call returned (the acknowledgement).

1. Lag: the parent polls the standby file (read-only, every --poll s) for
   every logged write and takes (first poll that sees it) - (its ack): an
   insert's row there, an update's new name there, a deleted row gone.
   Median, p95 and max per run; the summary is the median over runs. The
   poll adds up to --poll s to each sample.
2. Memory: the replicator's VmHWM (peak RSS, /proc/<pid>/status) once the
   standby is built and at the end of the run, and the largest RssAnon
   (its own heap, sampled every poll) while the writes are replicated:
   flat in database size if the batches, not the database, decide it.
   RssFile is the file pages it has mapped (SQLite's mmap), which the
   kernel can drop; both are also sampled (every 10 ms) while it builds
   the standby from the cutover file, where VmHWM is reached.

PostgreSQL: ANTHIAS_BENCH_POSTGRES_URL if set (a local server only), else
an embedded one on a unix socket.
"""
import argparse
import math
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_journal import check_local, drop, recreate, server_facts
from bench.bench_migrate import (
    host_env,
    manage,
    postgres_server_url,
    psycopg_connect,
    run_measured,
)
from bench.seed import make_sqlite, median

DATABASE = 'anthias_bench_replication'
PATTERN = ('insert', 'update', 'insert', 'update', 'delete')
POSITION_TABLE = 'anthias_rb_standby'   # standby.POSITION_TABLE
DRAIN_SECONDS = 60.0      # after the writer: every write must show up
START_SECONDS = 120.0     # replicator boot + the standby's first build
CHUNK = 500


# ------------------------------------------------------- child: writer

def child_writer(log_path: str, seconds: float, rate: float) -> None:
    """*rate* single-row ORM writes a second for *seconds* on the postgres
    alias: 'op key token ack_time' per write, one flushed line each."""
    import django

    django.setup()
    from anthias_app.models import Asset
    from anthias_rollback import profiles

    alias = profiles.POSTGRES
    total = int(seconds * rate)
    # Seeded rows, each updated or deleted once (so every write leaves a
    # mark of its own in the standby): half for updates, half deletes.
    seeded = list(Asset.objects.using(alias).order_by('pk')
                  .values_list('pk', flat=True)[:total + 1])
    updates, deletes = iter(seeded[0::2]), iter(seeded[1::2])
    started = time.monotonic()
    with open(log_path, 'a', buffering=1) as log:
        for i in range(total):
            wait = started + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            op = PATTERN[i % len(PATTERN)]
            if op == 'insert':
                key = token = f'zr-{i}'
                Asset.objects.using(alias).create(
                    asset_id=key, name=token, mimetype='video',
                    uri=f'https://cdn.example.com/{i}.mp4',
                    metadata={'i': i})
            elif op == 'update':
                key, token = next(updates), f'u-{i}'
                Asset.objects.using(alias).filter(pk=key).update(
                    name=token)
            else:
                key, token = next(deletes), '-'
                Asset.objects.using(alias).filter(pk=key).delete()
            log.write(f'{op} {key} {token} {time.time():.6f}\n')
    took = time.monotonic() - started
    print(f'writer: {total} writes in {took:.1f}s', flush=True)


# ------------------------------------------------------------- parent

def memory_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS so far), VmRSS, RssAnon and RssFile of *pid*, MB."""
    found = {}
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        name, _, value = line.partition(':')
        if name in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
            found[name] = int(value.split()[0]) / 1024
    return found


def standby_ready(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
        try:
            return conn.execute(f'SELECT count(*) FROM {POSITION_TABLE}'
                                ).fetchone()[0] == 1
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def visible(op: str, token: str, name: object, present: bool) -> bool:
    if op == 'insert':
        return present
    if op == 'update':
        return name == token
    return not present


class LagPoller:
    """Follows the writer's log and the standby; one lag per write."""

    def __init__(self, standby: Path, log: Path) -> None:
        self.standby, self.log = standby, log
        self.offset = 0
        self.partial = ''
        self.pending: dict[tuple[str, str, str], float] = {}
        self.lags: list[float] = []
        self.writes = 0
        self.first_ack = self.last_ack = 0.0
        self.conn = sqlite3.connect(f'file:{standby}?mode=ro', uri=True,
                                    isolation_level=None)

    def read_log(self) -> None:
        if not self.log.exists():
            return
        with open(self.log) as handle:
            handle.seek(self.offset)
            text = self.partial + handle.read()
            self.offset = handle.tell()
        lines = text.split('\n')
        self.partial = lines.pop()
        for line in lines:
            op, key, token, ack = line.split()
            at = float(ack)
            self.pending[(op, key, token)] = at
            self.writes += 1
            self.first_ack = self.first_ack or at
            self.last_ack = at

    def check(self) -> None:
        keys = list({key for _, key, _ in self.pending})
        rows: dict[str, object] = {}
        for start in range(0, len(keys), CHUNK):
            part = keys[start:start + CHUNK]
            marks = ', '.join('?' * len(part))
            rows.update(self.conn.execute(
                f'SELECT asset_id, name FROM assets WHERE asset_id IN '
                f'({marks})', part).fetchall())
        seen_at = time.time()
        for write, ack in list(self.pending.items()):
            op, key, token = write
            if visible(op, token, rows.get(key), key in rows):
                self.lags.append(seen_at - ack)
                del self.pending[write]

    def close(self) -> None:
        self.conn.close()


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def prepare(n: int, server_url: str, data_dir: Path) -> dict:
    """A device on postgres in an open window, holding *n* assets."""
    data_dir.mkdir(parents=True)
    live = make_sqlite(data_dir / 'anthias.db', n)
    url = recreate(server_url, DATABASE)
    env = host_env(live, url, data_dir)
    run_measured(manage('migrate_to_postgres', '-v0'), env)
    run_measured(manage('switch_database', '--to', 'postgres',
                        '--no-restart', '-v0'), env)
    return env


def run_once(n: int, server_url: str, tmp: Path, tag: str,
             seconds: float, rate: float, poll: float) -> dict:
    data_dir = tmp / f'data-{n}-{tag}'
    setup_started = time.perf_counter()
    env = prepare(n, server_url, data_dir)
    setup_s = time.perf_counter() - setup_started
    standby = data_dir / 'standby' / 'standby.db'
    output = data_dir / 'replicate.out'
    with open(output, 'w') as out:
        replicator = subprocess.Popen(manage('replicate_changes'), env=env,
                                      cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT)
        try:
            measured = measure(replicator, env, data_dir, standby, seconds,
                               rate, poll)
        finally:
            if replicator.poll() is None:
                replicator.send_signal(signal.SIGTERM)
                replicator.wait(30)
    text = output.read_text()
    if 'Traceback' in text:
        raise RuntimeError(f'replicate_changes crashed:\n{text[-3000:]}')
    measured.update(assets=n, setup_s=setup_s, standby_equal=same_assets(
        env['ANTHIAS_POSTGRES_URL'], standby))
    return measured


def measure(replicator: subprocess.Popen, env: dict, data_dir: Path,
            standby: Path, seconds: float, rate: float, poll: float
            ) -> dict:
    """Wait for the standby, run the writer, follow the lag."""
    deadline = time.monotonic() + START_SECONDS
    boot = {'RssAnon': 0.0, 'RssFile': 0.0}
    while not standby_ready(standby):
        if replicator.poll() is not None or time.monotonic() > deadline:
            tail = (data_dir / 'replicate.out').read_text()[-2000:]
            raise RuntimeError(f'replicate_changes did not start:\n{tail}')
        now = memory_mb(replicator.pid)
        boot = {k: max(v, now.get(k, 0.0)) for k, v in boot.items()}
        time.sleep(0.01)
    built = memory_mb(replicator.pid)
    anon_peak = built['RssAnon']
    log = data_dir / 'writes.log'
    writer = subprocess.Popen(
        [sys.executable, '-m', 'bench.bench_replication', '--child-writer',
         str(log), '--seconds', str(seconds), '--rate', str(rate)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    poller = LagPoller(standby, log)
    try:
        drain_until = None
        while True:
            poller.read_log()
            poller.check()
            anon_peak = max(anon_peak, memory_mb(replicator.pid)['RssAnon'])
            if writer.poll() is not None:
                if writer.returncode != 0:
                    raise RuntimeError(f'writer failed:\n'
                                       f'{writer.stdout.read()[-3000:]}')
                drain_until = drain_until or (time.monotonic()
                                              + DRAIN_SECONDS)
                poller.read_log()
                if not poller.pending or time.monotonic() > drain_until:
                    break
            time.sleep(poll)
        if replicator.poll() is not None:
            raise RuntimeError('the replicator stopped during the run')
        end = memory_mb(replicator.pid)
    finally:
        poller.close()
        if writer.poll() is None:
            writer.kill()
    span = max(poller.last_ack - poller.first_ack, 1e-9)
    return {'writes': poller.writes, 'lags': poller.lags,
            'rate': (poller.writes - 1) / span,
            'unseen': len(poller.pending), 'built': built, 'end': end,
            'anon_peak': anon_peak, 'boot': boot,
            'writer': writer.stdout.read().strip()}


def same_assets(url: str, standby: Path) -> bool:
    """Untimed: the standby holds exactly PostgreSQL's asset keys and
    names once every write was seen."""
    conn = psycopg_connect(url)
    with conn.cursor() as cursor:
        cursor.execute('SELECT asset_id, name FROM assets')
        postgres = set(cursor.fetchall())
    conn.close()
    lite = sqlite3.connect(f'file:{standby}?mode=ro', uri=True)
    try:
        local = set(lite.execute('SELECT asset_id, name FROM assets'))
    finally:
        lite.close()
    return postgres == local


def print_runs(runs: list[dict], seconds: float, rate: float,
               poll: float) -> None:
    print(f'\n## Runs ({rate:g} writes/s for {seconds:g} s; lag = first '
          f'poll seeing the write - its ack, poll every {poll * 1000:g} '
          f'ms)\n')
    print('| assets | writes | w/s achieved | lag median ms | p95 ms | '
          'max ms | unseen | standby = PG | build: RssAnon / RssFile max '
          'MB | VmHWM built MB | VmHWM end MB | RssAnon max MB | setup s |')
    print('|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|'
          '---:|')
    for run in runs:
        lags = run['lags']
        print(f'| {run["assets"]:,} | {run["writes"]:,} | '
              f'{run["rate"]:.1f} | '
              f'{median(lags) * 1000:.0f} | '
              f'{percentile(lags, 95) * 1000:.0f} | '
              f'{max(lags) * 1000:.0f} | {run["unseen"]} | '
              f'{"yes" if run["standby_equal"] else "NO"} | '
              f'{run["boot"]["RssAnon"]:.1f} / '
              f'{run["boot"]["RssFile"]:.1f} | '
              f'{run["built"]["VmHWM"]:.1f} | {run["end"]["VmHWM"]:.1f} '
              f'| {run["anon_peak"]:.1f} | {run["setup_s"]:.1f} |')
    print('\n' + '; '.join(r['writer'] for r in runs))
    sys.stdout.flush()


def print_summary(runs: list[dict]) -> None:
    sizes = sorted({r['assets'] for r in runs})
    print('\n## Summary (median over runs)\n')
    print('| assets | runs | lag median ms | p95 ms | max ms | '
          'replicator VmHWM MB | RssAnon max MB |')
    print('|---:|---:|---:|---:|---:|---:|---:|')
    for n in sizes:
        mine = [r for r in runs if r['assets'] == n]
        cells = [median([median(r['lags']) for r in mine]),
                 median([percentile(r['lags'], 95) for r in mine]),
                 median([max(r['lags']) for r in mine])]
        hwm = median([r['end']['VmHWM'] for r in mine])
        anon = median([r['anon_peak'] for r in mine])
        print(f'| {n:,} | {len(mine)} | '
              + ' | '.join(f'{c * 1000:.0f}' for c in cells)
              + f' | {hwm:.1f} | {anon:.1f} |')
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+',
                        default=[10_000, 200_000])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--seconds', type=float, default=30.0)
    parser.add_argument('--rate', type=float, default=100.0,
                        help='writes per second')
    parser.add_argument('--poll', type=float, default=0.02,
                        help='seconds between standby polls')
    parser.add_argument('--child-writer', metavar='LOG')
    args = parser.parse_args()
    if args.repeat < 1 or not args.seconds > 0 or not args.rate > 0 \
            or not args.poll > 0:
        parser.error('--repeat, --seconds, --rate and --poll must be '
                     'positive')
    if args.child_writer:
        child_writer(args.child_writer, args.seconds, args.rate)
        return
    if any(n < args.seconds * args.rate + 1 for n in args.sizes):
        parser.error('every size needs more assets than writes (each '
                     'seeded row is updated or deleted once)')

    started = time.perf_counter()
    server_url, server = postgres_server_url()
    check_local(server_url)
    try:
        facts = server_facts(server_url)
        cpus = len(os.sched_getaffinity(0))
        print('# bench_replication: replicate_changes lag and memory\n')
        print(f'- machine: {cpus} CPUs (nproc), {platform.machine()}, '
              f'Python {platform.python_version()}, load average at '
              f'start {os.getloadavg()[0]:.2f}')
        print(f'- PostgreSQL {facts["server_version"]} '
              f'({"embedded, unix socket" if server else "local"}); '
              f'fsync={facts["fsync"]}, synchronous_commit='
              f'{facts["synchronous_commit"]}')
        print(f'- --sizes {" ".join(map(str, args.sizes))} --repeat '
              f'{args.repeat} --seconds {args.seconds:g} --rate '
              f'{args.rate:g} --poll {args.poll:g}; replicate_changes '
              f'with its default interval')
        sys.stdout.flush()
        runs = []
        with tempfile.TemporaryDirectory(prefix='bench-repl-') as tmp:
            for rep in range(args.repeat):
                # Alternate the order of the sizes, so drift hits both.
                order = args.sizes if rep % 2 == 0 else args.sizes[::-1]
                for n in order:
                    runs.append(run_once(n, server_url, Path(tmp),
                                         str(rep), args.seconds,
                                         args.rate, args.poll))
                    print(f'  run {rep + 1}, {n:,} assets: done',
                          flush=True)
        drop(server_url, DATABASE)
        print_runs(runs, args.seconds, args.rate, args.poll)
        print_summary(runs)
    finally:
        if server is not None:
            server.cleanup()
    print(f'\nload average at the end {os.getloadavg()[0]:.2f}; total '
          f'wall time: {time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
