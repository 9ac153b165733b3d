from django.http import HttpRequest, JsonResponse

from anthias_app.models import Asset


def asset_count(request: HttpRequest) -> JsonResponse:
    return JsonResponse({'count': Asset.objects.count()})
