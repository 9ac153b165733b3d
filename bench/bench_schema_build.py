"""Benchmark: schema_build.migrate_file on a new file, with and without
the schema template.

    .venv/bin/python bench/bench_schema_build.py        # reference project
    .venv/bin/python bench/bench_schema_build.py --runs 7
    .venv/bin/python bench/bench_schema_build.py \
        --settings tests.hosts.cms.settings

without = no template: the isolated child migrates the empty file, then
the result is kept as the template (what the first rollback after an
upgrade pays; the child alone is today's cost). with = a copy of the
template (key digest, quick_check, byte copy with sha256, fsync). Runs
interleaved in a scratch data dir; medians printed.
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--settings', default='settings_profiles.settings')
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix='bench-schema-'))
    os.environ['DJANGO_SETTINGS_MODULE'] = args.settings
    os.environ['ANTHIAS_DATA_DIR'] = str(scratch / 'data')
    (scratch / 'data').mkdir()
    import django

    django.setup()
    from anthias_rollback import schema_build
    from bench.seed import median, timed

    templates = scratch / 'data' / schema_build.TEMPLATE_DIR
    without, with_template, child = [], [], []
    try:
        for run in range(args.runs):
            shutil.rmtree(templates, ignore_errors=True)
            seconds, applied = timed(schema_build.migrate_file,
                                     scratch / f'cold{run}.db', timeout=600)
            without.append(seconds)
            runs = schema_build.CHILD_RUNS
            seconds, again = timed(schema_build.migrate_file,
                                   scratch / f'warm{run}.db', timeout=600)
            assert schema_build.CHILD_RUNS == runs and again == applied
            with_template.append(seconds)
            path = scratch / f'child{run}.db'
            seconds, _ = timed(schema_build._run_child, path, 600, False)
            child.append(seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f'{args.settings}: {len(applied)} migrations, '
          f'medians of {args.runs}')
    print(f'  child only (before the cache): {median(child):7.3f} s')
    print(f'  without a template (+ keep it): {median(without):7.3f} s')
    print(f'  with the template:              {median(with_template):7.3f} s')
    print(f'  key digest alone:               {median(key_times()):7.3f} s')


def key_times() -> list[float]:
    from anthias_rollback import schema_build
    from bench.seed import timed

    return [timed(schema_build.template_key)[0] for _ in range(5)]


if __name__ == '__main__':
    main()
