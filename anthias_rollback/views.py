from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from anthias_rollback.health import check_health
from anthias_rollback.report import redact

LOCAL_ADDRESSES = ('127.0.0.1', '::1')
# A reverse proxy on the device (Anthias's nginx) connects from localhost:
# a request it forwarded is remote, whatever REMOTE_ADDR says.
PROXY_HEADERS = ('HTTP_X_FORWARDED_FOR', 'HTTP_X_REAL_IP', 'HTTP_FORWARDED')


def may_see_details(request: HttpRequest) -> bool:
    """Staff, or a caller on this machine that no proxy forwarded."""
    user = getattr(request, 'user', None)
    if user is not None and user.is_authenticated and user.is_staff:
        return True
    meta = request.META
    return (meta.get('REMOTE_ADDR') in LOCAL_ADDRESSES
            and not any(meta.get(h) for h in PROXY_HEADERS))


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """200 with status ok, 503 with status degraded; no secrets.

    Anyone who can reach the device gets `status` and `profile` only;
    problems (paths, host:port) go to staff and local callers.
    """
    report = check_health()
    status = 200 if report.status == 'ok' else 503
    body = (report.as_dict() if may_see_details(request)
            else report.public_dict())
    return JsonResponse(redact(body), status=status)
