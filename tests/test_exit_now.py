"""The commands end the process without the interpreter's teardown
(management.contract.exit_now), and lose nothing by it: the exit code,
every byte of stdout, the atexit handlers; and they take the ordinary
exit when something still needs it (a file open for writing, a thread
still running). Real child processes."""
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

# A module global whose finalizer speaks: it runs in the interpreter's
# teardown and never after os._exit, so it tells the two exits apart.
PRELUDE = textwrap.dedent('''
    import atexit, sys, threading, time
    from anthias_rollback.management.contract import exit_now

    class Teardown:
        def __del__(self):
            sys.stderr.write('teardown ran\\n')

    MARK = Teardown()
    atexit.register(lambda: sys.stderr.write('atexit ran\\n'))
''')


def child(body: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-c', PRELUDE + textwrap.dedent(body)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False)


@pytest.mark.parametrize('code, status', [(None, 0), (0, 0), (4, 4)])
def test_the_fast_exit_keeps_the_code_stdout_and_atexit(code, status):
    done = child(f'''
        sys.stdout.write('x' * 200_000)   # buffered: stdout is a pipe
        exit_now({code!r})
    ''')
    assert done.returncode == status, done.stderr
    assert done.stdout == 'x' * 200_000
    assert 'atexit ran' in done.stderr
    assert 'teardown ran' not in done.stderr   # the teardown was skipped


def test_a_message_as_the_code_is_printed_and_exits_1():
    done = child("exit_now('refused: the fence is up')")
    assert done.returncode == 1
    assert 'refused: the fence is up' in done.stderr


def test_a_file_open_for_writing_gets_the_ordinary_exit(tmp_path):
    path = tmp_path / 'left-open.txt'
    done = child(f'''
        left = open({str(path)!r}, 'w')
        left.write('y' * 1000)   # in the buffer, not yet on disk
        exit_now(3)
    ''')
    assert done.returncode == 3, done.stderr
    assert path.read_text() == 'y' * 1000
    assert 'teardown ran' in done.stderr
    assert done.stderr.count('atexit ran') == 1


def test_a_file_open_for_reading_does_not_hold_the_exit(tmp_path):
    path = tmp_path / 'read.txt'
    path.write_text('z')
    done = child(f'''
        kept = open({str(path)!r})
        exit_now(0)
    ''')
    assert done.returncode == 0, done.stderr
    assert 'teardown ran' not in done.stderr


def test_a_thread_still_running_is_waited_for(tmp_path):
    path = tmp_path / 'late.txt'
    done = child(f'''
        def late():
            time.sleep(0.3)
            with open({str(path)!r}, 'w') as f:
                f.write('done')
        threading.Thread(target=late).start()
        exit_now(0)
    ''')
    assert done.returncode == 0, done.stderr
    assert path.read_text() == 'done'
    assert 'teardown ran' in done.stderr
