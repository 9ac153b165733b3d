"""Which models to move, in foreign-key dependency order.

Every concrete, managed model of every installed app, including the tables
Django auto-creates for many-to-many fields; proxies, unmanaged and
swapped-out models are skipped, and so is anything named in the setting
ANTHIAS_ROLLBACK_EXCLUDE (app labels or `app_label.ModelName`). A plan
also leaves out the tables that the command making it found to differ
between the engines (engine_tables.py: a search index, rebuilt instead).
"""
from dataclasses import dataclass

from django.apps import apps
from django.db import models
from django.db.models import Field

from anthias_rollback import conf
from anthias_rollback.exceptions import ConfigError


@dataclass(frozen=True)
class ModelsPlan:
    models: tuple[type[models.Model], ...]
    # FK fields that close a dependency cycle (self-references included):
    # targets must tolerate them pointing at rows loaded later (deferred
    # constraints on PostgreSQL, foreign_keys off during a SQLite load).
    cyclic_fields: tuple[Field, ...]

    @property
    def labels(self) -> list[str]:
        return [m._meta.label for m in self.models]


def is_excluded(model: type[models.Model], excluded: set[str]) -> bool:
    meta = model._meta
    if meta.app_label in excluded or meta.label in excluded:
        return True
    # An auto-created M2M table goes with the model that declares it.
    if meta.auto_created:
        owner = meta.auto_created
        return (owner._meta.app_label in excluded
                or owner._meta.label in excluded)
    return False


def check_exclusions(names: list[str], where: str = 'exclusion') -> None:
    """ConfigError naming the first of *names* that is neither an
    installed app label nor an installed model's `app_label.ModelName`.

    A typo (`nosuchapp.Foo`) once excluded nothing, silently: the rows it
    meant to leave out were copied, or the ones it missed were not.
    """
    labels = {config.label for config in apps.get_app_configs()}
    labels.update(model._meta.label
                  for model in apps.get_models(include_auto_created=True))
    for name in names:
        if name not in labels:
            raise ConfigError(
                f'{where} names {name!r}, which is no installed app label '
                'or model (use an app label such as `sessions`, or '
                '`app_label.ModelName` as in `auth.Permission`)')


def iter_concrete_models(exclude: list[str] | None = None
                         ) -> list[type[models.Model]]:
    """Concrete managed models (with auto M2M tables), sorted by label.

    Raises ConfigError when ANTHIAS_ROLLBACK_EXCLUDE or *exclude* names
    no installed app or model.
    """
    setting = conf.get_list_setting('ANTHIAS_ROLLBACK_EXCLUDE')
    check_exclusions(setting, 'ANTHIAS_ROLLBACK_EXCLUDE')
    check_exclusions(list(exclude or []))
    excluded = set(setting)
    excluded.update(exclude or [])
    found = []
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy or not meta.managed or meta.swapped:
            continue
        if is_excluded(model, excluded):
            continue
        found.append(model)
    return sorted(found, key=lambda m: m._meta.label)


def _dependencies(model: type[models.Model],
                  included: set) -> list[tuple[models.Field, type]]:
    deps = []
    for field in model._meta.concrete_fields:
        target = field.related_model if field.is_relation else None
        if target is None or isinstance(target, str):
            continue
        # An FK to a proxy model points at its concrete model's table
        # (proxies themselves are never in the plan).
        target = target._meta.concrete_model
        if target in included:
            deps.append((field, target))
    # Multi-table inheritance: the parent's row must exist first.
    for parent in model._meta.parents:
        if parent in included:
            deps.append((model._meta.parents[parent], parent))
    return deps


def plan_models(exclude: list[str] | None = None) -> ModelsPlan:
    """Models in an order where every FK target comes before its users.

    Leaves out the tables registered for this process as differing by
    engine (engine_tables.left_out_tables: may read both schemas at the
    first plan after a command registered its aliases). Depth-first
    topological sort; an edge that would close a cycle (a self-FK, or
    A->B->A) is recorded in `cyclic_fields` instead.
    """
    from anthias_rollback import engine_tables

    left_out = engine_tables.left_out_tables()
    candidates = [m for m in iter_concrete_models(exclude)
                  if m._meta.db_table not in left_out]
    included = set(candidates)
    ordered: list[type[models.Model]] = []
    state: dict[type, str] = {}
    cyclic: list[models.Field] = []

    def visit(model: type[models.Model]) -> None:
        state[model] = 'visiting'
        for field, target in _dependencies(model, included):
            if target is model or state.get(target) == 'visiting':
                cyclic.append(field)
            elif target not in state:
                visit(target)
        state[model] = 'done'
        ordered.append(model)

    for model in candidates:
        if model not in state:
            visit(model)
    return ModelsPlan(tuple(ordered), tuple(cyclic))


def get_model(label: str) -> type[models.Model]:
    """Model by `app_label.ModelName`, including auto-created M2M tables."""
    for model in apps.get_models(include_auto_created=True):
        if model._meta.label_lower == label.lower():
            return model
    raise LookupError(label)
