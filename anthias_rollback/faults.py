"""Named fault-injection points for crash-safety tests.

`checkpoint(name)` does nothing unless ANTHIAS_ROLLBACK_KILL_AT names this
point, in which case the process SIGKILLs itself there: the only honest
way to test what a power cut or an OOM kill at that instant leaves behind.
ANTHIAS_ROLLBACK_PAUSE_AT=name:seconds sleeps there instead (for tests
that stop a server or start a second operation mid-run);
ANTHIAS_ROLLBACK_PAUSED_FLAG=path is created when the pause begins, so a
test on a loaded machine waits for the point, not for a guessed time.
"""
import os
import signal
import time


def checkpoint(name: str) -> None:
    kill_at = os.environ.get('ANTHIAS_ROLLBACK_KILL_AT')
    if kill_at and kill_at == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause_at = os.environ.get('ANTHIAS_ROLLBACK_PAUSE_AT')
    if pause_at:
        # Point names contain ':' themselves: the seconds are the last
        # field when it is a number.
        point, _, seconds = pause_at.rpartition(':')
        try:
            pause = float(seconds)
        except ValueError:
            point, pause = pause_at, 5.0
        if point == name:
            flag = os.environ.get('ANTHIAS_ROLLBACK_PAUSED_FLAG')
            if flag:
                with open(flag, 'w'):
                    pass
            time.sleep(pause)
