"""The comparison algorithms on plain lists: no database, no Django."""
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anthias_rollback.compare import algorithms
from anthias_rollback.compare.algorithms import (
    Tally,
    checksum_rows,
    merge_streams,
    mismatched_ranges,
)

NAMES = ['pk', 'name', 'size']


def table(keys, name='n'):
    """Canonical rows (pk first) for *keys*, in key order."""
    return {k: (k, f'{name}{k}', len(str(k))) for k in keys}


def chunked(rows, size):
    """A (keys, rows) stream of *rows* (a dict) in key order."""
    keys = sorted(rows)
    for start in range(0, len(keys), size):
        part = keys[start:start + size]
        yield part, [rows[k] for k in part]


def expected(left, right):
    missing = sorted(set(left) - set(right))
    extra = sorted(set(right) - set(left))
    changed = {k: tuple(n for n, a, b in zip(NAMES, left[k], right[k])
                        if a != b)
               for k in sorted(set(left) & set(right))
               if left[k] != right[k]}
    identical = len(set(left) & set(right)) - len(changed)
    return missing, extra, changed, identical


def run_merge(left, right, *, deep, left_chunk=7, right_chunk=5,
              sample=None):
    tally = Tally(NAMES, sample)
    batches = []
    done = merge_streams(tally, chunked(left, left_chunk),
                         chunked(right, right_chunk), deep=deep,
                         deadline=None, on_batch=lambda: batches.append(1))
    assert done is True
    return tally, batches


def changed_pair():
    left = table(range(0, 300, 3))
    right = dict(left)
    del right[9], right[150]                 # missing on the right
    right[10] = (10, 'new', 2)               # extra on the right
    right[299] = (299, 'last', 3)            # extra, after every left key
    right[-1] = (-1, 'first', 2)             # extra, before every left key
    right[30] = (30, 'renamed', 2)           # changed: name
    right[297] = (297, 'n297', 9)            # changed: size
    right[60] = (60, 'x', 0)                 # changed: name and size
    return left, right


@pytest.mark.parametrize('deep', [False, True])
@pytest.mark.parametrize('segment_rows', [4, 40, 4000])
def test_merge_names_exactly_the_differences(monkeypatch, deep,
                                             segment_rows):
    monkeypatch.setattr(algorithms, 'SEGMENT_ROWS', segment_rows)
    left, right = changed_pair()
    tally, batches = run_merge(left, right, deep=deep)
    assert tally.missing == [9, 150]
    assert tally.extra == [-1, 10, 299]
    assert dict(tally.changed) == {30: ('name',), 297: ('size',),
                                   60: ('name', 'size')}
    assert [k for k, _ in tally.changed] == [30, 60, 297]
    assert tally.identical == len(left) - 2 - 3
    assert tally.compared == len(set(left) | set(right))
    assert tally.left_seen == len(left)
    # One batch per segment: a single one only when everything fits.
    assert (len(batches) == 1) == (segment_rows >= len(right))


