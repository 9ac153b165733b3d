"""Data builders and comparisons shared by the transfer tests."""
import contextlib
import datetime as dt
import uuid
from decimal import Decimal
from io import StringIO
from pathlib import Path

from django.core.management import call_command
from django.db import connections

from anthias_rollback import profiles
from anthias_rollback.transfer import transfer_models
from tests.helpers.factories import AssetFactory, UserFactory
from tests.kitchensink.models import (
    Category,
    Item,
    ItemDetail,
    Membership,
    Person,
    Tag,
)

UTC = dt.UTC


def make_kitchen_sink(alias: str = 'sqlite') -> None:
    """Every field type and relation, with awkward values, on *alias*."""
    root = Category.objects.using(alias).create(name='Root ☕')
    child = Category.objects.using(alias).create(name='Child 数字',
                                                 parent=root)
    tags = [Tag.objects.using(alias).create(label=label)
            for label in ('a', 'ü', '🎉')]
    items = []
    for n in range(12):
        item = Item.objects.using(alias).create(
            category=child if n % 2 else root,
            alt_category=None if n % 3 else root,
            title=f"Item {n} O'Brien \"q\" \\ tab\tnl\n",
            body='x' * (n * 50),
            kind=('img', 'vid', 'web')[n % 3],
            flag=bool(n % 2), maybe=(None, True, False)[n % 3],
            small=-32768 if n == 0 else n, count=2 ** 31 - 1 - n,
            big=None if n == 1 else -(2 ** 63) + n,
            positive=n, ratio=None if n == 2 else 1 / 3 + n,
            price=None if n == 3 else Decimal('12345678.1234') - n,
            day=dt.date(1999, 12, 31) + dt.timedelta(days=n),
            at=dt.datetime(2024, 3, 31, 1, 59, 59, 999999, tzinfo=UTC)
            + dt.timedelta(hours=n),
            clock=dt.time(23, 59, 59, 999999) if n % 2 else dt.time(0, 0),
            span=dt.timedelta(days=-1, seconds=5, microseconds=7)
            if n == 4 else dt.timedelta(days=n, microseconds=n),
            blob=None if n == 5 else bytes(range(256)) * (n % 3),
            data={'n': n, 'ü': ['🎉', None, 1.5, True],
                  'nested': {'a': []}} if n % 4 else [1, 'two', None],
            ref=uuid.UUID(int=n),
            email=f'p{n}@example.com', slug=f'slug-{n}',
            url=f'https://example.com/{n}',
            ip=None if n % 2 else ('10.0.0.1', '2001:db8::1')[n % 4 // 2])
        item.tags.set(tags[: n % 4])
        items.append(item)
    items[0].related.add(items[1], items[2])
    ItemDetail.objects.using(alias).create(item=items[0], notes='détail')
    mentor = Person.objects.using(alias).create(name='Ada')
    pupil = Person.objects.using(alias).create(name='Bob', mentor=mentor)
    mentor.mentor = pupil   # a real cycle through the self-FK
    mentor.save(using=alias)
    Membership.objects.using(alias).create(
        person=pupil, item=items[3], role='owner',
        joined=dt.datetime(2020, 2, 29, 12, tzinfo=UTC))


def make_assets(n: int = 40) -> list:
    UserFactory.create_batch(3)
    return AssetFactory.create_batch(n)


@contextlib.contextmanager
def fresh_sqlite(path: Path):
    """A new, fully migrated SQLite file registered as a temporary
    alias (what the rollback copies PostgreSQL into)."""
    with profiles.sqlite_file_alias(path) as alias:
        call_command('migrate', database=alias, interactive=False,
                     verbosity=0, stdout=StringIO())
        yield alias


def rows_by_pk(alias: str, model) -> dict:
    """Every field's attribute value per pk, read through the ORM."""
    names = [f.attname for f in model._meta.concrete_fields]
    found = {}
    for values in model._base_manager.using(alias).values_list(*names):
        row = dict(zip(names, values))
        for key, value in row.items():
            if isinstance(value, memoryview):
                row[key] = bytes(value)
        found[row[model._meta.pk.attname]] = row
    return found


def assert_same_rows(left: str, right: str, models=None) -> int:
    """Every row of every model equal field by field; returns rows."""
    total = 0
    for model in models or transfer_models():
        if model._meta.label == 'migrations.Migration':
            continue
        a, b = rows_by_pk(left, model), rows_by_pk(right, model)
        assert a.keys() == b.keys(), model._meta.label
        for pk, row in a.items():
            assert row == b[pk], (model._meta.label, pk)
            for key, value in row.items():
                # Same Python types too (1 vs True would compare equal).
                assert type(value) is type(b[pk][key]), (
                    model._meta.label, pk, key)
        total += len(a)
    return total


def raw_rows(alias: str, table: str) -> list[tuple]:
    """Stored values as the sqlite3 driver returns them (no Django
    converters), in column order."""
    connections[alias].ensure_connection()
    return connections[alias].connection.execute(
        f'SELECT * FROM {table} ORDER BY 1').fetchall()
