from django.apps import AppConfig


class Release3Config(AppConfig):
    """The host's third release, applied by `migrate` while the device
    runs on PostgreSQL (an upgrade mid-window): a new model, and a new
    column with a default on an existing table (models_corners.Setting,
    through corners/migrations)."""
    name = 'tests.hosts.cms.release3'
    label = 'release3'
