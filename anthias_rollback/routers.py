"""Router that lets `migrate --database sqlite|postgres` build the schema.

Django allows migrations everywhere when no router has an opinion; this
router says so explicitly for our aliases, so a host router placed after
it cannot keep `migrate` from creating the full schema on either engine.
Reads and writes get no opinion (None): core code always names its alias.
"""


class BothProfilesRouter:
    def db_for_read(self, model, **hints):
        return None

    def db_for_write(self, model, **hints):
        return None

    def allow_relation(self, obj1, obj2, **hints):
        return None

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        from anthias_rollback.profiles import DEFAULT, PROFILES

        if db in PROFILES or db == DEFAULT:
            return True
        return None
