"""Row converters compiled per model, with fast paths per engine pair.

The generic path (transfer.Converter.funcs) calls the source backend's
converters, the field's from_db_value and get_db_prep_value for every
value: about 20 Python calls per value, which made a 1,000,000-row copy
CPU-bound (profiled: 85 % of the time). For Django's own field classes
the result of that chain is known, so one expression per column computes
the same output directly; any value the fast expression is not sure of
(an unexpected type, a NUL byte, a too-long string, an out-of-range
integer) goes through the generic function of its column instead, which
also reports the problem. Custom field classes always take the generic
path.
"""
import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connections, models

from anthias_rollback.engines.postgresql import postgres_escape

TEXT_TYPES = {'CharField', 'TextField', 'SlugField', 'EmailField',
              'URLField', 'FilePathField', 'GenericIPAddressField'}
# GenericIPAddressField: PostgreSQL's inet normalises the text, so it is
# only "text" in the SQLite direction.
PG_TEXT_TYPES = TEXT_TYPES - {'GenericIPAddressField'}
INT_TYPES = {'IntegerField', 'BigIntegerField', 'SmallIntegerField',
             'PositiveIntegerField', 'PositiveBigIntegerField',
             'PositiveSmallIntegerField', 'AutoField', 'BigAutoField',
             'SmallAutoField'}


def _builtin(field: models.Field) -> bool:
    return type(field).__module__.startswith('django.')


def _utc(alias: str) -> Any:
    """The connection's time zone object if it is UTC (Django's default
    for both backends with USE_TZ), else None: no fast path then."""
    connection = connections[alias]
    if not settings.USE_TZ or connection.timezone_name != 'UTC':
        return None
    return connection.timezone


def _sqlite_to_postgres_helpers() -> dict[str, Callable]:
    fromiso = dt.datetime.fromisoformat
    date_fromiso = dt.date.fromisoformat
    time_fromiso = dt.time.fromisoformat

    # Same result as SQLite's convert_datetimefield_value (parse, then
    # make_aware in UTC) followed by COPY's isoformat().
    def datetime_text(value: str) -> str:
        parsed = fromiso(value)   # validates
        if parsed.tzinfo is None:
            # Django's own 'YYYY-MM-DD HH:MM:SS[.ffffff]' goes as is.
            if len(value) in (19, 26) and value[10] == ' ':
                return value + '+00:00'
            return parsed.isoformat() + '+00:00'
        return parsed.isoformat()

    def date_text(value: str) -> str:
        return date_fromiso(value).isoformat()

    def time_text(value: str) -> str:
        # django.utils.dateparse.parse_time drops any offset.
        parsed = time_fromiso(value)
        if parsed.tzinfo is not None:
            parsed = parsed.replace(tzinfo=None)
        return parsed.isoformat()

    exponent = re.compile(r'\d[eE][+-]?\d').search

    def json_plain(value: str) -> bool:
        # The text can go as is when jsonb reads it back as the same
        # Python value. Exponents (1E2 would come back an int), NaN,
        # Infinity and \u0000 (jsonb rejects them) take the generic path,
        # which re-encodes or reports them.
        return not (exponent(value) or 'NaN' in value
                    or 'Infinity' in value or '\\u0000' in value)

    return {'datetime_text': datetime_text, 'date_text': date_text,
            'time_text': time_text, 'json_plain': json_plain}


def _postgres_to_sqlite_helpers(tz: Any) -> dict[str, Callable]:
    utc = dt.UTC

    # SQLite's adapt_datetimefield_value: make_naive in the connection's
    # zone (UTC here), then str().
    def datetime_param(value: dt.datetime) -> str:
        if value.tzinfo is not utc:
            value = value.astimezone(utc)
        return value.replace(tzinfo=None).isoformat(' ')

    return {'datetime_param': datetime_param}


