"""Generated rows and simulated production writes, for the drill.

`seed_database` fills every model the transfer moves with realistic,
awkward, reproducible values (Unicode, tabs and newlines, microseconds,
integer extremes, JSON, bytes) through the ORM, for any host's models.
`simulate_writes` does what production does after a cutover (creates,
edits, deletes through `save`/`delete`), and `check_writes_kept` proves
a rollback brought those writes back. bench/seed.py builds its much
larger files with raw SQL instead (a million assets in seconds).
"""
import datetime as dt
import decimal
import random
import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import IntegrityError, models, transaction

from anthias_rollback import fields, models_graph, transfer
from anthias_rollback.exceptions import DrillError

# What an app's own model code raises for a generated write it refuses
# (a unique clash, PROTECT, its validation, a tree node with no parent,
# wagtail's StreamField refusing generated JSON with TypeError, an
# image model reading a generated file name that is on no disk with
# OSError): the write is skipped, as production could not make it
# either, and counted in the drill's detail.
REFUSED = (IntegrityError, ValidationError, ObjectDoesNotExist, TypeError,
           ValueError, OSError)

# Rows per model seeded for Django's own apps (users, sessions, admin
# log): a device's worth, whatever N is (bench/seed.py does the same).
FRAMEWORK_ROWS = 20

TEXTS = ['Café menu ☕', 'Ünïcödé board', '数字标牌', 'Emoji 🎉🚀',
         "O'Brien's \"quotes\"", 'tab\tand\nnewline', 'Lobby screen']


class _NoValue(Exception):
    """No value can be generated for a field (an unknown type)."""


class _Generator:
    """Realistic, awkward, reproducible values for any model field:
    Unicode, tabs and newlines, microseconds, big integers, JSON, bytes.
    Unique fields carry a per-run token and the row index."""

    def __init__(self, seed: int, alias: str) -> None:
        self.rng = random.Random(seed)
        # Django's own limits: the extremes must fit the column.
        self.int_ranges = fields.integer_ranges(alias)
        self.token = f'{self.rng.getrandbits(32):08x}'
        self.aware = bool(getattr(settings, 'USE_TZ', False))

    def value(self, fld: models.Field, i: int) -> Any:
        if fld.choices:
            choices = [c for c, _ in fld.flatchoices]
            if choices:
                return choices[i % len(choices)]
        unique = fld.unique or fld.primary_key
        if fld.null and not unique and i % 7 == 3:
            return None
        kind = fld.get_internal_type()
        maker = getattr(self, f'_{kind}', None)
        if maker is not None:
            return maker(fld, i, unique)
        if kind in self.int_ranges:
            low, high = self.int_ranges[kind]
            if unique:
                return max(low, 0) + i + 1
            return self.rng.choice([low, high, 0, i, self.rng.randint(
                max(low, -10 ** 6), min(high, 10 ** 6))])
        if fld.has_default():
            return fld.get_default()
        raise _NoValue(f'{fld.model._meta.label}.{fld.name} ({kind})')

    def _text(self, fld: models.Field, i: int, unique: bool) -> str:
        text = f'{self.rng.choice(TEXTS)} #{i}'
        if unique:
            text = f'{self.token}-{i}-{text}'
        limit = fld.max_length
        return text[:limit] if limit else text

    _CharField = _TextField = _text

    def _SlugField(self, fld, i, unique):
        return f'slug-{self.token}-{i}'[:fld.max_length]

    def _EmailField(self, fld, i, unique):
        return f'user{i}.{self.token}@example.org'

    def _URLField(self, fld, i, unique):
        return (f'https://cdn.example.com/{self.token}/{i}/'
                f'{"x" * (i % 40)}file.mp4?q=é')[:fld.max_length]

    def _FileField(self, fld, i, unique):
        return f'uploads/{self.token}/{i}.png'[:fld.max_length]

    _ImageField = _FilePathField = _FileField

    def _GenericIPAddressField(self, fld, i, unique):
        if i % 2 and fld.protocol.lower() != 'ipv4':
            return f'2001:db8::{i + 1:x}'
        return f'10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}'

    def _BooleanField(self, fld, i, unique):
        return self.rng.random() < 0.7

    def _FloatField(self, fld, i, unique):
        return self.rng.choice([0.0, -1.5, 1e-9, self.rng.uniform(-1e6,
                                                                  1e6)])

    def _DecimalField(self, fld, i, unique):
        digits = max(1, (fld.max_digits or 10) - 1)
        scale = fld.decimal_places or 0
        number = self.rng.randrange(10 ** digits)
        return decimal.Decimal(number).scaleb(-scale)

    def _datetime(self) -> dt.datetime:
        base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC if self.aware
                           else None)
        return base + dt.timedelta(seconds=self.rng.randrange(60_000_000),
                                   microseconds=self.rng.randrange(10 ** 6))

    def _DateTimeField(self, fld, i, unique):
        return self._datetime()

    def _DateField(self, fld, i, unique):
        return self._datetime().date()

    def _TimeField(self, fld, i, unique):
        return self._datetime().time().replace(tzinfo=None)

    def _DurationField(self, fld, i, unique):
        return dt.timedelta(seconds=self.rng.randrange(10 ** 7),
                            microseconds=self.rng.randrange(10 ** 6))

    def _BinaryField(self, fld, i, unique):
        return bytes(self.rng.getrandbits(8) for _ in range(16))

    def _JSONField(self, fld, i, unique):
        return {'n': i, 'tags': ['a', 'ü', '🎉'], 'ok': i % 2 == 0,
                'nested': {'z': self.rng.randrange(10 ** 9),
                           'a': [1.5, None, 'tab\t']}}

    def _UUIDField(self, fld, i, unique):
        return uuid.UUID(int=self.rng.getrandbits(128))


