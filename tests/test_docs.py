"""The docs follow the code (sqlite-utils's tests/test_docs.py idea).

Every command has help text with its exit codes, a module docstring and a
section on docs/commands.md naming every option its --help lists; every
setting in docs/configuration.md is one the code reads; the exit-code
tables match exit_codes.py and each command's --help; the architecture
page names every module; every internal link resolves; the README is a
front door of at most 200 lines with the two commands CI runs.
"""
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import yaml
from django.core.management import load_command_class
from django.core.management.base import BaseCommand
from markdown.extensions.toc import slugify

from anthias_rollback import conf, exit_codes
from anthias_rollback.management import commands
from tests.conftest import ROOT

DOCS = ROOT / 'docs'
PACKAGE = ROOT / 'anthias_rollback'
README = (ROOT / 'README.md').read_text()
COMMANDS = sorted(m.name for m in pkgutil.iter_modules(commands.__path__))
# The nav of mkdocs.yml: architecture first, then in this order.
PAGES = ['index.md', 'runbook.md', 'adopting.md', 'supported-models.md',
         'configuration.md',
         'operations.md', 'operations-containers.md', 'commands.md',
         'exit-codes.md', 'benchmarks.md', 'development.md']
# The README's two commands, exactly: .ci/run runs the second.
DRILL_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install -q -r '
    'requirements-dev.txt && .venv/bin/python manage.py rollback_drill '
    '--embedded-postgres --seed 1000')
TEST_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install -q -r '
    'requirements-dev.txt && .venv/bin/pytest')
# Options Django gives every command; the commands page names them once.
DJANGO_OPTIONS = {s for a in BaseCommand().create_parser(
    'manage.py', 'x')._actions for s in a.option_strings}


def page(name: str) -> str:
    return (DOCS / name).read_text()


def outside_code(text: str) -> str:
    """*text* without its fenced code blocks (a `# comment` in a shell
    block is no heading)."""
    return re.sub(r'^```.*?^```', '', text, flags=re.MULTILINE | re.DOTALL)


def section(text: str, heading: str) -> str:
    """From the heading line *heading* (e.g. '## `rollback_drill`') to the
    next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip('#'))
    lines = text.split('\n')
    assert heading in lines, f'no heading {heading!r}'
    start = lines.index(heading)
    end = len(lines)
    fence = False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith('```'):
            fence = not fence
        found = re.match(r'^(#+) ', lines[i])
        if not fence and found and len(found.group(1)) <= level:
            end = i
            break
    return '\n'.join(lines[start:end])


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row of *text* (header and rule skipped)."""
    rows = []
    for line in text.split('\n'):
        if not line.startswith('|') or re.match(r'^\|[-:| ]+\|$', line):
            continue
        cells = [c.strip() for c in
                 re.split(r'(?<!\\)\|', line.strip().strip('|'))]
        rows.append(cells)
    return rows


def parser_for(name: str):
    command = load_command_class('anthias_rollback', name)
    return command.create_parser('manage.py', name)


# -- the commands ---------------------------------------------------------

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
    text = section(page('commands.md'), f'## `{name}`')
    assert re.search(r'[Ee]xit codes?', text), name
    # listed in the commands page's index table, linked to its section
    assert f'[`{name}`](#{name})' in page('commands.md'), name


@pytest.mark.parametrize('name', COMMANDS)
def test_every_option_is_on_the_reference(name):
    """Each option string of the command's parser (its --help) appears in
    its section of docs/commands.md."""
    text = section(page('commands.md'), f'## `{name}`')
    missing = []
    for action in parser_for(name)._actions:
        for option in action.option_strings:
            if option in DJANGO_OPTIONS:
                continue
            if not re.search(re.escape(option) + r'(?![\w-])', text):
                missing.append(option)
    assert not missing, f'{name}: {missing} not in docs/commands.md'