def _postgres_expression(i: int, field: models.Field, source_vendor: str,
                         tz: Any, ranges: dict, json_flags: list[int]
                         ) -> str | None:
    v, f, none = f'v{i}', f'f{i}', "'\\\\N'"
    internal = field.get_internal_type()
    if internal in PG_TEXT_TYPES:
        checks = f"type({v}) is str and '\\x00' not in {v}"
        if field.max_length:
            checks += f' and len({v}) <= {int(field.max_length)}'
        # The escape call only for the rare text that needs it.
        return (f'({none} if {v} is None else ({v} if not special({v}) '
                f'else esc({v})) if {checks} else {f}({v}))')
    if internal in INT_TYPES:
        low, high = ranges[internal]
        return (f'({none} if {v} is None else str({v}) if type({v}) is int '
                f'and {low} <= {v} <= {high} else {f}({v}))')
    if internal == 'BooleanField':
        return (f"({none} if {v} is None else 't' if {v} is True else "
                f"'f' if {v} is False else {f}({v}))")
    if source_vendor != 'sqlite' or tz is None:
        return None
    if internal == 'JSONField' and field.encoder is None \
            and field.decoder is None and i in json_flags:
        flag = f'j{json_flags.index(i)}'
        return (f'({none} if {v} is None else text({v}) if {flag} == 1 '
                f'and type({v}) is str and json_plain({v}) else {f}({v}))')
    helper = {'DateTimeField': 'datetime_text', 'DateField': 'date_text',
              'TimeField': 'time_text'}.get(internal)
    if helper is None:
        return None
    return (f'({none} if {v} is None else {helper}({v}) if type({v}) is '
            f'str else {f}({v}))')


def _sqlite_expression(i: int, field: models.Field, source_vendor: str,
                       tz: Any, ranges: dict, json_flags: list[int]
                       ) -> str | None:
    v, f = f'v{i}', f'f{i}'
    internal = field.get_internal_type()
    if internal in TEXT_TYPES:
        return f'({v} if {v} is None or type({v}) is str else {f}({v}))'
    if internal in INT_TYPES:
        return f'({v} if {v} is None or type({v}) is int else {f}({v}))'
    if internal == 'BooleanField':
        # As 1/0: sqlite3 stores a bool as that same INTEGER, but binds
        # an int directly and a bool only after an adapter lookup (a
        # fifth of the insert time of an Asset row, measured).
        return (f'({v} if {v} is None else 1 if {v} is True else 0 if '
                f'{v} is False else {f}({v}))')
    if source_vendor != 'postgresql' or tz is None:
        return None
    if internal == 'DateTimeField':
        return (f'({v} if {v} is None else datetime_param({v}) if '
                f'type({v}) is datetime and {v}.tzinfo is not None '
                f'else {f}({v}))')
    if internal == 'DateField':
        return (f'({v} if {v} is None else {v}.isoformat() if type({v}) '
                f'is date else {f}({v}))')
    if internal == 'TimeField':
        return (f'({v} if {v} is None else {v}.isoformat() if type({v}) '
                f'is time and {v}.tzinfo is None else {f}({v}))')
    if internal == 'JSONField' and field.encoder is None \
            and field.decoder is None:
        # jsonb text as PostgreSQL prints it: Django reads it back with
        # json.loads, the same call that reads it from PostgreSQL, so the
        # value is the one the app saw (only key order and \u escapes
        # of the stored text differ from a fresh json.dumps).
        return f'({v} if {v} is None or type({v}) is str else {f}({v}))'
    return None


# PostgreSQL -> SQLite: date/time columns read as the server's own text
# (`col::text`, ISO DateStyle), with the type OID psycopg2 would parse.
_PG_TEXT_READS = {'DateTimeField': 1184, 'DateField': 1082,
                  'TimeField': 1083}


def postgres_text_columns(fields: list[models.Field], source_alias: str,
                          target_alias: str) -> dict[int, str]:
    """Columns a PostgreSQL -> SQLite copy selects as text (index ->
    internal type). psycopg2 parsing timestamps into datetime objects and
    Python formatting them again for SQLite was a third of the reverse
    copy; the server's text (`2024-01-01 10:00:00.5+00` with the session
    in UTC), re-padded, is exactly Django's SQLite form. Any other shape
    (another DateStyle or zone, BC, infinity, a year past 9999) goes
    through psycopg2's own parser and the generic path (see
    postgres_text_parser), so the values stay those of the ORM.

    jsonb columns too: `col::text` is the text Django is handed for
    jsonb anyway (it registers an identity loads), without psycopg2
    calling two Python functions per value (3 % of the reader thread on
    1,000,000 assets)."""
    if (connections[source_alias].vendor != 'postgresql'
            or connections[target_alias].vendor != 'sqlite'
            or _utc(source_alias) is None or _utc(target_alias) is None):
        return {}
    found = {}
    for i, field in enumerate(fields):
        typed = field
        while typed.is_relation and getattr(typed, 'target_field', None):
            typed = typed.target_field
        internal = typed.get_internal_type()
        dated = (internal in _PG_TEXT_READS and _builtin(typed)
                 and _builtin(field))
        jsonb = (internal == 'JSONField' and field is typed
                 and _builtin(field) and field.encoder is None
                 and field.decoder is None
                 and field.db_type(connections[source_alias]) == 'jsonb')
        if dated or jsonb:
            found[i] = internal
    return found


