"""The CMS host (tests/hosts/cms) for tests other than its runbook:
a device (data dir, SQLite file, a fresh PostgreSQL database) whose
manage commands run in real child processes with the runbook's
environment (tests/test_host_cms.py's Device)."""
import subprocess

import pytest

from tests.test_host_cms import (  # noqa: F401  (re-exported)
    SEARCH_TABLES,
    Device,
    cms_database,
    last_lines,
)


class CmsDevice(Device):
    def ok(self, name: str, *args: str, env: dict | None = None) -> str:
        """Run a command that must exit 0; its stdout and stderr."""
        done = self.run(*args, env=env)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            pytest.fail(f'{name}: {" ".join(args)}: exit '
                        f'{done.returncode}: {last_lines(output, 12)}',
                        pytrace=False)
        return output

    def migrate_both(self) -> None:
        """Both databases at the host's migrations, each migrated as the
        active profile (`default`): what `migrate --database <alias>`
        does to data migrations is not what these tests are about."""
        self.ok('migrate sqlite', 'migrate', '--noinput')
        self.ok('migrate postgres', 'migrate', '--noinput',
                env=self.env(ANTHIAS_DB_PROFILE='postgres'))

    def run_with(self, *args: str, **env: str
                 ) -> subprocess.CompletedProcess:
        return self.run(*args, env=self.env(**env))