def test_django_options_named_once():
    contract = section(page('commands.md'),
                       '## The contract every command keeps')
    for option in ('--verbosity', '--settings', '--pythonpath',
                   '--traceback', '--no-color', '--force-color',
                   '--skip-checks', '--help'):
        assert option in DJANGO_OPTIONS
        assert f'`{option}' in contract, option


@pytest.mark.parametrize('name', COMMANDS)
def test_every_command_has_json_and_report(name):
    text = parser_for(name).format_help()
    assert '--json [PATH]' in text and '--report PATH' in text


def test_commands_page_documents_the_output_contract():
    commands_page = page('commands.md')
    contract = section(commands_page, '## The contract every command keeps')
    for words in ('`--report PATH`', '`schema_version`', '`exit_code`',
                  'deprecat', '`-v0`', '`-v3`', 'last line on stdout',
                  "logging.getLogger('anthias_rollback')"):
        assert words in contract, words
    monitor = section(commands_page, '## `monitor_migration`')
    assert '`--json-lines`' in monitor
    for name in ('migrate_to_postgres', 'validate_migration'):
        text = section(commands_page, f'## `{name}`')
        assert '`--report PATH`' in text, name
        assert '--json PATH' in text, name
    rollback = section(commands_page, '## `rollback_migration`')
    assert '`data_loss`' in rollback
    # every loss status a run can report (rollback/state.py LossStatus)
    from anthias_rollback.rollback.state import LossStatus

    for status in LossStatus:
        assert re.search(rf'[`/]{re.escape(status)}[`/]', rollback), status
        assert f'`{status}`' in page('index.md'), status


# -- exit codes ----------------------------------------------------------

def exit_code_constants() -> dict[str, int]:
    return {name: value for name, value in vars(exit_codes).items()
            if name.isupper() and isinstance(value, int)}


def test_exit_code_table_matches_exit_codes_py():
    table = section(page('exit-codes.md'), '# Exit codes (all commands)')
    table = table.split('\n## ', 1)[0]
    codes = [int(row[0]) for row in table_rows(table)
             if row[0].isdigit()]
    assert codes == sorted(exit_code_constants().values())
    for code in exit_code_constants().values():
        assert f'\n| {code} |' in table


def help_exit_codes(name: str) -> set[int]:
    """The codes a command's help text lists after 'Exit codes:'."""
    command = load_command_class('anthias_rollback', name)
    after = command.help.split('Exit codes', 1)[1]
    return {int(c) for c in re.findall(r'(?:^|[:,;]\s*)(\d)\b', after)}


@pytest.mark.parametrize('name', COMMANDS)
def test_per_command_exit_codes_match_help(name):
    text = section(page('exit-codes.md'), '## Which command returns which')
    header = next(r for r in table_rows(text) if r[0] == 'command')
    row = next(r for r in table_rows(text) if f'`{name}`' in r[0])
    documented = {2} | {int(code) for code, cell in zip(header[1:], row[1:])
                        if cell}
    assert documented == help_exit_codes(name), name
    assert documented <= set(exit_code_constants().values())


def test_backup_restore_exit_codes():
    """A backup restore exits 4 when rows are left out or PostgreSQL
    could not be compared; 0 only when the compare found nothing."""
    text = section(page('exit-codes.md'), '## A backup restore')
    rows = {r[2]: r[3] for r in table_rows(text) if r[3].isdigit()}
    assert rows == {'`none`': '0', '`lost`': '4', '`unknown`': '4'}


# -- settings ------------------------------------------------------------

def code_text() -> str:
    return '\n'.join(p.read_text() for p in PACKAGE.rglob('*.py'))


def setting_names(text: str) -> list[str]:
    names = []
    for row in table_rows(text):
        names += re.findall(r'`([A-Z][A-Z0-9_]+)`', row[0])
    return names


def test_every_setting_in_the_tables_is_read_by_the_code():
    text = page('configuration.md')
    names = setting_names(section(text, '## Databases and the active '
                                        'profile'))
    names += setting_names(section(text, '## App settings'))
    assert len(names) > 15
    source = code_text()
    for name in names:
        assert f"'{name}'" in source, f'{name}: no code reads it'


