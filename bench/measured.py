"""Run `manage.py` in this process and record what it cost the machine.

    python -m bench.measured <out.json> <manage.py args...>

Writes {"maxrss_mb", "wchar_mb", "write_bytes_mb", "exit"} to out.json
when the command ends: peak resident memory of this process and of the
children it waited for (getrusage), and the bytes it handed to write(2)
(/proc/self/io wchar; write_bytes, the bytes that reached the block
layer, reads 0 in containers without block-I/O accounting).
"""
import json
import resource
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _io() -> dict[str, int]:
    try:
        text = Path('/proc/self/io').read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(': ')
                                   for line in text.splitlines())}


def main() -> None:
    out = Path(sys.argv[1])
    sys.argv = [str(ROOT / 'manage.py'), *sys.argv[2:]]
    code: object = 0
    try:
        runpy.run_path(str(ROOT / 'manage.py'), run_name='__main__')
    except SystemExit as done:
        code = done.code
    finally:
        io = _io()
        rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        out.write_text(json.dumps({
            'maxrss_mb': round(rss / 1024, 1),
            'wchar_mb': round(io.get('wchar', 0) / 2**20, 1),
            'write_bytes_mb': round(io.get('write_bytes', 0) / 2**20, 1),
            'exit': code if isinstance(code, int) else 1}))
    sys.exit(code)


if __name__ == '__main__':
    main()
