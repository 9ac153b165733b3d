"""Who reads a side: this process (LocalReader) or a forked child
holding that side's snapshot (SideReader), through one call protocol.

Messages on the pipe, parent -> child: ('count', label),
('stream', label, low, high), ('sample', label, size),
('blockers', label), ('digests', label, bounds, report, in_engine),
('rows', label, keys), ('stop', '').
Child -> parent: ('ready',), ('value', v), ('chunk', keys, rows),
('end',), ('progress', rows), ('error', is_database_error, text).
"""
import collections
import contextlib
import copy
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

from django.db import DatabaseError, Error, connections, models
from django.db.utils import load_backend

from anthias_rollback import engines, models_graph
from anthias_rollback.compare import streams
from anthias_rollback.engines import digests
from anthias_rollback.exceptions import CompareError, RollbackError
from anthias_rollback.report import first_line


def count_rows(model: type[models.Model], alias: str) -> int:
    return model._base_manager.using(alias).count()


class LocalReader:
    """Reads one alias in this process; the caller holds its snapshot.

    With *watch* (digests.snapshot_watch, made before that snapshot
    started) the engine's bucket digests are shared with forked worker
    processes (split_digests); *deadline* is theirs.
    """

    def __init__(self, alias: str, watch: digests.SnapshotWatch | None = None,
                 deadline: float | None = None):
        self.alias = alias
        self._watch = watch
        self._deadline = deadline
        self._digest_request: tuple | None = None
        # Which path computed each model's bucket digests ('engine' or
        # 'python'), for the report's notes and the tests.
        self.digest_paths: collections.Counter[str] = collections.Counter()

    def count(self, model: type[models.Model]) -> int:
        return count_rows(model, self.alias)

    def stream(self, model: type[models.Model], low: Any = None,
               high: Any = None) -> Iterator:
        return streams.stream_canonical_rows(model, self.alias, low=low,
                                             high=high)

    def key_sample(self, model: type[models.Model], size: int) -> list:
        return streams.key_sample(model, self.alias, size)

    def digest_blockers(self, model: type[models.Model]) -> list[str]:
        """Columns without an in-engine digest form (empty: the engine
        can hash every bucket itself)."""
        return engines.for_alias(self.alias).digest_blockers(self.alias,
                                                             model)

    def start_digests(self, model: type[models.Model], bounds: list,
                      report: bool = False, in_engine: bool = False
                      ) -> None:
        """*in_engine*: the engine hashes (both sides must agree on it:
        the two paths' digests never match each other)."""
        self._digest_request = (model, bounds, in_engine)
        self.digest_paths['engine' if in_engine else 'python'] += 1

    def finish_digests(self, on_rows: Callable[[int], None] | None = None
                       ) -> list[tuple[int, bytes]]:
        assert self._digest_request is not None   # start_digests first
        model, bounds, in_engine = self._digest_request
        if not in_engine:
            return streams.bucket_digests(model, self.alias, bounds,
                                          on_rows)
        if self._watch is not None:
            return split_digests(self.alias, model, bounds, self._watch,
                                 self._deadline, on_rows)
        return engines.for_alias(self.alias).bucket_digests(
            self.alias, model, bounds, on_rows)

    def rows_for_keys(self, model: type[models.Model], keys: list
                      ) -> tuple[list, list[tuple]]:
        return streams.rows_for_keys(model, self.alias, keys)


