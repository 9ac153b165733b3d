"""Facts about Django field types that copying and comparing share.

One copy on purpose: the comparison once treated GenericIPAddressField
as text while the copy did not, and nothing said which was right (both
were, for different engines: see TEXT_TYPES).
"""
from django.db import connections, models

# Stored as text on both engines, so byte order is defined on both.
TEXT_TYPES = frozenset({'CharField', 'TextField', 'SlugField', 'EmailField',
                        'URLField', 'FilePathField'})
# PostgreSQL's inet normalises the text it stores ('::0001' -> '::1'), so
# an IP address is text only on SQLite's side.
SQLITE_TEXT_TYPES = TEXT_TYPES | {'GenericIPAddressField'}
AUTO_TYPES = frozenset({'AutoField', 'BigAutoField', 'SmallAutoField'})
INT_TYPES = AUTO_TYPES | {'IntegerField', 'BigIntegerField',
                          'SmallIntegerField', 'PositiveIntegerField',
                          'PositiveBigIntegerField',
                          'PositiveSmallIntegerField'}


def value_field(field: models.Field) -> models.Field:
    """The field that gives a column its values and type (a foreign key
    -> the field it points to, followed to the end)."""
    while field.is_relation and getattr(field, 'target_field', None):
        field = field.target_field
    return field


def internal_type(field: models.Field) -> str:
    """`get_internal_type()` of the field that gives *field* its values."""
    return value_field(field).get_internal_type()


def key_kind(model: type[models.Model]) -> str | None:
    """'text', 'int' or 'uuid': primary keys both engines can select by
    range in byte order (None: only whole-table streams)."""
    internal = internal_type(model._meta.pk)
    if internal in TEXT_TYPES:
        return 'text'
    if internal in INT_TYPES:
        return 'int'
    if internal == 'UUIDField':
        return 'uuid'
    return None


def has_auto_key(model: type[models.Model]) -> bool:
    """Does *model* take its primary key from a sequence/autoincrement?"""
    return model._meta.pk.get_internal_type() in AUTO_TYPES


def integer_ranges(alias: str) -> dict[str, tuple[int, int]]:
    """Django's (min, max) per integer field type on *alias*'s engine."""
    return connections[alias].ops.integer_field_ranges
