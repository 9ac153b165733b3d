"""Every command has help text with its exit codes, a module docstring,
and an entry in the README (sqlite-utils's tests/test_docs.py idea)."""
import importlib
import pkgutil
import re

import pytest

from anthias_rollback.management import commands
from tests.conftest import ROOT

README = (ROOT / 'README.md').read_text()
COMMANDS = sorted(m.name for m in pkgutil.iter_modules(commands.__path__))


def test_all_commands_found():
    assert COMMANDS == ['backup_database', 'end_rollback_window',
                        'migrate_to_postgres',
                        'monitor_migration', 'rollback_drill',
                        'rollback_migration', 'rollback_readiness',
                        'switch_database', 'validate_migration']


@pytest.mark.parametrize('name', COMMANDS)
def test_command_documented(name):
    module = importlib.import_module(
        f'anthias_rollback.management.commands.{name}')
    assert 'Exit codes' in module.__doc__
    assert 'Exit codes' in module.Command.help
    assert f'### `{name}`' in README
    section = README.split(f'### `{name}`', 1)[1].split('\n### ', 1)[0]
    assert re.search(r'[Ee]xit codes?', section), name


def test_readme_has_the_two_commands_and_exit_table():
    assert 'manage.py rollback_drill --embedded-postgres --seed 1000' in \
        README
    assert '.venv/bin/pytest\n' in README
    for code in range(5):
        assert f'\n| {code} |' in README
