# The adoption blocks below are verbatim, with their `noqa: E402`
# (E402 is not enabled here, which RUF100 would flag).
# ruff: noqa: RUF100
"""A CMS host: wagtail with its usual apps, a small page app of its own
(cmssite), the corner-case models app (tests.models_corners), and the
README's adoption block appended verbatim at the end.

Run it as `python -m tests.hosts.cms.manage <command>` from the checkout,
with ANTHIAS_DATA_DIR (and ANTHIAS_SQLITE_PATH, ANTHIAS_POSTGRES_URL) in
the environment; CMS_HOST_RELEASE=2 adds the second release's migration
(tests.hosts.cms.release2: a data migration shipped during the window).
"""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
DATA_DIR = os.environ['ANTHIAS_DATA_DIR']

SECRET_KEY = 'cms-host-for-tests-not-secret'
DEBUG = False
ALLOWED_HOSTS = ['*']
USE_TZ = True
TIME_ZONE = 'UTC'
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'
PASSWORD_HASHERS = ['django.contrib.auth.hashers.MD5PasswordHasher']

INSTALLED_APPS = [
    'tests.hosts.cms.cmssite',
    'tests.models_corners',
    'wagtail.contrib.forms',
    'wagtail.contrib.redirects',
    'wagtail.embeds',
    'wagtail.sites',
    'wagtail.users',
    'wagtail.snippets',
    'wagtail.documents',
    'wagtail.images',
    'wagtail.search',
    'wagtail.admin',
    'wagtail',
    'modelcluster',
    'taggit',
    'django_filters',
    'django.contrib.admin',
    'django.contrib.auth',
    'django.contrib.contenttypes',
    'django.contrib.sessions',
    'django.contrib.messages',
    'django.contrib.staticfiles',
    # Django 6.0 checks it for wagtailsearch's PostgreSQL index
    # (postgres.E005); a real wagtail site on PostgreSQL needs it too.
    'django.contrib.postgres',
]
if os.environ.get('CMS_HOST_RELEASE') == '2':
    INSTALLED_APPS.insert(2, 'tests.hosts.cms.release2')
# Release 3 (an upgrade applied mid-window): release 2's data migration,
# a new model, and a new column on models_corners.Setting.
if os.environ.get('CMS_HOST_RELEASE') == '3':
    INSTALLED_APPS.insert(2, 'tests.hosts.cms.release2')
    INSTALLED_APPS.insert(3, 'tests.hosts.cms.release3')
    MIGRATION_MODULES = {
        'models_corners': 'tests.hosts.cms.release3.corners.migrations'}

MIDDLEWARE = [
    'django.middleware.security.SecurityMiddleware',
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.middleware.common.CommonMiddleware',
    'django.middleware.csrf.CsrfViewMiddleware',
    'django.contrib.auth.middleware.AuthenticationMiddleware',
    'django.contrib.messages.middleware.MessageMiddleware',
    'wagtail.contrib.redirects.middleware.RedirectMiddleware',
]
ROOT_URLCONF = 'tests.hosts.cms.urls'
TEMPLATES = [{
    'BACKEND': 'django.template.backends.django.DjangoTemplates',
    'DIRS': [],
    'APP_DIRS': True,
    'OPTIONS': {'context_processors': [
        'django.template.context_processors.request',
        'django.contrib.auth.context_processors.auth',
        'django.contrib.messages.context_processors.messages',
    ]},
}]
STATIC_URL = 'static/'
MEDIA_ROOT = os.path.join(DATA_DIR, 'media')
MEDIA_URL = '/media/'
WAGTAIL_SITE_NAME = 'cms host'
WAGTAILADMIN_BASE_URL = 'http://localhost'
# No network: embeds and image renditions are never fetched or made.
WAGTAILEMBEDS_FINDERS = []

# --- the adoption block (docs: "adoption: settings.py"), verbatim -------
# anthias-rollback: both profiles, `default` = the active one
from anthias_rollback.profiles import build_databases  # noqa: E402

DATABASES = build_databases(data_dir='/data/.anthias')
DATABASE_ROUTERS = ['anthias_rollback.routers.BothProfilesRouter']
INSTALLED_APPS += ['anthias_rollback']

# anthias-rollback: the search index differs by engine and is left out
# of copies; rebuilt on the target after a copy or a rollback.
ANTHIAS_ROLLBACK_REBUILD_COMMANDS = ['wagtail_update_index']
