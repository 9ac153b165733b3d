"""System checks: configuration problems surface in `manage.py check`.

Warnings, not errors: an error would block every management command,
including the rollback that fixes the problem.
"""
from django.core import checks
from django.db import connections

from anthias_rollback.profiles import PROBLEM_KEY


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