def postgres_key_sorted_from(model: type[models.Model], source_alias: str,
                             target_alias: str) -> str:
    """FROM item of a PostgreSQL -> SQLite copy of *model*: its table
    sorted by primary key in SQLite's byte order ('' for any other pair
    of engines, or a key type without one).

    SQLite: rows inserted in key order append to the primary key's
    index; uuid4 keys in PostgreSQL's scan order made every insert a
    random B-tree descent (1,000,000 assets: 23-26 s of CPU in the copy
    before, 13-18 s sorted; PostgreSQL's sort costs about 2 s). The
    values are the same; only a text key's table gets its implicit
    rowids in key order instead of PostgreSQL's scan order.
    """
    if (connections[source_alias].vendor != 'postgresql'
            or connections[target_alias].vendor != 'sqlite'):
        return ''
    pk = model._meta.pk
    if len(model._meta.pk_fields) > 1:
        # A composite key has no column of its own: scan order.
        return ''
    typed = pk
    while typed.is_relation and getattr(typed, 'target_field', None):
        typed = typed.target_field
    internal = typed.get_internal_type()
    quote = connections[source_alias].ops.quote_name
    column = quote(pk.column)
    db_type = (pk.db_type(connections[source_alias]) or '').lower()
    if internal in INT_TYPES or internal == 'UUIDField':
        # uuid's order is its bytes', that of SQLite's hex text too.
        order = column
    elif internal in TEXT_TYPES and (db_type == 'text'
                                     or db_type.startswith('varchar')):
        # PostgreSQL: "C" compares bytes, as SQLite's BINARY does; it is
        # also no index's order, so the plan is a sort of a sequential
        # scan (an index scan by key visits the heap at random: 2-3x
        # slower than the sort, measured).
        order = f'{column} COLLATE "C"'
    else:
        return ''
    # The sort in a subquery: the caller's casts to text then run on the
    # sorted rows as they are fetched, not before the first one (first
    # row of 100,000 assets: 0.12-0.16 s instead of 0.21-0.35 s).
    table = quote(model._meta.db_table)
    return f'(SELECT * FROM {table} ORDER BY {order}) AS {table}'


def _same(value: Any) -> Any:
    return value


def postgres_text_parser(internal: str, source_alias: str
                         ) -> Callable[[Any], Any]:
    """Text of a column postgres_text_columns chose -> the value psycopg2
    would have returned for it (its own typecaster for that type)."""
    import psycopg2.extensions

    if internal == 'JSONField':
        # What psycopg2 returns for jsonb under Django: the text as is.
        return _same
    caster = psycopg2.extensions.string_types[_PG_TEXT_READS[internal]]
    connection = connections[source_alias]
    connection.ensure_connection()
    # The caster reads the cursor's tzinfo_factory; it is never executed.
    cursor = connection.connection.cursor()

    def parse(value: Any) -> Any:
        if type(value) is not str:
            return value
        return caster(value, cursor)
    return parse


