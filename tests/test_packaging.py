"""The operator's contract: the package installs on its own, the README's
adoption snippet works on a blank Django project, and the shipped systemd
units and prune script say what the commands accept."""
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.core.management import load_command_class

from tests.conftest import ROOT

# The README and the docs site together: the adoption blocks are on
# docs/adopting.md, the units on docs/operations.md, the settings on
# docs/configuration.md.
README = '\n'.join(path.read_text() for path in [
    ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))])
SYSTEMD = ROOT / 'deploy' / 'systemd'
PRUNE = ROOT / 'deploy' / 'anthias-rollback-prune'
HARDENING = {'NoNewPrivileges': 'yes', 'PrivateTmp': 'yes',
             'ProtectSystem': 'strict', 'ReadWritePaths': '/data/.anthias'}
# What a clean checkout holds that is not the package's source.
NOT_SOURCE = shutil.ignore_patterns(
    '.git', '.venv*', 'build', '*.egg-info', '__pycache__', 'var', 'bench',
    '.ruff_cache', '.pytest_cache', 'tests')


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this suite's Django and database settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('ANTHIAS_', 'POSTGRES_', 'DJANGO_',
                                'PYTHON'))}
    env.update(extra)
    return env


def run(args: list, cwd: Path, env: dict, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, (args, proc.stdout[-2000:],
                                  proc.stderr[-2000:])
    return proc


# -- (a) the package -------------------------------------------------------

def test_package_installs_alone_with_license_and_metadata(tmp_path):
    source = tmp_path / 'checkout'
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    venv = tmp_path / 'venv'
    env = clean_env()
    run([sys.executable, '-m', 'venv', venv], tmp_path, env)
    python = venv / 'bin' / 'python'
    run([python, '-m', 'pip', 'install', '-q', '--no-deps', source],
        tmp_path, env, timeout=300)
    # -I: neither the checkout nor PYTHONPATH is on sys.path.
    probe = run([python, '-I', '-c', '''
import importlib.metadata as m, json, pathlib, anthias_rollback
dist = m.distribution('anthias-rollback')
files = [str(f) for f in dist.files]
lic = [f for f in dist.files if f.name == 'LICENSE']
print(json.dumps({
    'file': anthias_rollback.__file__,
    'version': anthias_rollback.__version__,
    'meta': {k: dist.metadata.get_all(k) for k in (
        'Name', 'Version', 'License', 'Requires-Python', 'Requires-Dist',
        'Classifier')},
    'license': lic[0].read_text() if lic else None,
    'tops': sorted({f.split('/')[0] for f in files
                    if not f.startswith(('..', 'anthias_rollback-'))}),
}))
'''], tmp_path, env)
    info = json.loads(probe.stdout)
    assert info['file'].startswith(str(venv)), info['file']
    meta = info['meta']
    assert meta['Name'] == ['anthias-rollback']
    assert meta['Version'] == [info['version']]
    assert meta['License'] == ['MIT']
    assert meta['Requires-Python'] == ['>=3.11']
    assert 'Django<6.1,>=5.2' in meta['Requires-Dist']
    classifiers = set(meta['Classifier'])
    for needed in ('Framework :: Django :: 5.2', 'Framework :: Django :: 6.0',
                   'Programming Language :: Python :: 3.11',
                   'Programming Language :: Python :: 3.12',
                   'Programming Language :: Python :: 3.13'):
        assert needed in classifiers
    assert info['license'] == (ROOT / 'LICENSE').read_text()
    assert info['license'].startswith('MIT License\n')
    assert 'Copyright (c) 2026 anthias-rollback contributors' in \
        info['license']
    # The reference host and the stand-in app are not packaged.
    assert info['tops'] == ['anthias_rollback']


def test_requirements_match_the_supported_range():
    setup_cfg = (ROOT / 'setup.cfg').read_text()
    requirements = (ROOT / 'requirements.txt').read_text().split()
    assert 'Django>=5.2,<6.1' in setup_cfg.split()
    assert 'Django>=5.2,<6.1' in requirements
    assert 'python_requires = >=3.11' in setup_cfg


# -- (b) the README's adoption snippet on a blank host --------------------

def readme_block(marker: str) -> str:
    """The fenced code block right after `<!-- adoption: MARKER -->`."""
    found = re.search(rf'<!-- adoption: {re.escape(marker)} -->\s*'
                      r'```python\n(.*?)```', README, re.DOTALL)
    assert found, f'README has no block marked adoption: {marker}'
    return found.group(1)


def test_readme_adoption_on_a_blank_startproject(tmp_path):
    host = tmp_path / 'host'
    host.mkdir()
    data = tmp_path / 'data'   # /data/.anthias exists on a device
    data.mkdir()
    # PYTHONPATH instead of installing: the shared venv stays as it is.
    env = clean_env(PYTHONPATH=str(ROOT), ANTHIAS_DATA_DIR=str(data),
                    ANTHIAS_POSTGRES_URL='postgres://anthias@127.0.0.1:1/'
                                         'anthias')
    run([sys.executable, '-m', 'django', 'startproject', 'anthias_django',
         host], tmp_path, env)
    settings = host / 'anthias_django' / 'settings.py'
    urls = host / 'anthias_django' / 'urls.py'
    settings.write_text(settings.read_text() + '\n'
                        + readme_block('settings.py'))
    urls.write_text(urls.read_text() + '\n' + readme_block('urls.py'))
    snippet = readme_block('settings.py')
    assert "build_databases(data_dir='/data/.anthias')" in snippet

    def manage(*args: str) -> str:
        return run([sys.executable, 'manage.py', *args], host, env).stdout

    manage('check')
    manage('migrate', '--database', 'sqlite', '--noinput')
    assert (data / 'anthias.db').is_file()
    shown = manage('switch_database', '--show')
    assert 'active profile: sqlite' in shown
    health = manage('shell', '-c', (
        'from django.test import Client; '
        "r = Client(HTTP_HOST='localhost').get('/health'); "
        'print(r.status_code, r.json()["profile"])'))
    assert health.strip().splitlines()[-1] == '200 sqlite'


# -- (c) the systemd units -------------------------------------------------

def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None,
                                     delimiters=('=',))
    unit.optionxform = str
    unit.read(path)
    return unit


