"""System checks: configuration problems surface in `manage.py check`.

A bad PostgreSQL setting or app setting is a warning: an error would
block every command that runs the checks (migrate, runserver) on a device
that works on SQLite. Errors are kept for a configuration that is wrong
for every command: no build_databases, or a profile that cannot be read
(the device then runs on sqlite only by fallback). Our own commands skip
the checks, so `switch_database --to sqlite --force` still fixes it.
"""
from django.conf import settings
from django.core import checks
from django.db import connections

from anthias_rollback import conf, profiles
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.profiles import PROBLEM_KEY


@checks.register()
def check_databases_adopted(app_configs=None, **kwargs):
    """E002: DATABASES was not built by build_databases (every command
    would fail with "The connection 'sqlite' doesn't exist")."""
    missing = [alias for alias in profiles.PROFILES
               if alias not in settings.DATABASES]
    if not missing:
        return []
    return [checks.Error(
        f'DATABASES has no {" or ".join(map(repr, missing))} alias, so no '
        'anthias_rollback command can run',
        hint=profiles.ADOPTION_HINT, id='anthias_rollback.E002')]


@checks.register()
def check_active_profile(app_configs=None, **kwargs):
    """E001: ANTHIAS_DB_PROFILE or the state file is unusable."""
    problem = profiles.profile_problem()
    if not problem:
        return []
    return [checks.Error(
        f'the active database profile cannot be read: {problem}',
        hint='unset or fix ANTHIAS_DB_PROFILE, or rewrite the state file '
             'with `manage.py switch_database --to sqlite --force`',
        id='anthias_rollback.E001')]


@checks.register()
def check_profiles_config(app_configs=None, **kwargs):
    found = []
    for alias in connections.settings:
        problem = connections.settings[alias].get(PROBLEM_KEY)
        if problem:
            found.append(checks.Warning(
                f'database alias {alias!r}: {problem}',
                id='anthias_rollback.W001'))
    return found


@checks.register()
def check_app_settings(app_configs=None, **kwargs):
    """W002: an app setting (restart timeout, exclusions...) is bad; the
    operations that read it refuse before changing anything."""
    try:
        conf.validate_settings()
    except RollbackError as err:
        return [checks.Warning(str(err), id='anthias_rollback.W002')]
    return []
