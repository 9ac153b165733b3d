from django.apps import AppConfig


class AnthiasRollbackConfig(AppConfig):
    name = 'anthias_rollback'
    verbose_name = 'Anthias rollback'

    def ready(self) -> None:
        from anthias_rollback import checks  # noqa: F401  (registers checks)