SERVICES = sorted(SYSTEMD.glob('*.service'))


def test_units_present():
    names = {p.name for p in SYSTEMD.iterdir()}
    for kind in ('backup', 'readiness', 'drill', 'prune'):
        assert f'anthias-rollback-{kind}.service' in names
        assert f'anthias-rollback-{kind}.timer' in names
    assert 'anthias-rollback-monitor.service' in names
    for timer in SYSTEMD.glob('*.timer'):
        unit = read_unit(timer)
        assert unit['Timer']['OnCalendar']
        assert unit['Timer']['Persistent'] == 'true'
        assert unit['Install']['WantedBy'] == 'timers.target'
        assert (SYSTEMD / timer.name.replace('.timer', '.service')).exists()
    for path in SYSTEMD.iterdir():
        assert path.name in README, f'README does not name {path.name}'


@pytest.mark.parametrize('path', SERVICES, ids=lambda p: p.stem)
def test_service_hardening_and_user(path):
    service = read_unit(path)['Service']
    for key, value in HARDENING.items():
        assert service.get(key) == value, (path.name, key)
    assert service['User'] != 'root'
    assert service['EnvironmentFile'] == \
        '/etc/anthias-rollback/anthias-rollback.env'


@pytest.mark.parametrize('path', [p for p in SERVICES
                                  if 'prune' not in p.name],
                         ids=lambda p: p.stem)
def test_service_runs_a_real_command_with_real_flags(path):
    service = read_unit(path)['Service']
    assert service['WorkingDirectory'] == '/home/pi/anthias'
    words = shlex.split(service['ExecStart'])
    assert words[1] == 'manage.py', words
    name, args = words[2], words[3:]
    command = load_command_class('anthias_rollback', name)
    command.create_parser('manage.py', name).parse_args(args)


def test_monitor_service_restarts_with_backoff():
    service = read_unit(SYSTEMD / 'anthias-rollback-monitor.service')
    assert service['Service']['Type'] == 'simple'
    assert service['Service']['Restart'] == 'on-failure'
    assert service['Service']['RestartSec']
    assert service['Unit']['StartLimitBurst']
    condition = shlex.split(service['Service']['ExecCondition'])
    assert condition[1] == '-c'
    code = condition[2]
    for profile, expected in (('postgres', 0), ('sqlite', 1)):
        proc = subprocess.run(
            [sys.executable, '-c', code], cwd=ROOT, check=False,
            env=clean_env(ANTHIAS_DB_PROFILE=profile,
                          ANTHIAS_DATA_DIR=str(ROOT / 'var')))
        assert proc.returncode == expected, profile


def test_env_example_names_real_settings():
    text = (SYSTEMD / 'anthias-rollback.env.example').read_text()
    names = re.findall(r'^#?([A-Z][A-Z0-9_]+)=', text,
                       re.MULTILINE)
    assert 'ANTHIAS_POSTGRES_URL' in names
    for name in names:
        assert f'`{name}`' in README, name


# -- (d) the prune script ---------------------------------------------------

def test_prune_keeps_the_newest_and_young_files(tmp_path):
    now = datetime.now(UTC)
    old = [(now - timedelta(days=d)).strftime('%Y%m%d_%H%M%S')
           for d in (200, 100)]
    young = (now - timedelta(days=5)).strftime('%Y%m%d_%H%M%S')
    names = []
    for stamp in (*old, young):
        names += [f'reports/rollback_{stamp}_000001.json',
                  f'reports/rollback_{stamp}_000001.txt',
                  f'reports/at_risk_rows_{stamp}.json',
                  f'drills/drill_{stamp}_000001.json',
                  f'backups/postgresql_pre_rollback_{stamp}.dump',
                  f'anthias.db.pre-rollback-{stamp}']
    names += ['backups/anthias_backup_20200101_000000.db',
              'drills/history.jsonl', 'anthias.db']
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('x')
    env = clean_env(ANTHIAS_DATA_DIR=str(tmp_path))
    dry = run(['bash', PRUNE, '--dry-run'], tmp_path, env).stdout
    assert all((tmp_path / n).exists() for n in names)
    assert dry.count('would remove') == 12
    out = run(['bash', PRUNE, '--days', '30', '--report-days', '90'],
              tmp_path, env).stdout
    assert out.count('removed') == 12
    left = sorted(str(p.relative_to(tmp_path))
                  for p in tmp_path.rglob('*') if p.is_file())
    # Backups are backup_database's business; young files and the newest
    # of each kind stay.
    assert left == sorted(n for n in names
                          if not any(s in n for s in old))
    # The newest is kept even when it is old.
    for name in names:
        if young in name:
            (tmp_path / name).unlink()
        elif any(s in name for s in old):
            (tmp_path / name).write_text('x')
    run(['bash', PRUNE, '--days', '0', '--report-days', '0'], tmp_path, env)
    assert (tmp_path / f'anthias.db.pre-rollback-{old[1]}').exists()
    assert not (tmp_path / f'anthias.db.pre-rollback-{old[0]}').exists()
    bad = subprocess.run(['bash', str(PRUNE), '--days', 'x'],
                         capture_output=True, env=env, check=False)
    assert bad.returncode == 2