def _postgres_text_expression(i: int, internal: str) -> str:
    """Django's SQLite text from PostgreSQL's ISO text, for the shapes
    known to match; anything else: the column's parse + generic path."""
    v, f, t = f'v{i}', f'f{i}', f't{i}'
    if internal == 'DateTimeField':
        # 'YYYY-MM-DD HH:MM:SS[.f{1,6}]+00' (PostgreSQL trims trailing
        # zeros of the fraction; str(datetime) has none or six digits).
        return (f'({v} if {v} is None else ({t} if len({t} := {v}[:-3]) '
                f"in (19, 26) else {t}.ljust(26, '0')) if type({v}) is str "
                f"and 22 <= len({v}) <= 29 and {v}[-3:] == '+00' and "
                f"{v}[10] == ' ' and {v}[4] == '-' and {v}[13] == ':' "
                f'else {f}({v}))')
    if internal == 'TimeField':
        # 'HH:MM:SS[.f{1,6}]'; 24:00:00 is PostgreSQL's, not Python's.
        return (f'({v} if {v} is None else ({v} if len({v}) == 8 else '
                f"{v}.ljust(15, '0')) if type({v}) is str and "
                f"8 <= len({v}) <= 15 and len({v}) != 9 and {v}[2] == ':' "
                f"and {v}[5] == ':' and {v}[:2] < '24' else {f}({v}))")
    if internal == 'JSONField':
        # jsonb's text, as the SQLite expression for JSONField takes it.
        return f'({v} if {v} is None or type({v}) is str else {f}({v}))'
    # DateField: 'YYYY-MM-DD' is already Django's form.
    return (f'({v} if {v} is None or (type({v}) is str and len({v}) == 10 '
            f"and {v}[4] == '-' and {v}[7] == '-') else {f}({v}))")


def sqlite_json_columns(fields: list[models.Field]) -> list[int]:
    """Indexes of the JSON columns among *fields* (SQLite sources select
    a json_valid() flag for each, after the fields)."""
    found = []
    for i, field in enumerate(fields):
        typed = field
        while typed.is_relation and getattr(typed, 'target_field', None):
            typed = typed.target_field
        if typed.get_internal_type() == 'JSONField':
            found.append(i)
    return found


def compile_row_converter(fields: list[models.Field],
                          generic: list[Callable[[Any], Any]],
                          source_alias: str, target_alias: str,
                          as_text: dict[int, str] | None = None
                          ) -> Callable[[tuple], Any]:
    """One function converting a whole source row for the target: a COPY
    text line (PostgreSQL) or a parameter tuple (SQLite). *as_text*: the
    columns selected as text (postgres_text_columns); their *generic*
    functions take that text.

    Raises whatever the generic path raises for a bad value; the caller
    then converts that batch value by value to report it.
    """
    source_vendor = connections[source_alias].vendor
    target_vendor = connections[target_alias].vendor
    tz = _utc(source_alias if source_vendor == 'sqlite' else target_alias)
    special = re.compile('[\\\\\t\n\r]').search

    def text(value: str) -> str:
        return postgres_escape(value) if special(value) else value

    namespace: dict[str, Any] = {
        'text': text, 'special': special, 'esc': postgres_escape,
        'datetime': dt.datetime, 'date': dt.date, 'time': dt.time,
        'str': str, 'type': type, 'int': int, 'len': len,
    }
    if target_vendor == 'postgresql':
        namespace.update(_sqlite_to_postgres_helpers())
        build = _postgres_expression
    else:
        namespace.update(_postgres_to_sqlite_helpers(tz))
        build = _sqlite_expression
    ranges = connections[target_alias].ops.integer_field_ranges
    json_flags = (sqlite_json_columns(fields) if source_vendor == 'sqlite'
                  else [])
    expressions = []
    for i, (field, func) in enumerate(zip(fields, generic)):
        namespace[f'f{i}'] = func
        typed = field
        while typed.is_relation and getattr(typed, 'target_field', None):
            typed = typed.target_field
        expression: str | None
        if as_text and i in as_text:
            expression = _postgres_text_expression(i, as_text[i])
        else:
            expression = build(i, typed, source_vendor, tz, ranges,
                               json_flags) \
                if _builtin(typed) and _builtin(field) else None
        expressions.append(expression or f'f{i}(v{i})')
    names = ', '.join([f'v{i}' for i in range(len(fields))]
                      + [f'j{k}' for k in range(len(json_flags))])
    body = ', '.join(expressions)
    if target_vendor == 'postgresql':
        source = (f'def convert_row(row):\n'
                  f'    {names}, = row\n'
                  f"    return '\\t'.join(({body},))\n")
    else:
        source = (f'def convert_row(row):\n'
                  f'    {names}, = row\n'
                  f'    return ({body},)\n')
    exec(compile(source, '<row converter>', 'exec'), namespace)  # noqa: S102 built from field types only, no data
    return namespace['convert_row']

