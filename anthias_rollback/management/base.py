"""Shared plumbing for the commands: errors to CommandError, JSON output.

Commands subclass `RollbackCommand` and implement `run()`; any
RollbackError it raises becomes one line on stderr and exit code 1 (or the
code the error carries), never a traceback.
"""
import argparse
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


def positive_int(value: str) -> int:
    """argparse type: a whole number >= 1 (else a usage error, exit 2)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a whole '
                                         'number') from None
    if number < 1:
        raise argparse.ArgumentTypeError('must be at least 1')
    return number


def positive_float(value: str) -> float:
    """argparse type: a number > 0 (else a usage error, exit 2)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r} is not a number') \
            from None
    if number <= 0:
        raise argparse.ArgumentTypeError('must be greater than 0')
    return number
