"""The monitor's probes: `ClientProber` (in-process, Django's test
client) and `HttpProber` (a running server at a base URL), both returning
`Probe`s, the URLs a round probes (the health URL, then
ANTHIAS_ROLLBACK_VERIFY_URLS) and the check that the target answers
before the watch begins. Reads only (through the probed views); never
prints.
"""
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from anthias_rollback import conf
from anthias_rollback.exceptions import MonitorInputError, RollbackError
from anthias_rollback.health import client_host
from anthias_rollback.monitor.rules import (
    IN_PROCESS,
    MonitorConfig,
    Probe,
    TargetInfo,
)
from anthias_rollback.report import first_line

FALLBACK_HEALTH_PATH = '/health'


def health_path() -> str:
    """The path of this app's /health view in the host's URLconf."""
    from django.urls import NoReverseMatch, reverse

    try:
        return reverse('anthias_rollback:health')
    except NoReverseMatch:
        return FALLBACK_HEALTH_PATH


def monitored_urls(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The health path, then ANTHIAS_ROLLBACK_VERIFY_URLS, then *extra*,
    without duplicates."""
    urls = [health_path(), *conf.get_list_setting(
        'ANTHIAS_ROLLBACK_VERIFY_URLS'), *extra]
    return tuple(dict.fromkeys(urls))


def _health_fields(url: str, body: bytes) -> dict[str, Any]:
    """database_ok and profile from a /health JSON body, if it is one."""
    if urllib.parse.urlsplit(url).path.rstrip('/') \
            != health_path().rstrip('/'):
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    ok = data.get('database_ok')
    profile = data.get('profile')
    problems = data.get('problems')
    return {'database_ok': ok if isinstance(ok, bool) else None,
            'profile': profile if isinstance(profile, str) else None,
            'problem': str(problems[0]) if isinstance(problems, list)
            and problems else None}


def _answered(url: str, status: int, ms: float, body: bytes) -> Probe:
    fields = _health_fields(url, body)
    problem = fields.pop('problem', None)
    error = None
    if status >= 400:
        # /health says why (already redacted by the view): name it.
        error = f'HTTP {status}' + (f': {problem}' if problem else '')
    return Probe(url, status, ms, error, **fields)


class ClientProber:
    """Probes through the whole Django stack in this process (middleware,
    URLconf, views, the `default` database), with no server running."""

    def __init__(self) -> None:
        from django.test import Client

        # A crashing view must become a 500 probe, not stop the monitor.
        self.client = Client(raise_request_exception=False,
                             HTTP_HOST=client_host())

    def __call__(self, url: str) -> Probe:
        start = time.perf_counter()
        try:
            response = self.client.get(url)
        except Exception as err:  # noqa: BLE001 a failed probe is data
            ms = (time.perf_counter() - start) * 1000
            return Probe(url, None, ms, first_line(err))
        ms = (time.perf_counter() - start) * 1000
        return _answered(url, response.status_code, ms, response.content)


class HttpProber:
    """Probes a running server at *base_url* over HTTP."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip('/')
        self.timeout = timeout
        # No proxy: http_proxy in a device's environment must not route a
        # probe of 127.0.0.1 elsewhere.
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}))

    def full_url(self, url: str) -> str:
        if urllib.parse.urlsplit(url).scheme:
            return url
        return self.base_url + '/' + url.lstrip('/')

    def __call__(self, url: str) -> Probe:
        request = urllib.request.Request(
            self.full_url(url), headers={'Accept': 'application/json'})
        start = time.perf_counter()
        try:
            with self.opener.open(request, timeout=self.timeout) as resp:
                body = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            body = err.read()
            status = err.code
        except (urllib.error.URLError, OSError,
                http.client.HTTPException) as err:
            ms = (time.perf_counter() - start) * 1000
            reason = getattr(err, 'reason', err)
            return Probe(url, None, ms, f'no answer: {reason}')
        ms = (time.perf_counter() - start) * 1000
        return _answered(url, status, ms, body)


Prober = Callable[[str], Probe]


def make_prober(config: MonitorConfig) -> Prober:
    if config.base_url is None:
        return ClientProber()
    return HttpProber(config.base_url, config.timeout)


def check_target(config: MonitorConfig,
                 prober: Prober | None = None) -> TargetInfo:
    """Refuse before watching: a base URL must answer its health URL, and
    in-process every URL must match the URLconf. Reads only; raises
    MonitorInputError naming the URL."""
    if config.base_url is None:
        from django.urls import Resolver404, resolve

        for url in config.urls:
            try:
                resolve(urllib.parse.urlsplit(url).path)
            except Resolver404:
                raise MonitorInputError(
                    f'URL {url} matches no URL pattern of this project; '
                    f'check ANTHIAS_ROLLBACK_VERIFY_URLS') from None
        try:
            profile = conf.current_profile().name
        except RollbackError:
            profile = None
        return TargetInfo(IN_PROCESS, profile)
    prober = prober or make_prober(config)
    probe = prober(config.urls[0])
    if probe.status is None:
        raise MonitorInputError(
            f'base URL {config.target} does not answer ({config.urls[0]}: '
            f'{probe.error}); is the app running there?')
    if probe.status == 404:
        raise MonitorInputError(
            f'base URL {config.target} answers 404 for {config.urls[0]}; '
            f'is it this project, with anthias_rollback.urls included?')
    return TargetInfo(config.target, probe.profile)


def probe_round(prober: Prober, urls: tuple[str, ...]) -> tuple[Probe, ...]:
    return tuple(prober(url) for url in urls)
