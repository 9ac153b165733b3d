"""Test settings: the reference host plus the kitchen-sink app, with the
SQLite test database in a real file and a real PostgreSQL server."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

from tests.helpers import pgserver

if 'ANTHIAS_TEST_RUN_DIR' not in os.environ:
    # Made once, by the first process; its children (this module is
    # imported again in each) share it. Removed when that process ends:
    # each suite run used to leave hundreds of these in /tmp.
    os.environ['ANTHIAS_TEST_RUN_DIR'] = tempfile.mkdtemp(
        prefix='anthias-test-')
    atexit.register(shutil.rmtree, os.environ['ANTHIAS_TEST_RUN_DIR'], True)
_run_dir = Path(os.environ['ANTHIAS_TEST_RUN_DIR'])
os.environ.setdefault('ANTHIAS_DATA_DIR', str(_run_dir / 'data'))
os.environ['ANTHIAS_POSTGRES_URL'] = pgserver.postgres_url()
os.environ.pop('ANTHIAS_DB_PROFILE', None)
Path(os.environ['ANTHIAS_DATA_DIR']).mkdir(parents=True, exist_ok=True)

from anthias_rollback.profiles import build_databases
from settings_profiles.settings import *

ANTHIAS_DATA_DIR = os.environ['ANTHIAS_DATA_DIR']
DATABASES = build_databases(data_dir=ANTHIAS_DATA_DIR)
# SQLite: a real file (Django would use :memory:), WAL like a device.
DATABASES['sqlite']['TEST']['NAME'] = str(_run_dir / 'test_anthias.db')
DATABASES['postgres']['TEST']['NAME'] = 'test_anthias'
INSTALLED_APPS = INSTALLED_APPS + ['tests.kitchensink']
ROOT_URLCONF = 'tests.urls'
PASSWORD_HASHERS = ['django.contrib.auth.hashers.MD5PasswordHasher']
# The server's own client tools (the machine's pg_dump is older).
ANTHIAS_PG_DUMP = str(pgserver.embedded_bin_dir() / 'pg_dump')
