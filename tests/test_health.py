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


def _down_default():
    """Point `default` at a closed port (a degraded /health that names
    PostgreSQL's host:port in its problems); returns a restore function."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    conn = connections['default']
    settings = dict(conn.settings_dict, ENGINE='django.db.backends.'
                    'postgresql', NAME='anthias', HOST='127.0.0.1', PORT=1,
                    USER='u', PASSWORD='hunter2',
                    OPTIONS={'connect_timeout': 2})
    connections['default'] = DatabaseWrapper(settings, 'default')

    def restore():
        connections['default'].close()
        connections['default'] = conn
    return restore


@pytest.mark.django_db(databases=['default', 'sqlite', 'postgres'],
                       transaction=True)
def test_remote_callers_get_status_and_profile_only(data_dir):
    """Anyone who can reach the device got the state file's path and
    PostgreSQL's host:port. Now only staff and local callers do."""
    restore = _down_default()
    try:
        remote = Client(REMOTE_ADDR='192.0.2.7').get('/health')
        proxied = Client(HTTP_X_FORWARDED_FOR='192.0.2.7').get('/health')
        local = Client(REMOTE_ADDR='127.0.0.1').get('/health')
        local6 = Client(REMOTE_ADDR='::1').get('/health')
        direct = health.check_health()
    finally:
        restore()
    for response in (remote, proxied):
        assert response.status_code == 503
        assert response.json() == {'status': 'degraded',
                                   'profile': 'sqlite'}
        assert '127.0.0.1:1' not in response.content.decode()
        assert str(data_dir) not in response.content.decode()
    for response in (local, local6):
        assert response.status_code == 503
        body = response.json()
        assert body['profile_source'] == 'default'
        assert any('127.0.0.1:1' in p for p in body['problems'])
    # The in-process post-verification calls check_health() directly.
    assert any('127.0.0.1:1' in p for p in direct.problems)


@pytest.mark.django_db(databases=['default', 'sqlite'], transaction=True)
def test_bad_state_file_is_degraded_and_named(data_dir):
    """Degraded, the file named to staff and local callers; an
    unauthenticated (or non-staff) remote caller sees no path."""
    from django.contrib.auth.models import User

    from anthias_rollback import profiles

    path = profiles.state_file_path(data_dir)
    path.write_bytes(b'\x00\xffnot json')
    staff = Client(REMOTE_ADDR='192.0.2.7')
    staff.force_login(User.objects.db_manager('sqlite').create_user(
        'ops', is_staff=True))
    viewer = Client(REMOTE_ADDR='192.0.2.7')
    viewer.force_login(User.objects.db_manager('sqlite').create_user(
        'viewer'))
    for client in (Client(), staff):
        response = client.get('/health')
        assert response.status_code == 503
        body = response.json()
        assert body['status'] == 'degraded'
        assert any(str(path) in p for p in body['problems'])
    for client in (Client(REMOTE_ADDR='192.0.2.7'), viewer):
        response = client.get('/health')
        assert response.status_code == 503
        assert response.json() == {'status': 'degraded',
                                   'profile': 'unknown'}


@pytest.mark.django_db(databases=['default', 'sqlite'], transaction=True)
def test_standby_block_only_on_postgres_and_never_for_remote_callers(
        data_dir):
    """A failure replicate_changes recorded in a window that ended (the
    device rolled back to SQLite) says nothing about this device; on
    postgres it is a warning and a block, for local callers only."""
    from anthias_rollback import profiles
    from anthias_rollback.window import standby as window_standby

    window_standby.record_round(data_dir, 'round failed: disk I/O error')
    body = Client().get('/health').json()
    assert body['standby'] is None and body['warnings'] == []
    profiles.write_active_profile(data_dir, 'postgres', {})
    report = health.check_health('sqlite')
    assert report.standby['failing'] is True
    assert report.standby['last_error'] == 'round failed: disk I/O error'
    assert report.status == 'ok'
    assert any('replicate_changes is failing: round failed: disk I/O '
               'error' in w for w in report.warnings)
    remote = Client(REMOTE_ADDR='192.0.2.7').get('/health').json()
    assert 'standby' not in remote and 'warnings' not in remote
