"""The Applier: journal batches from PostgreSQL applied onto a SQLite
file, the changed keys' rows as the batch's snapshot holds them, through
the transfer's converters (the values a full copy writes).

The replicator (window.replicator) uses it for the standby; an
incremental rollback (rollback.incremental) for its new file. Reads
PostgreSQL inside the caller's snapshot transaction, writes the SQLite
alias inside the caller's transaction. Never prints.
"""
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import connections

from anthias_rollback import engines, faults, fields, models_graph
from anthias_rollback.engines import postgres_journal as pj
from anthias_rollback.engines import sqlite as lite
from anthias_rollback.exceptions import ReplicationError
from anthias_rollback.fields import (
    is_composite_key,
    key_columns,
    key_fields,
)
from anthias_rollback.transfer.values import Converter, ModelSpec
from anthias_rollback.window.standby import CHUNK


def _key_part(field: Any, value: Any) -> Any:
    """One component of a composite key, from the journal's JSON (jsonb
    writes bytea as '\\x' hex text, which BinaryField would take for
    base64)."""
    if (fields.internal_type(field) == 'BinaryField'
            and isinstance(value, str) and value.startswith('\\x')):
        return bytes.fromhex(value[2:])
    return field.to_python(value)


def key_values(model, text: str) -> tuple:
    """A composite key's journal text (postgres_journal.key_sql: the JSON
    array of its columns) as the key fields' Python values."""
    parts = json.loads(text, parse_float=Decimal)
    key = key_fields(model)
    if not isinstance(parts, list) or len(parts) != len(key):
        raise ReplicationError(f'{model._meta.label}: the journal key '
                               f'{text!r} is not one of its key tuples')
    return tuple(_key_part(f, v) for f, v in zip(key, parts))


def key_tuples(model, texts: Sequence[str], alias: str) -> list[tuple]:
    """Composite journal keys as *alias*'s parameters, field by field
    (the values the ORM would send)."""
    connection = connections[alias]
    key = key_fields(model)
    return [tuple(f.get_db_prep_value(v, connection, prepared=False)
                  for f, v in zip(key, key_values(model, text)))
            for text in texts]


def keys_for(model, texts: list[str], sqlite_alias: str
             ) -> tuple[list, list]:
    """Journal keys (text) as PostgreSQL and SQLite parameters, through
    the primary key field itself (one-column keys)."""
    pk = model._meta.pk
    values = [pk.to_python(t) for t in texts]
    kind = fields.key_kind(model)
    pg_keys = [str(v) if kind == 'uuid' else v for v in values]
    connection = connections[sqlite_alias]
    sqlite_keys = [pk.get_db_prep_value(v, connection, prepared=False)
                   for v in values]
    return pg_keys, sqlite_keys


# SQLite (belongs in engines/sqlite.py, which another change owned when
# this was written): rows by composite key, sqlite3's parameters.
def sqlite_key_tuples_where(alias: str, model, keys: Sequence[tuple]
                            ) -> tuple[str, list]:
    """WHERE clause and parameters for *model*'s rows on *alias* whose
    composite key is one of *keys* (at most the variable limit's worth)."""
    quote = connections[alias].ops.quote_name
    columns = key_columns(model)
    row = '(' + ', '.join('?' * len(columns)) + ')'
    # SQLite: a row value IN needs a subquery on its right.
    clause = (f'({", ".join(quote(c) for c in columns)}) IN (VALUES '
              f'{", ".join([row] * len(keys))})')
    return clause, [v for key in keys for v in key]


