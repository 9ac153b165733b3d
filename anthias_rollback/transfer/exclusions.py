"""Tables kept out of a copy keep their rows, and nothing dangles.

A table outside the copy (ANTHIAS_ROLLBACK_EXCLUDE, or left out as
engine-specific) keeps its rows on the target. When it has a foreign key
into a copied table, that copied table cannot be emptied with TRUNCATE
(PostgreSQL refuses: "cannot truncate a table referenced in a foreign
key constraint", even when both are empty) and the reloaded rows must
still hold every key the kept rows point at. So, before the target is
emptied: every such column is checked against the source's rows (what
the copy will load, read in the copy's snapshot), refused with
TransferError naming the table, column and count if any would dangle;
then the referenced tables are emptied row by row, the others truncated.
"""
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.apps import apps
from django.db import connections, models

from anthias_rollback import engines
from anthias_rollback.exceptions import TransferError
from anthias_rollback.report import describe_alias

# Keys per IN (...) query: below SQLite's old 999-variable limit.
CHUNK = 500


@dataclass(frozen=True)
class KeptReference:
    """A foreign key of a table outside the copy into a copied one."""
    model: type[models.Model]
    field: models.ForeignKey

    @property
    def table(self) -> str:
        return self.model._meta.db_table

    @property
    def column(self) -> str:
        return self.field.column

    @property
    def parent(self) -> type[models.Model]:
        return self.field.related_model._meta.concrete_model

    @property
    def parent_table(self) -> str:
        return self.parent._meta.db_table


def empty_copied_tables(source_alias: str, target_alias: str,
                        tables: list[str]) -> None:
    """Empty *tables* on *target_alias* for the copy (inside its
    transaction), keeping every other table's rows.

    Reads the kept tables' foreign keys on the target and the keys they
    point at on *source_alias* (in the caller's snapshot). Raises
    TransferError, before anything is emptied, when a kept row would
    point at a row the copy does not load.
    """
    references = kept_references(target_alias, tables)
    check_dangling(source_alias, target_alias, references)
    keep_rows_of = referenced_closure(references, tables)
    engines.for_alias(target_alias).truncate(
        target_alias, tables, referenced=sorted(keep_rows_of))


def kept_references(target_alias: str, copied: Iterable[str]
                    ) -> list[KeptReference]:
    """Foreign keys (with a database constraint) of the models whose
    table exists on *target_alias* and is not in *copied*, into a
    table in *copied*."""
    copied = set(copied)
    existing = set(connections[target_alias].introspection.table_names())
    found: dict[tuple[str, str], KeptReference] = {}
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy or not meta.managed or meta.swapped or \
                meta.db_table in copied or meta.db_table not in existing:
            continue
        for field in _constraint_keys(model):
            reference = KeptReference(model, field)
            if reference.parent_table in copied:
                found.setdefault((reference.table, reference.column),
                                 reference)
    return [found[k] for k in sorted(found)]


def _constraint_keys(model: type[models.Model]
                     ) -> Iterator[models.ForeignKey]:
    for field in model._meta.local_concrete_fields:
        if isinstance(field, models.ForeignKey) and field.db_constraint \
                and not isinstance(field.related_model, str):
            yield field


def referenced_closure(references: list[KeptReference],
                       copied: Iterable[str]) -> set[str]:
    """Copied tables that must be emptied row by row: those a kept
    table points at, and (PostgreSQL truncates only a set no table
    outside it points into) every copied table those point at."""
    by_table = {m._meta.db_table: m
                for m in apps.get_models(include_auto_created=True)}
    copied = set(copied)
    found = {r.parent_table for r in references}
    pending = list(found)
    while pending:
        model = by_table.get(pending.pop())
        if model is None:
            continue
        for field in _constraint_keys(model):
            parent = field.related_model._meta.concrete_model._meta.db_table
            if parent in copied and parent not in found:
                found.add(parent)
                pending.append(parent)
    return found


def check_dangling(source_alias: str, target_alias: str,
                   references: list[KeptReference]) -> None:
    """TransferError naming the first kept table and column whose rows
    on *target_alias* point at keys absent from *source_alias* (what
    the copy loads), with the number of such rows."""
    for reference in references:
        missing = _missing_keys(source_alias, target_alias, reference)
        if not missing:
            continue
        count = _rows_pointing_at(target_alias, reference, missing)
        raise TransferError(
            f'{reference.table}.{reference.column} is kept (excluded or '
            f'left out of the copy) and {count} of its row(s) on '
            f'{describe_alias(target_alias)} point at '
            f'{reference.parent_table} rows that '
            f'{describe_alias(source_alias)} does not hold (e.g. '
            f'{sorted(missing, key=str)[:5]}); the copy would leave them '
            f'dangling: nothing was changed (copy those rows too, or stop '
            f'excluding {reference.model._meta.label})')


def _missing_keys(source_alias: str, target_alias: str,
                  reference: KeptReference) -> set:
    attname = reference.field.attname
    wanted = set(reference.model._base_manager.using(target_alias)
                 .exclude(**{f'{attname}__isnull': True})
                 .values_list(attname, flat=True).distinct())
    to_field = reference.field.target_field.attname
    found = set()
    listed = list(wanted)
    for start in range(0, len(listed), CHUNK):
        found.update(reference.parent._base_manager.using(source_alias)
                     .filter(**{f'{to_field}__in': listed[start:start
                                                          + CHUNK]})
                     .values_list(to_field, flat=True))
    return wanted - found


def _rows_pointing_at(alias: str, reference: KeptReference,
                      keys: set) -> int:
    attname = reference.field.attname
    listed = list(keys)
    return sum(reference.model._base_manager.using(alias)
               .filter(**{f'{attname}__in': listed[start:start + CHUNK]})
               .count() for start in range(0, len(listed), CHUNK))
