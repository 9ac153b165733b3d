"""Prove two aliases hold the same data, and find exactly where they don't.

Each side is read by a forked reader process (readers.SideReader) in one
read-only snapshot, in primary-key order, as canonical rows (see
normalize.py), so the two sides use two cores.

Checksum mode (the default): random keys from the left side split the
key space into buckets; each reader hashes its rows bucket by bucket and
sends only (row count, checksum) per bucket. Buckets that agree are
identical; the key ranges of the others are read again on both sides
and merged row by row, which names the exact keys and fields. The
checksums use digest forms, cheaper per value than the exact forms and
equal whenever the exact ones are (a false mismatch only costs a
re-read). `deep=True`, and primary keys without byte-ordered ranges,
merge both whole tables row by row instead: segment by segment, equal
segments confirmed at once, mismatching ones bisected by checksum down
to the differing rows.

Key order: keys are compared in Python (code points = UTF-8 bytes), so
each engine must return that order and select ranges in it (the engine
modules' byte_order / key_range_clause: SQLite `COLLATE BINARY`,
PostgreSQL `~<~` / `~>=~`, served by Django's `*_like` index), never the
database's locale collation. Each chunk's keys are checked to be
strictly increasing; a disagreement raises CompareError instead of
reporting false differences. Memory holds one chunk per side, one bucket
or segment, and one checksum per bucket, whatever the table size (plus
the lists of differing keys, which the report must carry).

Modules: results (what is returned), algorithms (merge, bisection,
bucket ranges; no Django), streams (canonical rows of one alias),
readers (in-process or forked), orchestrator (compare_aliases and
friends). Query timings live in compare.timing.
"""
from anthias_rollback.compare.algorithms import (
    checksum_rows,
    merge_streams,
    mismatched_ranges,
)
from anthias_rollback.compare.orchestrator import (
    check_schema,
    check_sqlite_file,
    compare_aliases,
    compare_model,
    find_at_risk_keys,
    resolve_models,
)
from anthias_rollback.compare.readers import LocalReader, SideReader
from anthias_rollback.compare.results import (
    AtRiskReport,
    CompareReport,
    ModelComparison,
)
from anthias_rollback.compare.streams import (
    bucket_digests,
    key_sample,
    prefetch,
    rows_for_keys,
    stream_canonical_columns,
    stream_canonical_rows,
)
from anthias_rollback.compare.timing import (
    DEGRADED_RATIO,
    PerformanceReport,
    QueryTiming,
    measure_query_performance,
)

__all__ = [
    'DEGRADED_RATIO', 'AtRiskReport', 'CompareReport', 'LocalReader',
    'ModelComparison', 'PerformanceReport', 'QueryTiming', 'SideReader',
    'bucket_digests', 'check_schema', 'check_sqlite_file', 'checksum_rows',
    'compare_aliases', 'compare_model', 'find_at_risk_keys', 'key_sample',
    'measure_query_performance', 'merge_streams', 'mismatched_ranges',
    'prefetch', 'resolve_models', 'rows_for_keys',
    'stream_canonical_columns', 'stream_canonical_rows',
]
