"""report.py: no password or DSN credential ever reaches output."""
import json
import stat
import subprocess
import sys

import pytest
from django.db import connections

from anthias_rollback import profiles, report
from tests.conftest import ROOT

# Distinctive, and holding characters a URL must encode.
SECRET = 'Zq9@s3cr3t/pw'
SECRET_ENCODED = 'Zq9%40s3cr3t%2Fpw'


@pytest.fixture
def pg_password(monkeypatch):
    """A distinctive PostgreSQL password, as configured.

    redact() reads `connections.settings` (the handler's copy of
    DATABASES, built once): the `settings` fixture cannot reach it, so
    the configured entry itself gets the password, for this test only.
    """
    monkeypatch.setitem(connections.settings['postgres'], 'PASSWORD',
                        SECRET)
    return SECRET


def test_configured_password_removed_everywhere_in_a_string(pg_password):
    text = (f'FATAL: {SECRET} rejected; retry with {SECRET}'
            f'\nsecond line {SECRET}')
    redacted = report.redact(text)
    assert SECRET not in redacted
    assert redacted == ('FATAL: *** rejected; retry with ***'
                        '\nsecond line ***')


def test_every_configured_alias_password_is_a_secret(pg_password,
                                                     monkeypatch):
    monkeypatch.setitem(connections.settings['sqlite'], 'PASSWORD',
                        'other-alias-pw')
    found = report.secrets()
    assert SECRET in found and 'other-alias-pw' in found
    assert report.redact('a other-alias-pw b') == 'a *** b'


@pytest.mark.parametrize('scheme', ['postgresql', 'postgres', 'pgsql'])
def test_dsn_credentials_removed_for_every_scheme(scheme):
    # Not a configured password: the DSN shape alone is enough.
    text = f'cannot use {scheme}://signage:Unc0nfigured@db.local:5432/app'
    redacted = report.redact(text)
    assert 'Unc0nfigured' not in redacted
    assert 'signage' not in redacted
    assert redacted == f'cannot use {scheme}://***@db.local:5432/app'


def test_several_dsns_in_one_string():
    text = ('from postgres://a:pw1@h1/db1 to '
            'postgresql://b:pw2@h2/db2?sslmode=require')
    assert report.redact(text) == ('from postgres://***@h1/db1 to '
                                   'postgresql://***@h2/db2?sslmode=require')


def test_url_encoded_password_in_dsn_removed(pg_password):
    # The operator's URL holds the password encoded; the configured
    # (decoded) value then never appears literally.
    text = f'ANTHIAS_POSTGRES_URL=postgresql://pi:{SECRET_ENCODED}@h/db'
    redacted = report.redact(text)
    assert SECRET_ENCODED not in redacted
    assert 'Zq9' not in redacted
    assert redacted == 'ANTHIAS_POSTGRES_URL=postgresql://***@h/db'


def test_url_encoded_unconfigured_password_in_dsn_removed():
    assert report.redact('postgres://u:p%40ss@h:1/db') == \
        'postgres://***@h:1/db'


def test_dsn_without_credentials_is_kept():
    text = 'postgresql://db.local:5432/anthias and /var/lib/anthias.db'
    assert report.redact(text) == text


def test_redact_recurses_into_dicts_lists_tuples(pg_password):
    data = {
        'error': f'auth failed: {SECRET}',
        'dsn': 'postgres://u:dsnpw@h/db',
        'nested': {'deeper': [f'x {SECRET}', ('postgresql://u:tp@h/d',
                                                {'k': SECRET})]},
        'count': 3, 'ok': True, 'none': None,
    }
    redacted = report.redact(data)
    dumped = json.dumps(redacted)
    for leak in (SECRET, 'dsnpw', ':tp@'):
        assert leak not in dumped
    assert redacted['error'] == 'auth failed: ***'
    assert redacted['nested']['deeper'][1][1] == {'k': '***'}
    # Non-strings pass through unchanged, the input is not modified.
    assert (redacted['count'], redacted['ok'], redacted['none']) == (
        3, True, None)
    assert data['error'] == f'auth failed: {SECRET}'


def test_describe_postgres_alias_is_host_port_db_only(pg_password):
    settings_dict = connections['postgres'].settings_dict
    described = report.describe_alias('postgres')
    host = settings_dict.get('HOST') or 'localhost'
    port = settings_dict.get('PORT') or 5432
    assert described == (f'postgres (PostgreSQL {host}:{port}/'
                         f'{settings_dict["NAME"]})')
    assert SECRET not in described
    assert '://' not in described and '@' not in described


def test_describe_override_alias_hides_its_password():
    overrides = {'host': '192.0.2.7', 'port': '6543', 'db': 'signage',
                 'user': 'pi', 'password': 'Ov3rr1de-pw'}
    with profiles.postgres_override_alias(overrides) as alias:
        described = report.describe_alias(alias)
    assert described == f'{alias} (PostgreSQL 192.0.2.7:6543/signage)'
    assert 'Ov3rr1de-pw' not in described and 'pi' not in described