def _seedable(model: type[models.Model], skip: set[str]) -> bool:
    meta = model._meta
    return not meta.auto_created and meta.label_lower not in skip


def _unique_sets(model: type[models.Model]) -> list[tuple[str, ...]]:
    meta = model._meta
    sets = [tuple(meta.get_field(n).attname for n in names)
            for names in meta.unique_together]
    for constraint in meta.constraints:
        names = getattr(constraint, 'fields', ())
        if isinstance(constraint, models.UniqueConstraint) and names \
                and constraint.condition is None:
            sets.append(tuple(meta.get_field(n).attname for n in names))
    return sets


def _build_rows(model: type[models.Model], alias: str, count: int,
                start: int, gen: _Generator, cyclic: set
                ) -> list[models.Model]:
    """Up to *count* unsaved instances; FKs point at existing rows."""
    meta = model._meta
    targets: dict[models.Field, list[Any]] = {}
    values: list[models.Field] = []
    for fld in meta.concrete_fields:
        if fld.primary_key and isinstance(fld, models.AutoField):
            continue
        if fld.is_relation:
            if fld in cyclic:
                if not fld.null:
                    raise _NoValue(f'{meta.label}.{fld.name} (cycle)')
                continue   # filled later by _link_cycles
            related = fld.related_model._base_manager.using(alias)
            keys = list(related.order_by(fld.target_field.attname)
                        .values_list(fld.target_field.attname, flat=True))
            if not keys and not fld.null:
                return []
            targets[fld] = keys
            if fld.unique:
                taken = set(model._base_manager.using(alias).values_list(
                    fld.attname, flat=True))
                targets[fld] = [k for k in keys if k not in taken]
                count = min(count, len(targets[fld]))
        else:
            values.append(fld)
    seen: dict[tuple[str, ...], set] = {s: set() for s in _unique_sets(model)}
    rows = []
    for i in range(start, start + count):
        data = {}
        for fld, keys in targets.items():
            data[fld.attname] = keys[(i - start if fld.unique else i)
                                     % len(keys)] if keys else None
        for fld in values:
            data[fld.attname] = gen.value(fld, i)
        duplicate = False
        for names, found in seen.items():
            key = tuple(data.get(n) for n in names)
            duplicate = duplicate or key in found
            found.add(key)
        if not duplicate:
            rows.append(model(**data))
    return rows


