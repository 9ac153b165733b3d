from django.apps import AppConfig


class ModelsCornersConfig(AppConfig):
    name = 'tests.models_corners'
    label = 'models_corners'
    default_auto_field = 'django.db.models.BigAutoField'
