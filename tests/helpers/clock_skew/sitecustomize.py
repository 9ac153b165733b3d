"""A wrong clock for one child process: put this directory first on
PYTHONPATH and set ANTHIAS_TEST_CLOCK_OFFSET (seconds). time.time() then
runs that far ahead (or behind), as on a Raspberry Pi without an RTC
whose clock NTP or a person moved while the process ran. PostgreSQL
keeps the true time: the test's skew is between the two clocks."""
import os
import time as _time

_OFFSET = float(os.environ.get('ANTHIAS_TEST_CLOCK_OFFSET') or 0)

if _OFFSET:
    _real_time = _time.time

    def _skewed_time() -> float:
        return _real_time() + _OFFSET

    _time.time = _skewed_time
