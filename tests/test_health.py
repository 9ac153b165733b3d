import pytest
from django.db import connections
from django.test import Client

from anthias_rollback import health
from anthias_rollback.exceptions import DatabaseUnavailableError
from anthias_rollback.schema import check_connection


@pytest.mark.django_db(databases=['default', 'sqlite'], transaction=True)
def test_health_ok_200(data_dir):
    response = Client().get('/health')
    assert response.status_code == 200
    body = response.json()
    assert body['status'] == 'ok'
    assert body['profile'] == 'sqlite'
    assert body['database_ok'] is True
    assert body['unapplied_migrations'] == 0


@pytest.mark.django_db(databases=['default', 'sqlite', 'postgres'],
                       transaction=True)
def test_health_503_when_database_down_and_no_secret(data_dir):
    conn = connections['default']
    saved = conn.settings_dict.copy()
    conn.close()
    conn.settings_dict.update({
        'ENGINE': 'django.db.backends.postgresql', 'NAME': 'anthias',
        'USER': 'secretuser', 'PASSWORD': 'hunter2', 'HOST': '127.0.0.1',
        'PORT': 1, 'OPTIONS': {'connect_timeout': 2}})
    from django.db.backends.postgresql.base import DatabaseWrapper
    connections['default'] = DatabaseWrapper(conn.settings_dict, 'default')
    try:
        response = Client().get('/health')
    finally:
        connections['default'].close()
        connections['default'] = conn
        conn.settings_dict.update(saved)
    assert response.status_code == 503
    text = response.content.decode()
    assert response.json()['status'] == 'degraded'
    assert 'hunter2' not in text and 'secretuser' not in text
    assert '127.0.0.1:1' in text


@pytest.mark.django_db(databases=['default', 'sqlite'], transaction=True)
def test_health_degraded_with_unapplied_migrations(data_dir):
    from django.core.management import call_command

    call_command('migrate', 'sessions', 'zero', database='sqlite',
                 verbosity=0)
    try:
        report = health.check_health('sqlite')
        assert report.status == 'degraded'
        assert report.unapplied_migrations == 1
    finally:
        call_command('migrate', database='sqlite', verbosity=0)


@pytest.mark.django_db(databases=['postgres'], transaction=True)
def test_check_connection_names_host_port():
    conn = connections['postgres']
    saved = conn.settings_dict.copy()
    conn.close()
    conn.settings_dict.update({'HOST': '127.0.0.1', 'PORT': 1,
                               'PASSWORD': 'hunter2'})
    try:
        with pytest.raises(DatabaseUnavailableError) as excinfo:
            check_connection('postgres')
    finally:
        conn.close()
        conn.settings_dict.update(saved)
    assert '127.0.0.1:1' in str(excinfo.value)
    assert 'hunter2' not in str(excinfo.value)