def test_describe_sqlite_alias_names_the_file():
    path = connections['sqlite'].settings_dict['NAME']
    assert report.describe_alias('sqlite') == f'sqlite (SQLite {path})'


def test_first_line_skips_blank_lines_and_falls_back_to_type():
    assert report.first_line(ValueError('\n  boom  \nDETAIL: x')) == 'boom'
    assert report.first_line(KeyError()) == 'KeyError'


def test_raw_at_sign_in_dsn_password_fully_removed(monkeypatch):
    url = 'postgresql://pi:Zq9@s3cr3t@h/db'
    config = profiles.parse_postgres_url(url, 'ANTHIAS_POSTGRES_URL')
    assert config['PASSWORD'] == 'Zq9@s3cr3t'   # a working config
    monkeypatch.setitem(connections.settings, 'postgres', config)
    assert 's3cr3t' not in report.redact(f'bad URL {url}')


def test_password_in_url_query_is_a_secret(monkeypatch):
    config = profiles.parse_postgres_url(
        'postgresql://pi@/anthias?host=/run/pg&password=Qu3ry-pw',
        'ANTHIAS_POSTGRES_URL')
    assert config['OPTIONS']['password'] == 'Qu3ry-pw'
    monkeypatch.setitem(connections.settings, 'postgres', config)
    text = ('connection failed for '
            'postgresql://pi@/anthias?host=/run/pg&password=Qu3ry-pw: '
            'Qu3ry-pw')
    assert 'Qu3ry-pw' not in report.redact(text)


def test_libpq_keyword_dsn_password_removed():
    text = "dbname=anthias host=db.local user=pi password='Kw-s3cret'"
    assert 'Kw-s3cret' not in report.redact(text)


def test_override_alias_password_is_a_secret():
    with profiles.postgres_override_alias({'password': 'Ov3rr1de-pw'}):
        assert 'Ov3rr1de-pw' not in report.redact('got Ov3rr1de-pw back')


def test_json_report_is_0600_redacted_and_parses(pg_password, tmp_path):
    path = tmp_path / 'reports' / 'run.json'
    written = report.write_json_report(path, {
        'error': f'PostgreSQL said {SECRET}',
        'target': 'postgres://pi:hunter2@h/db',
        'steps': [{'detail': SECRET}]})
    assert written == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert SECRET not in text and 'hunter2' not in text
    assert json.loads(text) == {'error': 'PostgreSQL said ***',
                                'target': 'postgres://***@h/db',
                                'steps': [{'detail': '***'}]}
    # Nothing but the report itself: no temp file left beside it.
    assert [p.name for p in path.parent.iterdir()] == ['run.json']


def test_json_report_replaces_an_existing_one(tmp_path):
    path = tmp_path / 'run.json'
    path.write_text('old')
    path.chmod(0o644)
    report.write_json_report(path, {'n': 2})
    assert json.loads(path.read_text()) == {'n': 2}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


KILLED_WRITER = '''
import sys, django
django.setup()
from anthias_rollback import report
report.write_json_report(sys.argv[1], {"run": "new"})
'''


def test_json_report_killed_before_rename_keeps_old_file(host_env,
                                                         tmp_path):
    """SIGKILL between the temp file and the rename (a power cut): the
    final name still holds the complete old report, never a partial or
    temp one."""
    path = tmp_path / 'reports' / 'run.json'
    report.write_json_report(path, {'run': 'old'})
    env = dict(host_env,
               ANTHIAS_ROLLBACK_KILL_AT='atomic-write:before-rename')
    done = subprocess.run([sys.executable, '-c', KILLED_WRITER, str(path)],
                          env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == -9, done.stderr
    assert json.loads(path.read_text()) == {'run': 'old'}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    leftovers = [p for p in path.parent.iterdir() if p != path]
    # The dead writer's temp file is hidden and never the report's name.
    assert leftovers and all(p.name.startswith('.run.json.')
                             and p.name.endswith('.tmp')
                             for p in leftovers)
    # The child really ran to the rename point: without the fault it
    # replaces the report.
    env.pop('ANTHIAS_ROLLBACK_KILL_AT')
    done = subprocess.run([sys.executable, '-c', KILLED_WRITER, str(path)],
                          env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(path.read_text()) == {'run': 'new'}


def test_a_short_password_inside_ordinary_words_stays_readable(
        monkeypatch):
    monkeypatch.setitem(connections.settings['postgres'], 'PASSWORD',
                        'anthias')
    text = ('applied anthias_app.0002_upgrade; backup anthias_backup_1.db; '
            'postgres://pi:anthias@h/db; PGPASSWORD=anthias; '
            "password='anthias'; anthias")
    assert report.redact(text) == (
        'applied anthias_app.0002_upgrade; backup anthias_backup_1.db; '
        'postgres://***@h/db; PGPASSWORD=***; password=***; ***')
