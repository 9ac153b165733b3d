"""Build Anthias-shaped databases for the benchmarks (not for tests).

`make_sqlite(path, n_assets)` creates a fully migrated SQLite file (the
reference host's schema, WAL mode like a device) holding *n_assets*
realistic assets, a few users and sessions. Rows are written with raw
`executemany` in one transaction so 1,000,000 assets take seconds, and
cached by size under bench/out/ so repeated runs reuse them.

The drill's generator (`anthias_rollback.drill.seeder`) fills any host's
models through the ORM; this file writes Anthias's own tables with raw
SQL instead, for speed. What both decide the same way (how many rows a
framework model gets) comes from the drill's seeder.
"""
import datetime as dt
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

from anthias_rollback.drill.seeder import FRAMEWORK_ROWS

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'bench' / 'out'
NAMES = ['Café menu ☕', 'Ünïcödé board', '数字标牌', 'Emoji 🎉🚀',
         "O'Brien's \"quotes\"", 'Lobby screen', 'Weather widget']
MIMETYPES = ['video', 'image', 'webpage']


def _schema_template() -> Path:
    """An empty, fully migrated SQLite file (made once, then copied)."""
    OUT.mkdir(parents=True, exist_ok=True)
    template = OUT / 'schema_template.db'
    if template.exists():
        return template
    data_dir = OUT / 'template_data'
    data_dir.mkdir(exist_ok=True)
    env = dict(os.environ, DJANGO_SETTINGS_MODULE='settings_profiles.settings',
               ANTHIAS_DATA_DIR=str(data_dir),
               ANTHIAS_SQLITE_PATH=str(template) + '.tmp')
    env.pop('ANTHIAS_DB_PROFILE', None)
    subprocess.run([sys.executable, str(ROOT / 'manage.py'), 'migrate',
                    '--database', 'sqlite', '-v0'], env=env, check=True,
                   cwd=ROOT)
    conn = sqlite3.connect(str(template) + '.tmp')
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.execute('PRAGMA journal_mode=DELETE')
    conn.close()
    os.replace(str(template) + '.tmp', template)
    return template


def asset_rows(n: int, seed: int = 42):
    """Yield *n* asset rows in the column order of ASSET_COLUMNS."""
    rnd = random.Random(seed)
    # Naive UTC text, exactly as Django writes datetimes into SQLite.
    base = dt.datetime(2024, 1, 1)
    for i in range(n):
        start = base + dt.timedelta(seconds=rnd.randrange(0, 60_000_000),
                                    microseconds=rnd.randrange(1_000_000))
        meta = {'n': i, 'source': rnd.choice(['cdn', 'local', 'web']),
                'size': rnd.randrange(10 ** 9), 'tags': ['a', 'ü']}
        yield (
            uuid.UUID(int=rnd.getrandbits(128)).hex,
            f'{rnd.choice(NAMES)} #{i}',
            f'https://cdn.example.com/media/{i}/file{"x" * (i % 40)}.mp4',
            f'{rnd.getrandbits(128):032x}',
            start.isoformat(sep=' '),
            (start + dt.timedelta(days=30)).isoformat(sep=' '),
            rnd.choice([10, 30, 3600, None]),
            rnd.choice(MIMETYPES),
            rnd.random() < 0.8, False, rnd.random() < 0.1, i % 500,
            False, rnd.random() < 0.95,
            (start + dt.timedelta(hours=1)).isoformat(sep=' '),
            '[1, 2, 3, 4, 5, 6, 7]',
            rnd.choice([None, '08:00:00', '06:30:15.250000']),
            rnd.choice([None, '22:00:00']),
            False,
            json.dumps(meta),
        )


ASSET_COLUMNS = (
    'asset_id', 'name', 'uri', 'md5', 'start_date', 'end_date', 'duration',
    'mimetype', 'is_enabled', 'is_processing', 'nocache', 'play_order',
    'skip_asset_check', 'is_reachable', 'last_reachability_check',
    'play_days', 'play_time_from', 'play_time_to', 'skip_ssl_verify',
    'metadata')


def make_sqlite(path: Path, n_assets: int, wal: bool = True) -> Path:
    """A migrated SQLite file at *path* with *n_assets* assets (cached)."""
    path = Path(path)
    cached = OUT / f'anthias_{n_assets}.db'
    if not cached.exists():
        shutil.copyfile(_schema_template(), str(cached) + '.tmp')
        conn = sqlite3.connect(str(cached) + '.tmp')
        conn.execute('PRAGMA journal_mode=OFF')
        conn.execute('PRAGMA synchronous=OFF')
        marks = ', '.join('?' * len(ASSET_COLUMNS))
        conn.execute('BEGIN')
        conn.executemany(
            f'INSERT INTO assets ({", ".join(ASSET_COLUMNS)}) '
            f'VALUES ({marks})', asset_rows(n_assets))
        # A device's worth of users, as the drill seeds them.
        for i in range(FRAMEWORK_ROWS):
            conn.execute(
                'INSERT INTO auth_user (password, is_superuser, username, '
                'first_name, last_name, email, is_staff, is_active, '
                'date_joined) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
                ('md5$x$y', i == 0, f'user{i}', 'Zoë', 'O\'Neil',
                 f'user{i}@example.com', i == 0, True,
                 '2024-01-01 00:00:00'))
        conn.commit()
        conn.close()
        os.replace(str(cached) + '.tmp', cached)
    if path.exists():
        path.unlink()
    for suffix in ('-wal', '-shm'):
        Path(str(path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(cached, path)
    if wal:
        conn = sqlite3.connect(path)
        conn.execute('PRAGMA journal_mode=WAL')
        conn.close()
    return path


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    if len(values) % 2:
        return values[mid]
    return (values[mid - 1] + values[mid]) / 2


if __name__ == '__main__':
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    seconds, made = timed(make_sqlite, OUT / f'demo_{n}.db', n)
    print(f'{made}: {n} assets in {seconds:.1f}s')
