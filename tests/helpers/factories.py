"""factory-boy factories with realistic, awkward values."""
import datetime as dt
import random

import factory
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User

from anthias_app.models import Asset

NAMES = ['Café menu ☕', 'Ünïcödé board', '数字标牌', 'Emoji 🎉🚀',
         "O'Brien's \"quotes\"", 'tab\tand\nnewline', 'plain']


class AssetFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Asset
        database = 'sqlite'

    name = factory.Sequence(lambda n: f'{random.choice(NAMES)} #{n}')
    uri = factory.Sequence(
        lambda n: f'https://cdn.example.com/{"x" * (n % 300)}/asset{n}.mp4'
        f'?q={"é" * (n % 7)}')
    md5 = factory.Faker('md5')
    mimetype = factory.Iterator(['video', 'image', 'webpage', None])
    start_date = factory.Faker('date_time_between', start_date='-2y',
                               end_date='now', tzinfo=dt.UTC)
    end_date = factory.LazyAttribute(
        lambda o: o.start_date + dt.timedelta(days=30, microseconds=123457)
        if o.start_date else None)
    duration = factory.Iterator([10, 3600, None, 2 ** 40])
    is_enabled = factory.Iterator([True, False])
    is_processing = False
    nocache = factory.Iterator([False, True, False])
    play_order = factory.Sequence(lambda n: n % 100)
    skip_asset_check = factory.Iterator([False, False, True])
    is_reachable = factory.Iterator([True, True, False])
    last_reachability_check = factory.Faker(
        'date_time_between', start_date='-30d', end_date='now',
        tzinfo=dt.UTC)
    play_days = factory.Iterator(['[1, 2, 3, 4, 5, 6, 7]', '[1, 3, 5]'])
    play_time_from = factory.Iterator([None, dt.time(8, 0),
                                       dt.time(6, 30, 15, 250000)])
    play_time_to = factory.Iterator([None, dt.time(22, 0),
                                     dt.time(23, 59, 59, 999999)])
    skip_ssl_verify = factory.Iterator([False, True])
    metadata = factory.Sequence(lambda n: {
        'n': n, 'tags': ['a', 'ü', '🎉'], 'nested': {'z': 1, 'a': [1.5,
                                                                   None]},
        'ok': n % 2 == 0})


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User
        database = 'sqlite'
        django_get_or_create = ('username',)

    username = factory.Sequence(lambda n: f'user{n}')
    email = factory.LazyAttribute(lambda o: f'{o.username}@example.com')
    first_name = factory.Iterator(['Zoë', 'José', '李', 'Ann'])
    # Hashed up front: no post-generation save (deprecated in factory-boy).
    password = factory.LazyFunction(lambda: make_password('pw-123'))
