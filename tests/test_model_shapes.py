"""Every model shape of tests/models_corners, copied and compared in the
CMS host (tests/hosts/cms) in real processes: a composite primary key,
multi-table inheritance three levels deep, a proxy, an abstract base, an
unmanaged model, NUL bytes in a BinaryField, a wide DecimalField, a
mixed-case table with reserved-word columns and a self FK, an M2M through
table, a generic relation, an FK cycle and a JSONField subclass whose
from_db_value returns a wrapper object.

migrate_to_postgres must copy the stored values exactly (checked by
tests/helpers/raw_tables: sqlite3 and psycopg2 alone), validate_migration
must say PASS, and after one row of each shape is changed on PostgreSQL
it must name exactly those rows by key (a composite key as its tuple)
and exit non-zero.
"""
import json
import shutil

import psycopg2
import pytest

from tests.helpers import raw_tables
from tests.helpers.cms import (
    SEARCH_TABLES,
    CmsDevice,
    cms_database,  # noqa: F401  (a fixture)
)

BY_KEY = {'django_migrations': ['app', 'name']}

# Rows of every shape, written through the ORM on SQLite. The decimals
# are ones SQLite's REAL holds exactly (it keeps a decimal as a double):
# 12345678901234567168 is the double nearest 12345678901234567890.
FILL = r'''
import datetime as dt, decimal
from tests.models_corners import models as c
NUL = b'\x00head\x00\xff\xfe tail\x00'
for region, number, label, blob in [
        ('eu', 1, 'first', NUL), ('eu', 2, 'second', None),
        ('EU', 2, 'upper case sorts first bytewise', b''),
        ('us', 1, 'third \u2603', b'\x00'),
        ('\u00e9t\u00e9', 7, 'accent', None)]:
    c.Composite.objects.create(region=region, number=number, label=label,
                               blob=blob)
c.Numbers.objects.create(id=1, blob=NUL, ratio=0.1,
                         amount=decimal.Decimal('12345678901234567168'))
c.Numbers.objects.create(id=2, blob=b'',
                         amount=decimal.Decimal('-0.0009765625'))
c.Numbers.objects.create(id=3, blob=b'\x00' * 3,
                         amount=decimal.Decimal('4.5'))
top = c.MixedCase.objects.create(id=101, order=10, select='top', group='g1')
c.MixedCase.objects.create(id=102, order=11, select='under', group='',
                           parent=top)
square = c.Place.objects.create(id=1, name='Square')
square.tags.add('outdoor')
c.Restaurant.objects.create(id=2, name='Diner', serves_pizza=False,
                            rating=decimal.Decimal('4.5'))
napoli = c.Pizzeria.objects.create(id=3, name='Napoli', serves_pizza=True,
                                   oven='wood')
napoli.tags.add('pizza', 'outdoor')
c.PlaceProxy.objects.filter(pk=1).update(notes='via the proxy')
c.Remark.objects.create(id=1, target=square, text='nice')
c.Remark.objects.create(id=2, target=napoli, text='hot')
club = c.Club.objects.create(id=1, name='Chess')
for n, name in enumerate(('Ann', 'Bob'), 1):
    member = c.Member.objects.create(id=n, name=name)
    c.Membership.objects.create(id=n, club=club, member=member,
                                since=dt.date(2020, 1, n))
hen = c.Chicken.objects.create(id=1, name='Hen')
egg = c.Egg.objects.create(id=1, layer=hen)
hen.first_egg = egg
hen.save()
c.Payload.objects.create(id=1, data={'b': '\u00e9', 'a': [1, 2.5, None]})
c.Payload.objects.create(id=2, data=c.Wrapped([3, 'x', {'k': True}]))
c.Payload.objects.create(id=3, data=None)
c.Payload.objects.create(id=4, data=c.Wrapped({'nested': {
    'z': 1, 'a': ['t\\tab']}}))
'''

REVERSE = '''
from pathlib import Path
from anthias_rollback import engine_tables, profiles, transfer
# As every command does: the search index (one engine only) left out.
engine_tables.register_aliases(profiles.SQLITE, profiles.POSTGRES, None)
with profiles.sqlite_file_alias(Path({path!r})) as alias:
    transfer.transfer_data(profiles.POSTGRES, alias, replace=True)
'''

