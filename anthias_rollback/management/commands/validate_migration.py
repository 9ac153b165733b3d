"""Prove the SQLite and PostgreSQL databases hold the same data.

    python manage.py validate_migration
    python manage.py validate_migration --sqlite-db /data/backups/b.db \\
        --deep --report /tmp/validate.json --no-performance-test

Compares migrations, tables, row counts and a checksum of every row
(values normalised by the Django fields) for every model, bisecting
mismatching key ranges down to the differing rows; --deep compares every
row field by field. Reads only, each side in one snapshot. --json prints
the full report as one JSON document, --report PATH writes it (0600).

Exit codes: 0 pass; 1 could not validate (unreachable, unmigrated,
timeout, bad input); 2 usage error (also a negative or non-finite
number); 3 differences below --min-integrity or queries above
--max-query-time.
"""
import shutil
from pathlib import Path

from anthias_rollback import compare, events, exit_codes, profiles
from anthias_rollback.management.contract import RollbackCommand
from anthias_rollback.management.types import (
    non_negative_int,
    path_arg,
    percent,
    positive_float,
    positive_ms,
    text_arg,
)

SHOW_KEYS = 5


class Command(RollbackCommand):
    help = ('Compare every model between the sqlite alias (or '
            '--sqlite-db PATH) and the postgres alias: migrations, counts, '
            'row checksums with bisection to the differing keys, '
            'integrity %, query performance. Exit codes: 0 pass, 1 could '
            'not validate (unreachable, timeout, bad input), 2 usage, '
            '3 differences below --min-integrity or slow queries.')

    def add_arguments(self, parser):
        parser.add_argument('--sqlite-db', metavar='PATH', type=path_arg,
                            help='compare this SQLite file (e.g. a backup) '
                            'instead of the sqlite alias')
        parser.add_argument('--deep', '--deep-validation', dest='deep',
                            action='store_true',
                            help='compare every row field by field')
        parser.add_argument('--sample-size', type=non_negative_int,
                            default=0,
                            metavar='N', help='also compare N random rows '
                            'per model field by field (clamped to the '
                            'table size)')
        parser.add_argument('--min-integrity', type=percent, default=100.0,
                            metavar='PCT', help='pass when every model has '
                            'at least PCT%% identical rows (default 100)')
        parser.add_argument('--timeout', type=positive_float,
                            metavar='SECONDS',
                            help='stop cleanly after SECONDS with a '
                            'partial report (exit 1)')
        parser.add_argument('--performance-test', action='store_true',
                            default=True, help='time representative '
                            'queries on both sides (default)')
        parser.add_argument('--no-performance-test',
                            dest='performance_test', action='store_false',
                            help='skip the query timings')
        parser.add_argument('--max-query-time', type=positive_ms,
                            metavar='MS',
                            help='fail (exit 3) if a timed query takes '
                            'longer than MS milliseconds')
        parser.add_argument('--model', action='append', dest='models',
                            metavar='APP.MODEL', type=text_arg,
                            help='compare only this model (repeatable)')

    def run(self, *args, **options):
        sqlite_db = options['sqlite_db']
        deep = options['deep']
        sample_size = options['sample_size']
        min_integrity = options['min_integrity']
        timeout = options['timeout']
        performance = options['performance_test']
        max_query_ms = options['max_query_time']
        models = options['models']
        json_path = options['report']
        self.verbosity = options['verbosity']
        self.quiet = options['json']
        self.check_numbers(sample_size, min_integrity, timeout,
                           max_query_ms)
        if sqlite_db:
            compare.check_sqlite_file(Path(sqlite_db))
            with profiles.sqlite_file_alias(Path(sqlite_db)) as alias:
                self.validate(alias, options, json_path, deep, sample_size,
                              min_integrity, timeout, performance,
                              max_query_ms, models)
        else:
            self.validate(profiles.SQLITE, options, json_path, deep,
                          sample_size, min_integrity, timeout,
                          performance, max_query_ms, models)

    def check_numbers(self, sample_size, min_integrity, timeout,
                      max_query_ms):
        if sample_size < 0:
            self.fail(f'--sample-size must be 0 or more, not {sample_size}')
        if not 0 <= min_integrity <= 100:
            self.fail('--min-integrity must be between 0 and 100, not '
                      f'{min_integrity:g}')
        if timeout is not None and timeout <= 0:
            self.fail(f'--timeout must be more than 0, not {timeout:g}')
        if max_query_ms is not None and max_query_ms <= 0:
            self.fail('--max-query-time must be more than 0, not '
                      f'{max_query_ms:g}')

    def validate(self, left_alias, options, json_path, deep, sample_size,
                 min_integrity, timeout, performance, max_query_ms,
                 models):
        right_alias = profiles.POSTGRES
        report = compare.compare_aliases(
            left_alias, right_alias, models=models, deep=deep,
            sample_size=sample_size, timeout=timeout,
            progress=self.progress_renderer())
        perf = None
        if performance and report.complete:
            perf = compare.measure_query_performance(
                left_alias, right_alias, models=models,
                max_query_ms=max_query_ms)
        data = report.to_dict()
        data['min_integrity'] = min_integrity
        data['performance'] = perf.to_dict() if perf else None
        self.set_json(data)
        if not self.quiet and self.verbosity >= 1:
            self.print_report(report, perf)
            if json_path:
                self.stdout.write(f'full report: {json_path}')
        elif not self.quiet and report.not_compared:
            self.print_not_compared(report)
        self.verdict(report, perf, min_integrity)

    # ----------------------------------------------------------- output

    def progress_renderer(self):
        if self.quiet or self.verbosity < 1:
            return None
        if self.is_tty():
            return self.tty_progress()
        if self.verbosity >= 2:
            def plain(event):
                if event.kind == events.BATCH:
                    self.stdout.write(f'  {event.name}: {event.rows}/'
                                      f'{event.total} rows '
                                      f'({event.seconds:.1f}s)')
            return plain
        return None

    def tty_progress(self):
        from tqdm import tqdm

        bars = {}

        def render(event):
            if event.kind == events.MODEL_START:
                # A pty that reports a 0x0 size (script(1), some CI
                # runners) gets no bar at all from tqdm; shutil falls
                # back to 80x24.
                size = shutil.get_terminal_size()
                bars[event.name] = tqdm(
                    total=event.total, desc=event.name, unit='row',
                    leave=False, file=self.stdout._out, ncols=size.columns,
                    nrows=size.lines)
            elif event.kind == events.BATCH and event.name in bars:
                bar = bars[event.name]
                bar.update(event.rows - bar.n)
            elif event.kind == events.MODEL_DONE and event.name in bars:
                bars.pop(event.name).close()
        return render

    def print_report(self, report, perf):
        write = self.stdout.write
        mode = 'deep (field by field)' if report.deep else 'checksum'
        if self.verbosity >= 1:
            write(f'{report.left_description} vs '
                  f'{report.right_description}, {mode} mode')
        for note in report.notes:
            self.stderr.write(self.style.WARNING(note))
        for m in report.models:
            if self.verbosity >= 1 or not m.ok:
                line = (f'{m.label}: {m.left_rows} / {m.right_rows} rows, '
                        f'{m.identical} identical, '
                        f'{len(m.missing_keys)} missing, '
                        f'{len(m.extra_keys)} extra, {len(m.changed)} '
                        f'changed, {m.integrity:.2f}%')
                if m.sampled:
                    line += (f', sample {m.sampled} rows '
                             f'({m.sample_differences} differ)')
                if self.verbosity >= 2:
                    if not report.deep:
                        line += f', {m.rechecked} re-read'
                    line += f' ({m.seconds:.2f}s)'
                write(line if m.ok else self.style.WARNING(line))
            self.print_keys(m)
        if report.not_compared:
            self.print_not_compared(report)
        if perf is not None:
            self.print_performance(perf)

    def print_not_compared(self, report):
        self.stderr.write(self.style.ERROR(
            f'not compared ({report.stopped_reason}): '
            f'{", ".join(report.not_compared)}'))

    def print_keys(self, m):
        right = 'postgres side'
        for title, keys in ((f'missing on {right}', m.missing_keys),
                            (f'extra on {right}', m.extra_keys)):
            if keys:
                self.stdout.write(f'  {title}: {self.first_keys(keys)}')
        if m.changed:
            shown = [f'{pk} ({", ".join(names)})'
                     for pk, names in m.changed[:SHOW_KEYS]]
            more = len(m.changed) - SHOW_KEYS
            tail = f' (+{more} more)' if more > 0 else ''
            self.stdout.write(f'  changed: {"; ".join(shown)}{tail}')

    def first_keys(self, keys):
        shown = ', '.join(str(k) for k in keys[:SHOW_KEYS])
        more = len(keys) - SHOW_KEYS
        return shown + (f' (+{more} more)' if more > 0 else '')

    def print_performance(self, perf):
        for t in perf.timings:
            flags = []
            if t.degraded:
                flags.append(f'DEGRADED > {compare.DEGRADED_RATIO:g}x')
            if t.slow:
                flags.append(f'SLOW > {perf.max_query_ms:g} ms')
            line = (f'  perf {t.label} {t.query}: sqlite {t.left_ms:.2f} ms'
                    f', postgres {t.right_ms:.2f} ms, ratio {t.ratio:.2f}'
                    + (f' [{", ".join(flags)}]' if flags else ''))
            if flags:
                self.stdout.write(self.style.WARNING(line))
            elif self.verbosity >= 2:
                self.stdout.write(line)
        self.stdout.write(
            f'performance: {len(perf.timings)} queries timed, '
            f'{len(perf.degraded)} degraded (ratio > '
            f'{compare.DEGRADED_RATIO:g}), {len(perf.slow)} slow')

    def verdict(self, report, perf, min_integrity):
        summary = (f'integrity {report.integrity:.2f}% (lowest model '
                   f'{report.min_model_integrity:.2f}%), '
                   f'{report.identical} identical of '
                   f'{max(report.left_rows, report.right_rows)} rows, '
                   f'{report.differences} differences')
        if not report.complete:
            self.fail(f'INCOMPLETE: stopped ({report.stopped_reason}) '
                      f'before {len(report.not_compared)} model(s) were '
                      f'fully compared; {summary}', exit_codes.FAILED)
        if report.min_model_integrity < min_integrity:
            self.fail(f'FAIL: {summary}; below --min-integrity '
                      f'{min_integrity:g}%', exit_codes.NO)
        if perf is not None and not perf.ok:
            self.fail(f'FAIL: {len(perf.slow)} queries above '
                      f'--max-query-time {perf.max_query_ms:g} ms; '
                      f'{summary}', exit_codes.NO)
        if not self.quiet:
            self.write_verdict(f'PASS: {summary}')
