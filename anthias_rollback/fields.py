"""Facts about Django field types that copying and comparing share.

One copy on purpose: the comparison once treated GenericIPAddressField
as text while the copy did not, and nothing said which was right (both
were, for different engines: see TEXT_TYPES).
"""
import decimal
import functools
from typing import Any

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


def key_fields(model: type[models.Model]) -> tuple[models.Field, ...]:
    """The concrete fields whose columns make *model*'s primary key, in
    key order: one for an ordinary key, the components of a Django 5.2
    CompositePrimaryKey (which has no column of its own)."""
    return tuple(model._meta.pk_fields)


def key_columns(model: type[models.Model]) -> tuple[str, ...]:
    """The column names of *model*'s primary key, in key order."""
    return tuple(f.column for f in key_fields(model))


def is_composite_key(model: type[models.Model]) -> bool:
    """Is *model*'s primary key a tuple of columns?"""
    return len(model._meta.pk_fields) > 1


def key_kind(model: type[models.Model]) -> str | None:
    """'text', 'int' or 'uuid': primary keys both engines can select by
    range in byte order (None: only whole-table streams, which a
    composite key always takes)."""
    if is_composite_key(model):
        return None
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


# Field options that shape a column's type; copied onto a stand-in.
_TYPE_OPTIONS = ('max_length', 'max_digits', 'decimal_places')


def _plain(field: models.Field) -> bool:
    """Does *field* give values exactly as its column stores them, as
    Django's own classes do (a JSON encoder/decoder changes them)?"""
    if not type(field).__module__.startswith('django.'):
        return False
    return not (isinstance(field, models.JSONField)
                and (field.encoder is not None or field.decoder is not None))


@functools.cache
def stored_field(field: models.Field) -> models.Field:
    """The field a copy or comparison reads and writes *field*'s column
    through: *field* itself when Django's own class would give the stored
    values anyway, else a Django field of the same internal type, options
    and column, so the values move as stored, converted by the column's
    type, never through a custom class's from_db_value, get_prep_value
    or to_python (a JSONField whose from_db_value returns a wrapper
    object would not serialise back). A class whose column type differs
    from its internal type's on any configured database is kept as it
    is: its own conversions are then the only ones known to fit."""
    typed = value_field(field)
    if _plain(typed):
        return field
    internal = typed.get_internal_type()
    cls = getattr(models, internal, None)
    if not (isinstance(cls, type) and issubclass(cls, models.Field)
            and cls.__module__.startswith('django.')
            and not issubclass(cls, models.ForeignObject)):
        return field
    options = {name: getattr(typed, name) for name in _TYPE_OPTIONS
               if getattr(typed, name, None) is not None}
    try:
        stand_in = cls(db_column=field.column, null=field.null,
                       primary_key=field.primary_key, **options)
    except TypeError:   # an option this class does not take
        return field
    stand_in.set_attributes_from_name(field.name)
    stand_in.model = field.model
    for alias in connections:
        connection = connections[alias]
        if stand_in.db_type(connection) != field.db_type(connection):
            return field
    return stand_in


# Wide enough for any float's exact expansion at any scale Django allows.
_EXACT = decimal.Context(prec=2000)


def stored_decimal(value: Any, decimal_places: int) -> decimal.Decimal:
    """A decimal column's stored value at the column's scale, as
    PostgreSQL's numeric(p, s) holds it. SQLite keeps a decimal as REAL,
    INTEGER or TEXT, and Django reads a REAL back rounded to 15
    significant digits (12345678901234567168 -> 12345678901234600000);
    here it is the exact number stored, rounded half away from zero at
    the scale, as numeric's input rounds. Raises decimal.InvalidOperation
    or TypeError for a value that is no number."""
    if isinstance(value, decimal.Decimal):
        number = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = decimal.Decimal(value)   # a float's exact value
    elif isinstance(value, str):
        number = decimal.Decimal(value.strip())
    else:
        raise TypeError(f'{type(value).__name__} is not a number')
    if not number.is_finite():
        return number
    return number.quantize(decimal.Decimal(1).scaleb(-decimal_places),
                           rounding=decimal.ROUND_HALF_UP, context=_EXACT)
