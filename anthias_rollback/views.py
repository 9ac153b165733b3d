from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from anthias_rollback.health import check_health
from anthias_rollback.report import redact


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """200 with status ok, 503 with status degraded; no secrets."""
    report = check_health()
    status = 200 if report.status == 'ok' else 503
    return JsonResponse(redact(report.as_dict()), status=status)
