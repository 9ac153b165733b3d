"""The cutover record: what both databases held when PostgreSQL became
the active profile, so a rollback can say how much was written since.
(Not the change journal: that is on PostgreSQL, window.journal.)

Written by `switch_database --to postgres` as `cutover.json` in the data
dir (0600); read by the rollback report and `rollback_readiness`.
"""
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.db import DatabaseError
from django.db.models import Max

from anthias_rollback import fsutil, models_graph, schema
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.report import first_line

RECORD_NAME = 'cutover.json'


@dataclass(frozen=True)
class ModelSince:
    label: str
    rows_at_cutover: int | None
    rows_now: int
    new_rows: int | None  # rows with a key above the cutover's largest


def record_path(data_dir: Path) -> Path:
    return Path(data_dir) / RECORD_NAME


def snapshot_alias(alias: str) -> dict[str, Any]:
    """Per model: row count and largest primary key on *alias* (reads)."""
    models: dict[str, Any] = {}
    for model in models_graph.plan_models().models:
        manager = model._base_manager.using(alias)
        # Only integer keys grow monotonically (and PostgreSQL has no
        # max(uuid)); text and UUID keys are counted only.
        largest = None
        if has_integer_pk(model):
            largest = manager.aggregate(m=Max('pk'))['m']
        models[model._meta.label] = {'rows': manager.count(),
                                     'max_pk': largest}
    return models


def has_integer_pk(model) -> bool:
    pk = model._meta.pk
    while pk.is_relation:  # OneToOne primary key: the target's type
        pk = pk.target_field
    return pk.get_internal_type() in ('AutoField', 'BigAutoField',
                                      'SmallAutoField', 'IntegerField',
                                      'BigIntegerField')


def record_cutover(source_alias: str, target_alias: str,
                   data_dir: Path) -> Path:
    """Write the record of a cutover from *source_alias* to
    *target_alias*. A side that cannot be read is recorded as an error
    rather than stopping the cutover (it was checked just before)."""
    record: dict[str, Any] = {
        'cutover_at': datetime.now(UTC).isoformat(),
        'source_alias': source_alias, 'target_alias': target_alias,
    }
    for side, alias in (('source', source_alias), ('target', target_alias)):
        try:
            record[side] = {
                'migrations': sorted(f'{a}.{n}' for a, n in
                                     schema.applied_migrations(alias)),
                'models': snapshot_alias(alias),
            }
        except (RollbackError, DatabaseError) as err:
            record[side] = {'error': first_line(err)}
    path = record_path(data_dir)
    fsutil.atomic_write_json(path, record, mode=0o600)
    return path


def read_cutover(data_dir: Path) -> dict[str, Any] | None:
    """The recorded cutover, None if there is none (or it is unreadable:
    it only adds figures to reports)."""
    try:
        return fsutil.read_json(record_path(data_dir), 'cutover journal',
                                RollbackError)
    except RollbackError:
        return None


def rows_since_cutover(alias: str, journal: dict[str, Any],
                       counted: dict[str, int] | None = None
                       ) -> list[ModelSince]:
    """Compare *alias* now with the record's target side (reads).
    *counted*: row counts (by label) just taken on *alias*, used instead
    of counting those models again."""
    recorded = (journal.get('target') or {}).get('models') or {}
    found = []
    for model in models_graph.plan_models().models:
        label = model._meta.label
        manager = model._base_manager.using(alias)
        before = recorded.get(label) or {}
        max_pk = before.get('max_pk')
        new_rows = None
        if max_pk is not None and isinstance(max_pk, int):
            new_rows = manager.filter(pk__gt=max_pk).count()
        elif before and before.get('rows') == 0:
            new_rows = manager.count()
        now = (counted or {}).get(label)
        found.append(ModelSince(label, before.get('rows'),
                                manager.count() if now is None else now,
                                new_rows))
    return found


def record_window_end(data_dir: Path, state: Any) -> None:
    """Note in the cutover record that the rollback window was ended
    (what it held then), so later reports say why nothing is proven."""
    recorded = read_cutover(data_dir)
    if recorded is None:
        return
    recorded['window_ended'] = {
        'at': datetime.now(UTC).isoformat(),
        'journal_entries': state.entries, 'cutover_at': state.cutover_at}
    fsutil.atomic_write_json(record_path(data_dir), recorded, mode=0o600)