@pytest.mark.parametrize('seed', range(12))
def test_merge_agrees_with_sets_on_random_tables(monkeypatch, seed):
    """Random keys (text, sorted as the engines are asked to sort them),
    random deletions, insertions and edits, odd chunk and segment sizes:
    every mode names exactly what set arithmetic names."""
    rng = random.Random(seed)
    monkeypatch.setattr(algorithms, 'SEGMENT_ROWS', rng.choice([3, 17, 64]))
    monkeypatch.setattr(algorithms, 'LEAF_ROWS', rng.choice([1, 4, 16]))
    universe = [f'k{n:04d}' for n in range(rng.randint(0, 400))]
    left = table(rng.sample(universe, len(universe) * 3 // 4))
    right = {k: v for k, v in left.items() if rng.random() > 0.05}
    right.update(table(rng.sample(universe, len(universe) // 10), 'r'))
    for key in rng.sample(sorted(right), len(right) // 20):
        right[key] = (key, right[key][1], -1)
    want_missing, want_extra, want_changed, want_identical = expected(
        left, right)
    for deep in (False, True):
        tally, _ = run_merge(left, right, deep=deep,
                             left_chunk=rng.randint(1, 50),
                             right_chunk=rng.randint(1, 50))
        assert tally.missing == want_missing, deep
        assert tally.extra == want_extra, deep
        assert dict(tally.changed) == want_changed, deep
        assert tally.identical == want_identical, deep


def test_bisect_compares_row_by_row_only_near_differences(monkeypatch):
    monkeypatch.setattr(algorithms, 'LEAF_ROWS', 4)
    left = table(range(1024))
    right = dict(left)
    right[700] = (700, 'changed', 3)
    compared = []
    tally = Tally(NAMES, None)
    original = tally.compare_rows

    def spy(lkeys, lrows, rkeys, rrows):
        compared.append(len(lkeys))
        original(lkeys, lrows, rkeys, rrows)

    monkeypatch.setattr(tally, 'compare_rows', spy)
    keys = sorted(left)
    tally.segment(keys, [left[k] for k in keys], keys,
                  [right[k] for k in keys])
    assert tally.changed == [(700, ('name',))]
    assert tally.identical == 1023
    # Halving 1024 rows down to leaves of <= 4: one leaf of 4 rows.
    assert compared == [4]


def test_bisect_finds_a_key_present_on_one_side_only(monkeypatch):
    monkeypatch.setattr(algorithms, 'LEAF_ROWS', 2)
    left = table(range(100))
    right = {k: v for k, v in left.items() if k != 41}
    right[1000] = (1000, 'extra', 4)
    keys_l, keys_r = sorted(left), sorted(right)
    tally = Tally(NAMES, None)
    tally.bisect(keys_l, [left[k] for k in keys_l], keys_r,
                 [right[k] for k in keys_r])
    assert (tally.missing, tally.extra, tally.changed) == ([41], [1000], [])
    assert tally.identical == 99


def test_sample_counts_differences_at_sampled_positions():
    left, right = changed_pair()
    keys = sorted(left)
    # Positions of keys 9 (missing), 30 (changed) and 33 (identical).
    sample = {keys.index(9), keys.index(30), keys.index(33)}
    tally, _ = run_merge(left, right, deep=True, sample=sample)
    assert tally.sampled == 3
    assert tally.sample_differences == 2


def test_deadline_stops_the_merge_and_closes_both_streams():
    closed = []

    def stream(name):
        try:
            yield [1], [(1, 'a', 1)]
        finally:
            closed.append(name)

    tally = Tally(NAMES, None)
    left, right = stream('left'), stream('right')
    next(left), next(right)  # started, so closing runs their finally
    assert merge_streams(tally, left, right, deep=True,
                         deadline=time.monotonic() - 1) is False
    assert sorted(closed) == ['left', 'right']
    assert tally.compared == 0


def test_empty_streams_compare_as_equal():
    tally, batches = run_merge({}, {}, deep=False)
    assert (tally.compared, tally.identical, batches) == (0, 0, [])


def test_mismatched_ranges_with_empty_and_unequal_buckets():
    same, other, empty = (3, b'x'), (3, b'y'), (0, b'')
    bounds = [10, 20, 30, 40]
    left = [same, empty, same, same, same]
    right = [same, same, other, same, other]
    assert mismatched_ranges(bounds, left, right) == (
        6, [(10, 30), (40, None)])
    assert mismatched_ranges(bounds, left, left) == (12, [])
    with pytest.raises(ValueError):
        mismatched_ranges(bounds, left, right[:-1])


def test_checksum_sees_type_value_and_order():
    rows = [(1, 'a', None), (2, 'é', 1.5)]
    assert checksum_rows(rows) == checksum_rows([tuple(r) for r in rows])
    assert checksum_rows(rows) != checksum_rows(rows[::-1])
    assert checksum_rows([(1, True)]) != checksum_rows([(1, 1)])
    assert checksum_rows([(1, 1)]) != checksum_rows([(1, 1.0)])
    assert checksum_rows([(1, '')]) != checksum_rows([(1, None)])
    assert len(checksum_rows([])) == 16


def test_algorithms_module_imports_no_django():
    # Loaded by path, so the package's __init__ (which does use Django)
    # does not run: what is left is the module's own imports.
    path = Path(algorithms.__file__)
    code = (
        'import importlib.util, sys\n'
        'spec = importlib.util.spec_from_file_location(\n'
        f'    "alg", {str(path)!r})\n'
        'module = importlib.util.module_from_spec(spec)\n'
        'spec.loader.exec_module(module)\n'
        'print(sorted(m for m in sys.modules if m.split(".")[0] in '
        '("django", "anthias_rollback")))\n')
    result = subprocess.run([sys.executable, '-c', code],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == '[]'
