"""Shared plumbing for the commands: errors to CommandError, JSON output.

Commands subclass `RollbackCommand` and implement `run()`; any
RollbackError it raises becomes one line on stderr and exit code 1 (or the
code the error carries), never a traceback.
"""
import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from anthias_rollback import exit_codes
from anthias_rollback.exceptions import RollbackError
from anthias_rollback.report import redact


class RollbackCommand(BaseCommand):
    # Checks need no database; our own warnings still show under `check`.
    requires_system_checks: tuple = ()

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            self.run(*args, **options)
        except RollbackError as err:
            raise CommandError(redact(str(err)),
                               returncode=exit_codes.FAILED) from err
        except KeyboardInterrupt:
            raise CommandError('interrupted; nothing was changed unless '
                               'reported above',
                               returncode=exit_codes.FAILED) from None

    def run(self, *args: Any, **options: Any) -> None:
        raise NotImplementedError

    def write_json(self, data: Any) -> None:
        """The JSON document alone on stdout (secrets redacted)."""
        self.stdout.write(json.dumps(redact(data), indent=2, default=str,
                                     sort_keys=True))

    def is_tty(self) -> bool:
        stream = getattr(self.stdout, '_out', sys.stdout)
        return hasattr(stream, 'isatty') and stream.isatty()

    def fail(self, message: str, code: int = exit_codes.FAILED) -> None:
        raise CommandError(redact(message), returncode=code)