class SideReader:
    """One alias read by a forked child process, in the child's snapshot.

    Normalizing is pure Python, so one process per side is what uses a
    second core (measured: 1,000,000 assets, see bench/bench_validate.py).
    The child opens its own connection (the inherited one is never used
    or closed there: it shares the parent's socket or file) and holds one
    read snapshot for every model; it answers LocalReader calls sent
    through a pipe, whose buffer bounds memory. Only for aliases not
    inside an atomic block: uncommitted rows are invisible to another
    connection.
    """

    def __init__(self, alias: str, deadline: float | None):
        context = multiprocessing.get_context('fork')
        self.pipe, child = context.Pipe(duplex=True)
        settings = copy.deepcopy(connections[alias].settings_dict)
        self.process = context.Process(
            target=_side_reader_main, args=(child, alias, settings,
                                            deadline),
            daemon=True, name=f'anthias-compare-{alias}')
        self.process.start()
        child.close()
        self.digest_paths: collections.Counter[str] = collections.Counter()
        self._receive()

    def _receive(self) -> tuple:
        return _receive(self.pipe)

    def _call(self, *request: Any) -> Any:
        self.pipe.send(request)
        return self._receive()[1]

    def count(self, model: type[models.Model]) -> int:
        return self._call('count', model._meta.label)

    def stream(self, model: type[models.Model], low: Any = None,
               high: Any = None) -> Iterator:
        self.pipe.send(('stream', model._meta.label, low, high))

        def chunks() -> Iterator:
            while (message := self._receive())[0] == 'chunk':
                yield message[1], message[2]
        return streams.prefetch(chunks())

    def key_sample(self, model: type[models.Model], size: int) -> list:
        return self._call('sample', model._meta.label, size)

    def digest_blockers(self, model: type[models.Model]) -> list[str]:
        return self._call('blockers', model._meta.label)

    def start_digests(self, model: type[models.Model], bounds: list,
                      report: bool = False, in_engine: bool = False
                      ) -> None:
        """Start hashing; both sides' children work at once. Only one
        side should *report* progress: its messages wait in the pipe
        while the parent reads the other side."""
        self.digest_paths['engine' if in_engine else 'python'] += 1
        self.pipe.send(('digests', model._meta.label, bounds, report,
                        in_engine))

    def finish_digests(self, on_rows: Callable[[int], None] | None = None
                       ) -> list[tuple[int, bytes]]:
        while (message := self._receive())[0] == 'progress':
            if on_rows is not None:
                on_rows(message[1])
        return message[1]

    def rows_for_keys(self, model: type[models.Model], keys: list
                      ) -> tuple[list, list[tuple]]:
        return self._call('rows', model._meta.label, keys)

    def close(self) -> None:
        # A reader stopped mid-stream (timeout) may be blocked on a full
        # pipe: it only reads, so ending it is safe.
        with contextlib.suppress(OSError):
            self.pipe.send(('stop', ''))
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.pipe.close()


Reader = LocalReader | SideReader


def _receive(pipe: Any) -> tuple:
    try:
        message = pipe.recv()
    except EOFError:
        raise CompareError('the reader process stopped unexpectedly') \
            from None
    if message[0] == 'error':
        _, database_error, text = message
        raise (DatabaseError if database_error else CompareError)(text)
    return message


def split_digests(alias: str, model: type[models.Model], bounds: list,
                  watch: digests.SnapshotWatch, deadline: float | None,
                  on_rows: Callable[[int], None] | None = None
                  ) -> list[tuple[int, bytes]]:
    """The engine's bucket digests of *alias*, the table's rows split
    into equal rowid slices among this process (its snapshot, held by
    the caller) and forked workers, each in a read transaction of its
    own (digests.digest_workers); each slice's per-bucket sums are
    added.

    Several transactions are one snapshot only if nothing was committed
    in between (the SQLite file may be the live database): *watch* was
    made before this process's snapshot started and is asked once every
    worker's has. If a write came in between, the workers are stopped
    and this process hashes every row itself: a concurrent write can
    cost time, never mix two states of the file into one verdict. The
    rows a mismatching bucket is compared by are read in this process's
    snapshot, the one every digest was then computed in.
    """
    engine = engines.for_alias(alias)
    total = len(bounds) + 1
    count = min(digests.digest_workers(alias), total // 2)
    if count < 2:
        return engine.bucket_digests(alias, model, bounds, on_rows)
    parts = [(index, count) for index in range(count)]
    settings = copy.deepcopy(connections[alias].settings_dict)
    workers: list[tuple[int, Any]] = []
    try:
        for part in parts[1:]:
            pipe, child = multiprocessing.Pipe(duplex=False)
            # os.fork, not multiprocessing.Process: this process is a
            # daemon (SideReader), and those may not start Processes.
            pid = os.fork()
            if pid == 0:  # the worker
                try:
                    pipe.close()
                    _digest_worker_main(child, alias, settings, deadline,
                                        model, bounds, part)
                finally:
                    os._exit(0)
            child.close()
            workers.append((pid, pipe))
        for _, pipe in workers:
            _receive(pipe)   # ('ready',): its snapshot has started
        if not watch.unchanged():
            return engine.bucket_digests(alias, model, bounds, on_rows)
        # Progress: this process's share, scaled to the whole.
        report = None if on_rows is None else (
            lambda done: on_rows(done * count))
        found = digests.engine_bucket_sums(alias, model, bounds, parts[0],
                                           report)
        for _, pipe in workers:
            digests.add_sums(found, _receive(pipe)[1])
        return digests.as_digests(found)
    finally:
        for pid, pipe in workers:
            pipe.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)   # done, or it only reads
            os.waitpid(pid, 0)


