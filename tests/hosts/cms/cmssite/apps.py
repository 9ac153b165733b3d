from django.apps import AppConfig


class CmsSiteConfig(AppConfig):
    name = 'tests.hosts.cms.cmssite'
    label = 'cmssite'
    default_auto_field = 'django.db.models.BigAutoField'