def test_app_settings_table_is_conf_py():
    """The app settings table lists exactly conf.DEFAULTS, and the
    environment table the variables build_databases reads."""
    text = page('configuration.md')
    assert set(setting_names(section(text, '## App settings'))) == set(
        conf.DEFAULTS)
    profiles_source = (PACKAGE / 'profiles.py').read_text()
    for name in setting_names(section(text, '## Databases and the active '
                                            'profile')):
        assert f"'{name}'" in profiles_source, name


# -- the architecture page -----------------------------------------------

def test_architecture_names_every_module():
    """docs/index.md names every package and module of anthias_rollback
    (the layout the page describes is the one that exists)."""
    text = page('index.md')
    missing = []
    for path in sorted(PACKAGE.rglob('*.py')):
        relative = path.relative_to(PACKAGE)
        if 'commands' in relative.parts or path.name == '__init__.py':
            continue
        if path.name not in text:
            missing.append(str(relative))
    for path in sorted(PACKAGE.rglob('__init__.py')):
        folder = path.parent.relative_to(PACKAGE)
        if str(folder) != '.' and f'{folder.name}/' not in text:
            missing.append(f'{folder}/')
    assert not missing, f'docs/index.md does not name {missing}'


# -- the site ------------------------------------------------------------

def test_nav_lists_every_page_architecture_first():
    config = yaml.safe_load((ROOT / 'mkdocs.yml').read_text())

    def flat(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(
                item, dict) else item
            yield from (flat(value) if isinstance(value, list)
                        else [value])

    assert list(flat(config['nav'])) == PAGES
    assert sorted(p.name for p in DOCS.glob('*.md')) == sorted(PAGES)
    assert config['docs_dir'] == 'docs'
    assert 'site/' in (ROOT / '.gitignore').read_text().split()


def anchors(path: Path) -> set[str]:
    """The ids mkdocs gives the headings of *path* (toc's slugify)."""
    found = set()
    for line in outside_code(path.read_text()).split('\n'):
        heading = re.match(r'^#+ (.*)$', line)
        if heading:
            title = re.sub(r'[`*]', '', heading.group(1))
            title = re.sub(r'\[([^]]*)\]\([^)]*\)', r'\1', title)
            found.add(slugify(title, '-'))
    return found


@pytest.mark.parametrize('path', [ROOT / 'README.md'] + [DOCS / p
                                                        for p in PAGES],
                         ids=lambda p: p.name)
def test_internal_links_resolve(path):
    text = outside_code(path.read_text())
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'^[a-z]+:', target):
            continue
        file_part, _, anchor = target.partition('#')
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or (anchor and anchor not in
                                   anchors(linked)):
            broken.append(target)
    assert not broken, f'{path.name}: {broken}'


def test_paths_named_in_the_docs_exist():
    """A file or folder of this repository that a page names exists
    (a module moved, a test renamed: the page follows)."""
    missing = []
    for path in [ROOT / 'README.md'] + [DOCS / p for p in PAGES]:
        for name in re.findall(
                r'\b((?:anthias_rollback|tests|deploy|bench|settings_profiles'
                r'|anthias_app)/[\w./*-]*)', path.read_text()):
            name = name.rstrip('.')
            if not list(ROOT.glob(name.rstrip('/') or '.')):
                missing.append(f'{path.name}: {name}')
    assert not missing, missing


# -- the README ----------------------------------------------------------

def test_readme_is_a_front_door():
    assert len(README.split('\n')) <= 200
    lines = README.split('\n')
    assert DRILL_COMMAND in lines
    assert TEST_COMMAND in lines
    # the drill's real output, and the one emergency command
    assert any(line.startswith('PASS: rollback drill passed')
               for line in lines)
    assert 'python manage.py rollback_migration --emergency' in lines
    for name in PAGES:
        assert f'](docs/{name})' in README, name
