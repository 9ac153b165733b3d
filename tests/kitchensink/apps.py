from django.apps import AppConfig


class KitchenSinkConfig(AppConfig):
    default_auto_field = 'django.db.models.BigAutoField'
    name = 'tests.kitchensink'
    label = 'kitchensink'
