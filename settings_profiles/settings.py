"""Reference host settings: what Anthias's settings.py looks like with
anthias_rollback adopted (the DATABASES lines are the adoption)."""
from pathlib import Path

import environ

from anthias_rollback.profiles import build_databases

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

ANTHIAS_DATA_DIR = env.str('ANTHIAS_DATA_DIR', str(BASE_DIR / 'var'))
DATABASES = build_databases(data_dir=ANTHIAS_DATA_DIR)
DATABASE_ROUTERS = ['anthias_rollback.routers.BothProfilesRouter']

SECRET_KEY = env.str('DJANGO_SECRET_KEY',
                     'reference-host-not-secret-change-me')
DEBUG = env.bool('DJANGO_DEBUG', False)
ALLOWED_HOSTS = ['*']
USE_TZ = True
TIME_ZONE = 'UTC'
DEFAULT_AUTO_FIELD = 'django.db.models.BigAutoField'

INSTALLED_APPS = [
    'django.contrib.admin',
    'django.contrib.auth',
    'django.contrib.contenttypes',
    'django.contrib.sessions',
    'django.contrib.messages',
    'django.contrib.staticfiles',
    'anthias_app',
    'anthias_rollback',
]
MIDDLEWARE = [
    'django.middleware.security.SecurityMiddleware',
    'django.contrib.sessions.middleware.SessionMiddleware',
    'django.middleware.common.CommonMiddleware',
    'django.middleware.csrf.CsrfViewMiddleware',
    'django.contrib.auth.middleware.AuthenticationMiddleware',
    'django.contrib.messages.middleware.MessageMiddleware',
]
ROOT_URLCONF = 'settings_profiles.urls'
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
