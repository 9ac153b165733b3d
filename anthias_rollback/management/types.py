"""argparse types for the commands' options: a bad value is exit 2 with
one line, before anything changed.
"""
import argparse
import math
from collections.abc import Callable

# Upper bounds keep a typo (30 digits) from reaching timedelta or a
# deadline as an OverflowError after work was done: exit 2 instead.
MAX_COUNT = 10**9
MAX_BATCH = 1_000_000
MAX_SECONDS = 7 * 24 * 3600.0
MAX_MINUTES = MAX_SECONDS / 60
MAX_HOURS = 10 * 366 * 24.0
MAX_DAYS = 100 * 366.0


def _shown(value: str) -> str:
    """A bad value for the error line: quoted, shortened, ASCII-safe."""
    text = value if len(value) <= 24 else f'{value[:20]}...'
    return ascii(text)


def whole_number(minimum: int = 1, maximum: int = MAX_COUNT
                 ) -> Callable[[str], int]:
    """argparse type: an int from *minimum* to *maximum*."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'{_shown(value)} is not a whole number') from None
        if number < minimum:
            raise argparse.ArgumentTypeError(
                f'must be at least {minimum}, not {_shown(value)}')
        if number > maximum:
            raise argparse.ArgumentTypeError(
                f'must be at most {maximum}, not {_shown(value)}')
        return number
    parse.__name__ = 'whole number'
    return parse


def number(minimum: float = 0.0, maximum: float = MAX_SECONDS,
           above_minimum: bool = True) -> Callable[[str], float]:
    """argparse type: a finite float up to *maximum*, greater than
    *minimum* (or equal to it, when not *above_minimum*)."""
    def parse(value: str) -> float:
        try:
            parsed = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'{_shown(value)} is not a number') from None
        if not math.isfinite(parsed):
            raise argparse.ArgumentTypeError(
                f'must be a finite number, not {_shown(value)}')
        if above_minimum and parsed <= minimum:
            raise argparse.ArgumentTypeError(
                f'must be greater than {minimum:g}, not {_shown(value)}')
        if parsed < minimum:
            raise argparse.ArgumentTypeError(
                f'must be {minimum:g} or more, not {_shown(value)}')
        if parsed > maximum:
            raise argparse.ArgumentTypeError(
                f'must be at most {maximum:g}, not {_shown(value)}')
        return parsed
    parse.__name__ = 'number'
    return parse


positive_int = whole_number(1, MAX_COUNT)
non_negative_int = whole_number(0, MAX_COUNT)
batch_size = whole_number(1, MAX_BATCH)
positive_float = number(0.0, MAX_SECONDS)
positive_ms = number(0.0, MAX_SECONDS * 1000)
non_negative_float = number(0.0, MAX_SECONDS, above_minimum=False)
percent = number(0.0, 100.0, above_minimum=False)
percent_above_zero = number(0.0, 100.0)
positive_minutes = number(0.0, MAX_MINUTES)
positive_hours = number(0.0, MAX_HOURS)
non_negative_days = number(0.0, MAX_DAYS, above_minimum=False)


def text_arg(value: str) -> str:
    """argparse type: text that is valid UTF-8.

    A non-UTF-8 argv byte arrives as a lone surrogate (surrogateescape)
    and would raise UnicodeEncodeError later, when printed or opened."""
    try:
        value.encode('utf-8')
    except UnicodeEncodeError:
        raw = value.encode('utf-8', 'surrogateescape')
        raise argparse.ArgumentTypeError(
            f'{ascii(raw)[1:]} is not valid UTF-8') from None
    return value


def path_arg(value: str) -> str:
    """argparse type: a non-empty path that is valid UTF-8."""
    if not value:
        raise argparse.ArgumentTypeError('the path is empty')
    return text_arg(value)


def http_url(value: str) -> str:
    """argparse type: an http:// or https:// URL."""
    text_arg(value)
    if not value.startswith(('http://', 'https://')):
        raise argparse.ArgumentTypeError(
            f'{_shown(value)} must start with http:// or https://')
    return value