# One row of each shape changed on PostgreSQL: (model label, key as the
# JSON report gives it, SQL).
CHANGES = [
    ('models_corners.Composite', ['us', 1],
     ('UPDATE models_corners_composite SET label = \'x\' '
      "WHERE region = 'us' AND number = 1")),
    ('models_corners.Numbers', 1,
     ('UPDATE models_corners_numbers SET amount = amount + 0.0000000001 '
      'WHERE id = 1')),
    ('models_corners.MixedCase', 102,
     'UPDATE "MixedCase" SET "Parent" = NULL, "order" = 12 WHERE id = 102'),
    ('models_corners.Place', 2,
     "UPDATE models_corners_place SET name = 'Diner 2' WHERE id = 2"),
    ('models_corners.Restaurant', 3,
     ('UPDATE models_corners_restaurant SET rating = 1.5 '
      'WHERE place_ptr_id = 3')),
    ('models_corners.Pizzeria', 3,
     ("UPDATE models_corners_pizzeria SET oven = 'gas' "
      'WHERE restaurant_ptr_id = 3')),
    ('models_corners.Membership', 2,
     ("UPDATE models_corners_membership SET since = '2021-01-01' "
      'WHERE id = 2')),
    ('models_corners.Remark', 1,
     "UPDATE models_corners_remark SET text = 'nicer' WHERE id = 1"),
    ('models_corners.Egg', 1,
     'UPDATE models_corners_egg SET layer_id = NULL WHERE id = 1'),
    ('models_corners.Chicken', 1,
     'UPDATE models_corners_chicken SET first_egg_id = NULL WHERE id = 1'),
    ('models_corners.Payload', 2,
     ('UPDATE models_corners_payload SET data = \'[3, "x", {"k": false}]\' '
      'WHERE id = 2')),
]


def pg_execute(url: str, statements: list[str]) -> None:
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute('SET CONSTRAINTS ALL DEFERRED')
            for sql in statements:
                cursor.execute(sql)
    finally:
        conn.close()


def validate(device: CmsDevice, *args: str) -> tuple[int, dict]:
    """validate_migration's exit code and JSON document."""
    done = device.run('validate_migration', '--no-performance-test',
                      '--json', *args)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f'validate_migration {" ".join(args)}: no JSON '
                    f'document: {(done.stdout + done.stderr)[-3000:]}',
                    pytrace=False)
    return done.returncode, report