def _digest_worker_main(pipe: Any, alias: str, settings_dict: dict,
                        deadline: float | None, model: type[models.Model],
                        bounds: list, part: tuple[int, int]) -> None:
    # Forked, not pickled: *model* is the parent's class itself.
    with _own_connection(pipe, alias, settings_dict), \
            engines.for_alias(alias).read_snapshot(alias, deadline):
        pipe.send(('ready',))
        pipe.send(('value', digests.engine_bucket_sums(
            alias, model, bounds, part)))


@contextlib.contextmanager
def _own_connection(pipe: Any, alias: str, settings_dict: dict
                    ) -> Iterator[None]:
    """In a forked child: *alias* on a connection of its own (the
    inherited one, in the parent's read transaction, is never used or
    closed here), closed at the end; an exception is sent to the parent
    on *pipe* instead of raised."""
    inherited = connections[alias]  # kept referenced: never closed here
    connections[alias] = load_backend(settings_dict['ENGINE']) \
        .DatabaseWrapper(settings_dict, alias)
    try:
        yield
    except BaseException as err:  # noqa: BLE001 reported to the parent
        with contextlib.suppress(OSError):
            pipe.send(('error', isinstance(err, Error),
                       str(err) if isinstance(err, RollbackError)
                       else first_line(err)))
    finally:
        connections[alias].close()
        del inherited


def _serve_reader(pipe: Any, reader: LocalReader) -> None:
    while (message := pipe.recv())[0] != 'stop':
        kind, label, *args = message
        model = models_graph.get_model(label)
        if kind == 'count':
            pipe.send(('value', reader.count(model)))
        elif kind == 'stream':
            for keys, rows in reader.stream(model, *args):
                pipe.send(('chunk', keys, rows))
            pipe.send(('end',))
        elif kind == 'sample':
            pipe.send(('value', reader.key_sample(model, *args)))
        elif kind == 'blockers':
            pipe.send(('value', reader.digest_blockers(model)))
        elif kind == 'digests':
            bounds, report, in_engine = args
            reader.start_digests(model, bounds, in_engine=in_engine)
            on_rows = (lambda done: pipe.send(('progress', done))) \
                if report else None
            pipe.send(('value', reader.finish_digests(on_rows)))
        elif kind == 'rows':
            pipe.send(('value', reader.rows_for_keys(model, *args)))


def _side_reader_main(pipe: Any, alias: str, settings_dict: dict,
                      deadline: float | None) -> None:
    with _own_connection(pipe, alias, settings_dict):
        # Before the snapshot starts: see split_digests.
        watch = digests.snapshot_watch(alias)
        try:
            with engines.for_alias(alias).read_snapshot(alias, deadline):
                pipe.send(('ready',))
                _serve_reader(pipe, LocalReader(alias, watch, deadline))
        finally:
            if watch is not None:
                watch.close()
