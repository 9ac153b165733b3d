"""Run `manage.py` in this process and record what it cost the machine.

    python -m bench.measured <out.json> <manage.py args...>

Writes {"maxrss_mb", "anon_mb", "wchar_mb", "write_bytes_mb", "exit"}
to out.json when the command ends: peak resident memory of this process
and of the children it waited for (getrusage), the peak of its
anonymous part (RssAnon in /proc/self/status, sampled every 20 ms: what
the process itself allocated, without the file pages SQLite maps for
its checks, which the kernel can drop at any time), and the bytes it
handed to write(2) (/proc/self/io wchar; write_bytes, the bytes that
reached the block layer, reads 0 in containers without block-I/O
accounting).
"""
import atexit
import json
import os
import resource
import runpy
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _io() -> dict[str, int]:
    try:
        text = Path('/proc/self/io').read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(': ')
                                   for line in text.splitlines())}


def _rss_anon_kb() -> int:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('RssAnon:'):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _AnonPeak(threading.Thread):
    """The peak of RssAnon, sampled until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        # BENCH_RSS_TRACE=path: every sample as "seconds kB" lines, to
        # find the phase that makes the peak.
        trace = os.environ.get('BENCH_RSS_TRACE')
        samples = []
        started = time.monotonic()
        while not self.done.wait(0.02):
            now = _rss_anon_kb()
            self.peak_kb = max(self.peak_kb, now)
            if trace:
                samples.append(f'{time.monotonic() - started:.2f} {now}')
        if trace:
            Path(trace).write_text('\n'.join(samples) + '\n')

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak_kb, _rss_anon_kb())


def main() -> None:
    out = Path(sys.argv[1])
    anon = _AnonPeak()
    anon.start()
    sys.argv = [str(ROOT / 'manage.py'), *sys.argv[2:]]
    # The commands end the process with os._exit once their atexit
    # handlers have run (management.contract.exit_now), so the figures
    # are written by one; 'exit' is null then (the caller has the code).
    ended: dict[str, object] = {'exit': None}

    def record() -> None:
        io = _io()
        rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        out.write_text(json.dumps({
            'maxrss_mb': round(rss / 1024, 1),
            'anon_mb': round(anon.stop() / 1024, 1),
            'wchar_mb': round(io.get('wchar', 0) / 2**20, 1),
            'write_bytes_mb': round(io.get('write_bytes', 0) / 2**20, 1),
            **ended}))

    atexit.register(record)
    try:
        runpy.run_path(str(ROOT / 'manage.py'), run_name='__main__')
    except SystemExit as done:
        ended['exit'] = done.code if isinstance(done.code, int) else 1
        raise
    ended['exit'] = 0


if __name__ == '__main__':
    main()