@pytest.mark.slow
@pytest.mark.django_db(databases=['postgres'])
def test_every_model_shape_copies_and_compares_exactly(
        tmp_path, cms_database):  # noqa: F811  (the fixture)
    device = CmsDevice(tmp_path / 'data', cms_database)
    device.data.mkdir()
    device.migrate_both()
    device.ok('fill', 'shell', '-c', FILL)

    # --replace: the host's data migrations seeded rows on PostgreSQL too.
    copied = device.ok('migrate_to_postgres', 'migrate_to_postgres',
                       '--replace')
    assert 'not copied: unmanaged models_corners.Legacy' in copied, copied
    assert copied.count('models_corners.Legacy') == 1, copied

    diff = raw_tables.compare_all(device.sqlite, device.pg_url,
                                  skip=SEARCH_TABLES, by_key=BY_KEY)
    assert diff.equal, json.dumps(diff.differing, default=str)[:4000]
    corners = {'MixedCase', 'models_corners_composite',
               'models_corners_numbers', 'models_corners_payload',
               'models_corners_place', 'models_corners_restaurant',
               'models_corners_pizzeria', 'models_corners_membership',
               'models_corners_remark', 'models_corners_chicken',
               'models_corners_egg', 'models_corners_club',
               'models_corners_member', 'corners_legacy'}
    assert corners <= set(diff.compared), sorted(diff.compared)
    assert diff.compared['models_corners_composite'] == 5
    assert diff.compared['models_corners_payload'] == 4

    for mode in ((), ('--deep',)):
        done = device.run('validate_migration', '--no-performance-test',
                          *mode)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and 'PASS' in output, output[-3000:]
        code, report = validate(device, *mode)
        assert code == 0 and report['ok'], report
        labels = {m['label'] for m in report['models']}
        assert {'models_corners.Composite', 'models_corners.Pizzeria',
                'models_corners.Restaurant', 'models_corners.Payload',
                'models_corners.MixedCase'} <= labels
        assert 'models_corners.Legacy' not in labels
        assert 'models_corners.PlaceProxy' not in labels

    # The performance test's ORM queries on every shape (a composite
    # key's pk lookup and ORDER BY pk among them).
    timed = device.run('validate_migration', '--json')
    assert timed.returncode == 0, (timed.stdout + timed.stderr)[-3000:]
    timings = json.loads(timed.stdout)['performance']['timings']
    assert {'models_corners.Composite', 'models_corners.Pizzeria'} <= {
        t['label'] for t in timings}

    pg_execute(device.pg_url, [sql for _, _, sql in CHANGES])
    for mode in ((), ('--deep',)):
        code, report = validate(device, *mode)
        assert code != 0 and not report['ok'], report
        found = {}
        for m in report['models']:
            keys = ([c['pk'] for c in m['changed']] + m['missing_keys']
                    + m['extra_keys'])
            if keys:
                found[m['label']] = keys
        assert found == {label: [key] for label, key, _ in CHANGES}, (
            mode, found)

    # The reverse copy (PostgreSQL -> SQLite, as the standby and the full
    # rollback make it), of the changed rows too: into a copy of the
    # SQLite file, emptied first.
    back = device.data / 'back.db'
    shutil.copyfile(device.sqlite, back)
    device.ok('reverse copy', 'shell', '-c', REVERSE.format(path=str(back)))
    diff = raw_tables.compare_all(back, device.pg_url,
                                  skip=SEARCH_TABLES, by_key=BY_KEY)
    assert diff.equal, json.dumps(diff.differing, default=str)[:4000]
    assert corners <= set(diff.compared), sorted(diff.compared)

    # --repair makes PostgreSQL equal again, row by row (the composite
    # key's rows deleted and re-inserted by their tuple).
    repaired = device.ok('repair', 'migrate_to_postgres', '--repair')
    assert 'not copied: unmanaged models_corners.Legacy' in repaired
    diff = raw_tables.compare_all(device.sqlite, device.pg_url,
                                  skip=SEARCH_TABLES, by_key=BY_KEY)
    assert diff.equal, json.dumps(diff.differing, default=str)[:4000]
    code, report = validate(device)
    assert code == 0 and report['ok'], [
        m for m in report['models'] if not m['ok']]


# -- the value rules, without a database ------------------------------------

def test_stored_decimal_is_the_exact_stored_number_at_the_scale():
    from decimal import Decimal

    from anthias_rollback.fields import stored_decimal

    # SQLite's REAL for 12345678901234567890.0123456789: Django reads it
    # back as 12345678901234600000 (15 digits); the column holds this.
    assert stored_decimal(1.2345678901234567e19, 10) == Decimal(
        '12345678901234567168.0000000000')
    assert stored_decimal(-0.0009765625, 10) == Decimal('-0.0009765625')
    # numeric's input rounds half away from zero.
    assert stored_decimal(2.5, 0) == 3
    assert stored_decimal(-2.5, 0) == -3
    assert stored_decimal('1.25', 1) == Decimal('1.3')
    assert stored_decimal(7, 2) == Decimal('7.00')
    with pytest.raises(TypeError):
        stored_decimal(b'1', 2)


def test_canonical_decimal_keeps_every_digit_of_a_wide_column():
    from decimal import Decimal

    from anthias_rollback.normalize import canonical_decimal

    # 30 digits: the default context's 28 made these two equal.
    assert canonical_decimal(Decimal('12345678901234567168.0000000001')) \
        != canonical_decimal(Decimal('12345678901234567168.0000000000'))
    assert canonical_decimal(Decimal('1.5000')) == canonical_decimal(1.5)
