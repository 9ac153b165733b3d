from django.apps import AppConfig


class Release2Config(AppConfig):
    """The host's second release: no models, one data migration on the
    corner models that writes through the default manager."""
    name = 'tests.hosts.cms.release2'
    label = 'release2'