def sqlite_delete_key_tuples(alias: str, model, keys: Sequence[tuple]
                             ) -> None:
    """Delete *model*'s rows on *alias* whose composite key is one of
    *keys*, in the caller's transaction, in groups under the limit."""
    raw = connections[alias].connection
    table = connections[alias].ops.quote_name(model._meta.db_table)
    group = max(1, raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                // len(key_columns(model)))
    for start in range(0, len(keys), group):
        clause, params = sqlite_key_tuples_where(
            alias, model, keys[start:start + group])
        raw.execute(f'DELETE FROM {table} WHERE {clause}', params)


def postgres_key_tuples_where(alias: str, model, keys: Sequence[tuple]
                              ) -> tuple[str, list]:
    """The same for PostgreSQL (one array parameter per key column)."""
    connection = connections[alias]
    return pj.postgres_key_tuples_clause(
        [connection.ops.quote_name(c) for c in key_columns(model)],
        [f.db_type(connection) for f in key_fields(model)], keys)


@dataclass(frozen=True)
class AppliedBatch:
    """One journal batch applied onto a SQLite file."""
    batch: pj.JournalBatch
    keys: int                      # keys re-read (or rows of truncated
                                   # tables re-read whole)


class Applier:
    """Applies journal batches from one PostgreSQL alias onto one SQLite
    alias: the changed keys' rows as the batch's snapshot holds them,
    through the transfer's converters (the values a full copy writes).
    The replicator uses it for the standby; an incremental rollback for
    its new file. Holds the converters per model."""

    def __init__(self, postgres_alias: str, sqlite_alias: str,
                 chunk: int = CHUNK) -> None:
        self.pg = postgres_alias
        self.target = sqlite_alias
        self.chunk = chunk
        self._converters: dict[str, Converter] = {}
        self.by_table = {m._meta.db_table: m
                         for m in models_graph.plan_models().models}

    def apply(self, prev: str, tick: str,
              on_keys: Callable[[Any, list[str]], None] | None = None,
              batch: pj.JournalBatch | None = None) -> AppliedBatch:
        """Apply what the journal holds between the snapshots *prev* (the
        file's) and *tick* (the caller's open REPEATABLE READ transaction
        on the PostgreSQL alias). The caller holds a transaction on the
        SQLite alias: the batch commits whole or not at all. *on_keys*
        sees every applied chunk of keys (model, keys as text). *batch*:
        postgres_batch(prev, tick) when the caller already read it."""
        if batch is None:
            batch = pj.postgres_batch(self.pg, prev, tick)
        unknown = [t for t in batch.tables if t not in self.by_table]
        if unknown:
            raise ReplicationError(
                f'the journal names tables this code has no model for '
                f'({", ".join(unknown[:5])}); update the code or end '
                'the window')
        # SQLite: the constraints hold at COMMIT, when the file is again
        # one PostgreSQL snapshot.
        lite.sqlite_defer_foreign_keys(self.target)
        keys = 0
        for table in batch.tables:
            model = self.by_table[table]
            if table in batch.truncated:
                keys += self._refetch_table(model)
                continue
            for texts in pj.postgres_batch_keys(self.pg, prev, tick, table,
                                                self.chunk):
                keys += self._apply_keys(model, texts)
                if on_keys is not None:
                    on_keys(model, texts)
                faults.checkpoint('replicate:chunk-applied')
        return AppliedBatch(batch, keys)

    def converter(self, model) -> Converter:
        table = model._meta.db_table
        if table not in self._converters:
            self._converters[table] = Converter(
                ModelSpec.of(model), self.pg, self.target, [], [0])
        return self._converters[table]

    def _insert(self, model, rows: list[tuple]) -> int:
        converter = self.converter(model)
        converted = converter.convert(rows)
        if converter.counter[0]:
            problem = converter.problems[0] if converter.problems else ''
            converter.problems.clear()
            converter.counter[0] = 0
            raise ReplicationError(f'a value of {model._meta.label} cannot '
                                   f'be written to SQLite: {problem}')
        if converted:
            spec = converter.spec
            # SQLite: OR REPLACE drops a row whose unique value the
            # snapshot gave to another key; that row's key is in this
            # batch too (the file was one snapshot), so it comes back.
            lite.sqlite_insert_rows(self.target, spec.table,
                                    list(spec.columns), converted,
                                    replace=True)
        return len(converted)

    def _apply_composite_keys(self, model, texts: list[str]) -> int:
        """_apply_keys for a composite key: rows by key tuple."""
        sqlite_delete_key_tuples(self.target, model,
                                 key_tuples(model, texts, self.target))
        clause, params = postgres_key_tuples_where(
            self.pg, model, key_tuples(model, texts, self.pg))
        spec = self.converter(model).spec
        sql = f'{spec.select_sql(self.pg)} WHERE {clause}'
        for rows in engines.for_alias(self.pg).fetch_chunks(
                self.pg, sql, params, chunk_rows=self.chunk):
            self._insert(model, rows)
        return len(texts)

    def _apply_keys(self, model, texts: list[str]) -> int:
        if is_composite_key(model):
            return self._apply_composite_keys(model, texts)
        pg_keys, sqlite_keys = keys_for(model, texts, self.target)
        meta = model._meta
        lite.sqlite_delete_rows(self.target, meta.db_table, meta.pk.column,
                                sqlite_keys)
        engine = engines.for_alias(self.pg)
        kind = fields.key_kind(model)
        pg_column = connections[self.pg].ops.quote_name(meta.pk.column)
        if kind is None:
            clause, params = f'{pg_column}::text = ANY(%s)', [list(texts)]
        else:
            clause, params = engine.key_in_clause(pg_column, kind, pg_keys)
        spec = self.converter(model).spec
        sql = f'{spec.select_sql(self.pg)} WHERE {clause}'
        for rows in engine.fetch_chunks(self.pg, sql, params,
                                        chunk_rows=self.chunk):
            self._insert(model, rows)
        return len(texts)

    def _refetch_table(self, model) -> int:
        """A TRUNCATE in the batch: the table again, whole, from the
        tick (in chunks)."""
        lite.sqlite_delete_rows(self.target, model._meta.db_table)
        spec = self.converter(model).spec
        rows_done = 0
        engine = engines.for_alias(self.pg)
        for rows in engine.fetch_chunks(self.pg, spec.select_sql(self.pg),
                                        chunk_rows=self.chunk):
            rows_done += self._insert(model, rows)
        return rows_done

    def raise_sequences(self, model_list: list | None = None) -> None:
        """sqlite_sequence at least PostgreSQL's sequences (of every
        planned model by default): no id handed out on PostgreSQL is
        reused after a rollback onto this file."""
        if model_list is None:
            model_list = list(self.by_table.values())
        keyed = [(m._meta.db_table, m._meta.pk.column) for m in model_list
                 if fields.has_auto_key(m)]
        if keyed:
            values = engines.for_alias(self.pg).sequence_values(self.pg,
                                                                keyed)
            lite.sqlite_sync_sequences(self.target, values)