def _link_cycles(model: type[models.Model], alias: str,
                 cyclic: set) -> None:
    """Point every third row's self/cyclic FK at an earlier row."""
    refs = [f for f in model._meta.concrete_fields
            if f in cyclic and f.related_model is model]
    if not refs:
        return
    objs = list(model._base_manager.using(alias).order_by('pk'))
    changed = []
    for i, obj in enumerate(objs):
        if i and i % 3 == 0:
            for fld in refs:
                setattr(obj, fld.attname, objs[(i - 1) // 2].pk)
            changed.append(obj)
    model._base_manager.using(alias).bulk_update(
        changed, [f.name for f in refs], batch_size=500)


def _fill_many_to_many(model: type[models.Model], alias: str) -> int:
    """One link per source row in each auto-created M2M table."""
    made = 0
    for m2m in model._meta.local_many_to_many:
        through = m2m.remote_field.through
        if not through._meta.auto_created:
            continue
        source = list(model._base_manager.using(alias)
                      .values_list('pk', flat=True)[:FRAMEWORK_ROWS * 10])
        target = list(m2m.related_model._base_manager.using(alias)
                      .values_list('pk', flat=True)[:FRAMEWORK_ROWS * 10])
        if not source or not target:
            continue
        src = through._meta.get_field(m2m.m2m_field_name()).attname
        dst = through._meta.get_field(m2m.m2m_reverse_field_name()).attname
        links = [through(**{src: s, dst: target[i % len(target)]})
                 for i, s in enumerate(source)]
        through._base_manager.using(alias).bulk_create(
            links, batch_size=500, ignore_conflicts=True)
        made += len(links)
    return made


def seed_database(alias: str, rows: int, seed: int = 42
                  ) -> dict[str, int]:
    """Fill every model the transfer moves on *alias* (already migrated)
    with generated rows: *rows* per model of the host's apps, up to
    FRAMEWORK_ROWS per model of Django's own apps, M2M links, nullable
    self-references. Rows `migrate` makes (content types, permissions)
    are left as migrate made them. Writes only *alias*, in one
    transaction, with bulk_create (no signals). Returns rows per label.
    """
    gen = _Generator(seed, alias)
    plan = models_graph.plan_models()
    cyclic = set(plan.cyclic_fields)
    skip = transfer.migrate_created_labels()
    made: dict[str, int] = {}
    with transaction.atomic(using=alias):
        for model in plan.models:
            if not _seedable(model, skip):
                continue
            framework = model._meta.app_config.name.startswith('django.')
            count = min(rows, FRAMEWORK_ROWS) if framework else rows
            try:
                objs = _build_rows(model, alias, count, 0, gen, cyclic)
            except _NoValue:
                continue
            model._base_manager.using(alias).bulk_create(objs,
                                                         batch_size=500)
            _link_cycles(model, alias, cyclic)
            made[model._meta.label] = len(objs)
        for model in plan.models:
            if _seedable(model, skip):
                _fill_many_to_many(model, alias)
    return made


# -- simulated production writes and their check -----------------------

def _editable_field(model: type[models.Model]) -> models.Field | None:
    """A plain field to edit: text first, else any non-key value."""
    candidates = [f for f in model._meta.concrete_fields
                  if not (f.primary_key or f.is_relation or f.unique
                          or getattr(f, 'auto_now', False)
                          or getattr(f, 'auto_now_add', False))]
    text = [f for f in candidates if not f.choices and
            f.get_internal_type() in ('TextField', 'CharField')]
    return (text or candidates or [None])[0]


def simulate_writes(alias: str, seed: int = 7
                    ) -> dict[str, dict[str, list[Any]]]:
    """What production does after a cutover, through the ORM on *alias*
    (`save`, `delete`, signals and cascades included): per model with
    rows, 2 creates, 2 edits, 1 delete. A write the data or the app's
    code refuses (PROTECT, a unique clash, a missing file) is skipped in
    its own savepoint. Returns the keys created, edited and deleted per
    label (a cascade's extra deletions are not listed), and under
    'refused' the exception class of each skipped write."""
    gen = _Generator(seed, alias)
    plan = models_graph.plan_models()
    cyclic = set(plan.cyclic_fields)
    skip = transfer.migrate_created_labels()
    done: dict[str, dict[str, list[Any]]] = {}
    for model in plan.models:
        if not _seedable(model, skip):
            continue
        manager = model._base_manager.using(alias)
        existing = manager.count()
        if existing < 3:
            continue
        keys: dict[str, list[Any]] = {'created': [], 'edited': [],
                                      'deleted': [], 'refused': []}
        try:
            fresh = _build_rows(model, alias, 2, existing + 10_000, gen,
                                cyclic)
        except (_NoValue, *REFUSED):
            fresh = []
        for obj in fresh:
            try:
                with transaction.atomic(using=alias):
                    obj.save(using=alias, force_insert=True)
                keys['created'].append(obj.pk)
            except REFUSED as exc:
                keys['refused'].append(type(exc).__name__)
        editable = _editable_field(model)
        if editable is not None:
            for n, obj in enumerate(manager.order_by('pk')[:2]):
                setattr(obj, editable.attname,
                        gen.value(editable, existing + 20_000 + n))
                try:
                    with transaction.atomic(using=alias):
                        obj.save(using=alias, update_fields=[editable.name])
                except REFUSED as exc:
                    keys['refused'].append(type(exc).__name__)
                    continue
                keys['edited'].append(obj.pk)
        fresh_keys = set(keys['created']) | set(keys['edited'])
        for obj in manager.order_by('-pk')[:5]:
            if obj.pk in fresh_keys:
                continue
            pk = obj.pk
            try:
                # The queryset's delete (Django's collector: signals and
                # cascades), not the instance's: apps override delete()
                # with their own signature (wagtail's Revision has no
                # `using`).
                with transaction.atomic(using=alias):
                    manager.filter(pk=pk).delete()
            except REFUSED as exc:
                # PROTECT / RESTRICT: production could not either
                keys['refused'].append(type(exc).__name__)
                continue
            keys['deleted'].append(pk)
            break
        done[model._meta.label] = keys
    return done


def check_writes_kept(restored_alias: str, postgres_alias: str,
                      writes: dict[str, dict[str, list[Any]]]) -> int:
    """DrillError unless every created or edited row still on
    PostgreSQL is in the restored file, and no deleted one is. Reads
    both aliases. Returns the number of writes checked."""
    checked = 0
    for label, keys in writes.items():
        model = models_graph.get_model(label)
        present = set(keys['created']) | set(keys['edited'])
        # A later simulated delete may cascade to a row written earlier.
        # Lists: a composite key's `pk__in` takes no set.
        expected = set(model._base_manager.using(postgres_alias).filter(
            pk__in=list(present)).values_list('pk', flat=True)) \
            if present else set()
        restored = model._base_manager.using(restored_alias)
        found = set(restored.filter(pk__in=list(expected)).values_list(
            'pk', flat=True)) if expected else set()
        if found != expected:
            raise DrillError(f'{label}: {len(expected - found)} rows '
                             'written on PostgreSQL are missing after the '
                             'rollback')
        if keys['deleted'] and restored.filter(
                pk__in=keys['deleted']).exists():
            raise DrillError(f'{label}: rows deleted on PostgreSQL came '
                             'back after the rollback')
        checked += len(expected) + len(keys['deleted'])
    return checked
