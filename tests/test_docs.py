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
                        'export_unapplied_writes',
                        'migrate_to_postgres',
                        'monitor_migration', 'replicate_changes',
                        'rollback_drill',
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


COMMANDS_SECTION = README.split('## Commands', 1)[1].split('\n## ', 1)[0]


@pytest.mark.parametrize('name', COMMANDS)
def test_every_command_has_json_and_report(name):
    from django.core.management import load_command_class

    command = load_command_class('anthias_rollback', name)
    text = command.create_parser('manage.py', name).format_help()
    assert '--json [PATH]' in text and '--report PATH' in text


def test_readme_documents_the_output_contract():
    for words in ('`--report PATH`', '`schema_version`', '`exit_code`',
                  'deprecat', '`-v0`', '`-v3`', 'last line on stdout',
                  "logging.getLogger('anthias_rollback')"):
        assert words in COMMANDS_SECTION, words
    monitor = README.split('### `monitor_migration`', 1)[1].split(
        '\n### ', 1)[0]
    assert '`--json-lines`' in monitor
    for name in ('migrate_to_postgres', 'validate_migration'):
        section = README.split(f'### `{name}`', 1)[1].split('\n### ', 1)[0]
        assert '`--report PATH`' in section, name
        assert '--json PATH' in section, name
    rollback = README.split('### `rollback_migration`', 1)[1].split(
        '\n### ', 1)[0]
    assert '`data_loss`' in rollback
