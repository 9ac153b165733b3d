"""The same awkward rows on both aliases, stored differently on each.

Each side gets its own instances: JSON with the other key order, Decimals
with another scale, datetimes in another time zone (same instant), so a
comparison that looks at raw storage would report false differences.
"""
import datetime as dt
import uuid
from decimal import Decimal

from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType

from anthias_app.models import Asset
from tests.helpers.factories import AssetFactory
from tests.kitchensink.models import (
    Category,
    Item,
    ItemDetail,
    Membership,
    Person,
    Tag,
)

UTC = dt.UTC
PLUS2 = dt.timezone(dt.timedelta(hours=2))
# Text primary keys whose order differs between bytewise and locale
# collations (case, accents, punctuation, emoji).
ODD_ASSET_IDS = ['Zebra', 'apple', 'Apple', '_under', 'éclair', 'eclair',
                 '🎉party', 'a-b', 'ab', 'A b', '0001', 'z']


def _ordered(data: dict, reverse: bool) -> dict:
    items = list(data.items())
    if reverse:
        items.reverse()
    return {k: _ordered(v, reverse) if isinstance(v, dict) else v
            for k, v in items}


def kitchen_objects(side: int) -> list[list]:
    """Kitchen-sink rows in FK order; *side* 0 or 1 picks the storage
    variant (key order, Decimal scale, time zone)."""
    cats = [Category(id=1, name='Root ☕'),
            Category(id=2, name='Child 数字', parent_id=1),
            Category(id=3, name="O'Brien \"q\"", parent_id=2)]
    tags = [Tag(id=uuid.UUID(int=(i + 1) * 7919), label=f'tag {i} 🎉')
            for i in range(4)]
    items = []
    for i in range(1, 9):
        at = dt.datetime(2024, 2, 29, 23, 59, 59, (i * 123457) % 10 ** 6,
                         tzinfo=UTC)
        data = {'z': i, 'a': {'y': [1, 2.5, None], 'b': 'ü🎉'},
                'ok': i % 2 == 0, 'null': None}
        items.append(Item(
            id=i, category_id=1 + i % 3,
            alt_category_id=None if i % 2 else 2,
            title=f'Ünïcödé {i} 🚀', body='tab\tand\nnewline' * (i % 3),
            kind=['img', 'vid', 'web'][i % 3], flag=i % 2 == 0,
            maybe=[None, True, False][i % 3], small=-i, count=i * 1000,
            big=None if i % 4 == 0 else 2 ** 40 + i, positive=i,
            ratio=None if i == 3 else 0.1 * i,
            price=None if i == 5 else (
                Decimal(f'{i}.5000') if side else Decimal(f'{i}.5')),
            day=dt.date(2000 + i, 1, i), at=at if side == 0
            else at.astimezone(PLUS2),
            clock=dt.time(6, 30, 15, 250000 + i),
            span=dt.timedelta(days=i, microseconds=7),
            blob=None if i == 2 else bytes([0, 255, i]) * i,
            data=_ordered(data, bool(side)),
            ref=uuid.UUID(int=1000 + i), email=f'u{i}@example.com',
            slug=f'slug-{i}', url=f'https://example.com/{i}?q=é',
            ip=None if i == 4 else (f'10.0.0.{i}' if i % 2
                                    else f'2001:db8::{i:x}')))
    details = [ItemDetail(item_id=i, notes=f'notes {i} ✓')
               for i in (1, 2, 5)]
    people = [Person(id=1, name='Zoë'), Person(id=2, name='李', mentor_id=1)]
    members = [Membership(id=1, person_id=1, item_id=1, role='owner',
                          joined=dt.datetime(2024, 1, 1, 0, 0, 0, 1,
                                             tzinfo=UTC)),
               Membership(id=2, person_id=2, item_id=3, joined=None)]
    item_tags = [Item.tags.through(id=k + 1, item_id=1 + k % 8,
                                   tag_id=tags[k % 4].id) for k in range(6)]
    related = [Item.related.through(id=1, from_item_id=1, to_item_id=2),
               Item.related.through(id=2, from_item_id=2, to_item_id=1)]
    return [cats, tags, items, details, people, members, item_tags, related]


def asset_copies(assets: list[Asset], side: int) -> list[Asset]:
    """Fresh Asset instances with the same values (JSON key order varies
    with *side*)."""
    fields = Asset._meta.concrete_fields
    copies = []
    for asset in assets:
        values = {f.attname: getattr(asset, f.attname) for f in fields}
        if isinstance(values['metadata'], dict):
            values['metadata'] = _ordered(values['metadata'], bool(side))
        copies.append(Asset(**values))
    return copies


def build_assets(n: int) -> list[Asset]:
    assets = AssetFactory.build_batch(n)
    for asset, odd in zip(assets, ODD_ASSET_IDS):
        asset.asset_id = odd
    assets[0].name = None
    assets[1].metadata = {}
    return assets


def mirror_rows(models: list, source: str, target: str) -> None:
    """Make *target* hold exactly *source*'s rows of *models* (FK order)."""
    for model in reversed(models):
        model._base_manager.using(target).all().delete()
    for model in models:
        rows = list(model._base_manager.using(source).order_by('pk'))
        model._base_manager.using(target).bulk_create(rows)


def fill_both(left_alias: str, right_alias: str, n_assets: int = 40
              ) -> list[Asset]:
    """The same rows on both aliases; returns the (left) assets.

    Content types and permissions are re-created after each transactional
    test's flush with ids that differ per engine (PostgreSQL sequences are
    not reset), so they are mirrored first.
    """
    mirror_rows([ContentType, Permission], left_alias, right_alias)
    assets = build_assets(n_assets)
    for side, alias in enumerate((left_alias, right_alias)):
        for batch in kitchen_objects(side):
            type(batch[0]).objects.using(alias).bulk_create(batch)
        Asset.objects.using(alias).bulk_create(asset_copies(assets, side))
    return assets
