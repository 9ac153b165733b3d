"""Settings for manage.py run in a child process by the tests: the
reference host plus the test-only kitchen-sink app, with the databases
given in the environment (host_env sets them to the test databases)."""
from settings_profiles.settings import *

INSTALLED_APPS = INSTALLED_APPS + ['tests.kitchensink']
ROOT_URLCONF = 'tests.urls'
