"""Every model shape a real project has, in one app (installed in the
CMS host, tests/hosts/cms): a composite primary key, NUL bytes, a wide
decimal, a self FK in a mixed-case table with reserved-word columns,
multi-table inheritance, a proxy, an abstract base, an unmanaged model,
an M2M with a through table, a generic relation, an FK cycle, and a
JSON field whose Python value is a wrapper object."""
import os

from django.contrib.contenttypes.fields import (
    GenericForeignKey,
    GenericRelation,
)
from django.contrib.contenttypes.models import ContentType
from django.db import models
from taggit.managers import TaggableManager


class Wrapped:
    """What WrappedJSONField hands the app: not JSON-serialisable, and
    equal only to itself (a field's Python value is not its stored one)."""

    def __init__(self, data):
        self.data = data

    def __repr__(self) -> str:
        return f'Wrapped({self.data!r})'


class WrappedJSONField(models.JSONField):
    def from_db_value(self, value, expression, connection):
        value = super().from_db_value(value, expression, connection)
        return None if value is None else Wrapped(value)

    def get_prep_value(self, value):
        if isinstance(value, Wrapped):
            value = value.data
        return super().get_prep_value(value)

    def to_python(self, value):
        return value


class Composite(models.Model):
    """Django 5.2's CompositePrimaryKey: no single key column."""
    pk = models.CompositePrimaryKey('region', 'number')
    region = models.CharField(max_length=10)
    number = models.IntegerField()
    label = models.CharField(max_length=50)
    blob = models.BinaryField(null=True)


class Numbers(models.Model):
    blob = models.BinaryField()
    amount = models.DecimalField(max_digits=30, decimal_places=10)
    ratio = models.FloatField(null=True)


class MixedCase(models.Model):
    """A mixed-case table name, reserved words as column names, and a
    self FK."""
    order = models.IntegerField(db_column='order')
    select = models.CharField(max_length=20, db_column='select')
    group = models.CharField(max_length=20, db_column='group', blank=True)
    parent = models.ForeignKey('self', null=True, blank=True,
                               db_column='Parent', on_delete=models.CASCADE,
                               related_name='children')

    class Meta:
        db_table = 'MixedCase'


class Stamped(models.Model):
    created = models.DateTimeField(auto_now_add=True)
    notes = models.TextField(blank=True)

    class Meta:
        abstract = True


class Place(Stamped):
    name = models.CharField(max_length=50)
    remarks = GenericRelation('Remark')
    tags = TaggableManager(blank=True)


class Restaurant(Place):
    serves_pizza = models.BooleanField(default=False)
    rating = models.DecimalField(max_digits=3, decimal_places=1, null=True)


class Pizzeria(Restaurant):
    oven = models.CharField(max_length=20, blank=True)


class PlaceProxy(Place):
    class Meta:
        proxy = True


class Legacy(models.Model):
    """Unmanaged: its table is made and filled by migration 0001's SQL."""
    name = models.CharField(max_length=50)

    class Meta:
        managed = False
        db_table = 'corners_legacy'


class Club(models.Model):
    name = models.CharField(max_length=50)
    members = models.ManyToManyField('Member', through='Membership',
                                     related_name='clubs')


class Member(models.Model):
    name = models.CharField(max_length=50)


class Membership(models.Model):
    club = models.ForeignKey(Club, on_delete=models.CASCADE)
    member = models.ForeignKey(Member, on_delete=models.CASCADE)
    since = models.DateField()


class Remark(models.Model):
    content_type = models.ForeignKey(ContentType, on_delete=models.CASCADE)
    object_id = models.PositiveIntegerField()
    target = GenericForeignKey('content_type', 'object_id')
    text = models.TextField()


class Chicken(models.Model):
    """Chicken -> Egg -> Chicken: an FK cycle."""
    name = models.CharField(max_length=50)
    first_egg = models.ForeignKey('Egg', null=True, blank=True,
                                  on_delete=models.SET_NULL,
                                  related_name='+')


class Egg(models.Model):
    layer = models.ForeignKey(Chicken, null=True, on_delete=models.CASCADE,
                              related_name='eggs')


class Payload(models.Model):
    data = WrappedJSONField(null=True)



class Setting(models.Model):
    """Created and filled in the same migration (0002), by a RunPython
    that writes through the default manager."""
    key = models.CharField(max_length=50, unique=True)
    value = models.CharField(max_length=200)
    # The CMS host's release 3 adds this column mid-window
    # (tests/hosts/cms/release3/corners/migrations/0003).
    if os.environ.get('CMS_HOST_RELEASE') == '3':
        priority = models.IntegerField(db_default=0)
