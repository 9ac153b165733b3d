import sys

from django.apps import AppConfig
from django.db.models.signals import post_migrate, pre_migrate


class AnthiasRollbackConfig(AppConfig):
    name = 'anthias_rollback'
    verbose_name = 'Anthias rollback'

    def ready(self) -> None:
        from anthias_rollback import (
            checks,  # noqa: F401  (registers checks)
            routers,
        )

        # No sender: `migrate` sends both signals once per installed app,
        # and pre_migrate goes out for every app before the first
        # migration runs, so the first app's data migrations are routed.
        pre_migrate.connect(routers.migration_started,
                            dispatch_uid='anthias_rollback.migrating')
        post_migrate.connect(routers.migration_finished,
                             dispatch_uid='anthias_rollback.migrated')
        # `manage.py migrate --database X`: X is `default` from now, before
        # the command imports the migrations (some read the vendor then).
        alias = routers.migrate_command_alias(sys.argv)
        if alias is not None:
            routers.migration_started(using=alias)
