"""Test-only views for monitor_migration: slow or failing on demand.

`flaky` answers with the behaviour set by `set_behaviour()`, or the next
one queued by `queue()` (one per request), so a test scripts a real spike
through the real Django stack. Module-level state, guarded by a lock, so a
threaded test server sees it too.
"""
import contextlib
import copy
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator

from django.core.handlers.wsgi import WSGIHandler
from django.core.servers.basehttp import (
    ThreadedWSGIServer,
    WSGIRequestHandler,
)
from django.db import connections
from django.db.utils import load_backend
from django.http import HttpRequest, JsonResponse

_lock = threading.Lock()
_default = {'status': 200, 'sleep': 0.0}
_queue: deque = deque()
calls = []

OK = {'status': 200, 'sleep': 0.0}
FAIL = {'status': 500, 'sleep': 0.0}


def slow(seconds: float) -> dict:
    return {'status': 200, 'sleep': seconds}


def reset() -> None:
    with _lock:
        _default.update(OK)
        _queue.clear()
        calls.clear()


def set_behaviour(status: int = 200, sleep: float = 0.0) -> None:
    with _lock:
        _default.update(status=status, sleep=sleep)


def queue(*behaviours: dict) -> None:
    with _lock:
        _queue.extend(behaviours)


def flaky(request: HttpRequest) -> JsonResponse:
    with _lock:
        behaviour = dict(_queue.popleft() if _queue else _default)
        calls.append(behaviour)
    if behaviour['sleep']:
        time.sleep(behaviour['sleep'])
    return JsonResponse({'ok': behaviour['status'] < 400},
                        status=behaviour['status'])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


class _TestServer(ThreadedWSGIServer):
    """Each request thread gets its own `default` connection to the test
    database: `default` is a TEST MIRROR, which only the main thread's
    wrapper knows (Django's LiveServerThread solves it the same way)."""

    def __init__(self, *args, default_settings: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.default_settings = default_settings

    def process_request_thread(self, request, client_address) -> None:
        config = copy.deepcopy(self.default_settings)
        connections['default'] = load_backend(
            config['ENGINE']).DatabaseWrapper(config, 'default')
        super().process_request_thread(request, client_address)


@contextlib.contextmanager
def serve_test_app() -> Iterator[str]:
    """The test WSGI app on a real 127.0.0.1 port (0 = any free one), in a
    thread; yields the base URL."""
    httpd = _TestServer(('127.0.0.1', 0), _QuietHandler,
                        default_settings=connections['default'].settings_dict)
    httpd.set_app(WSGIHandler())
    thread = threading.Thread(target=httpd.serve_forever,
                              kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{httpd.server_port}'
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A base URL where nothing listens (a port just freed)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    return f'http://127.0.0.1:{port}'
