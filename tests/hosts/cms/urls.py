# The adoption blocks below are verbatim, with their `noqa: E402`
# (E402 is not enabled here, which RUF100 would flag).
# ruff: noqa: RUF100
"""The CMS host's URLs: wagtail's pages, and the README's adoption block
for `GET /health` (before wagtail's catch-all page route)."""
from wagtail import urls as wagtail_urls

urlpatterns = []

# --- the adoption block (docs: "adoption: urls.py"), verbatim -----------
from django.urls import include, path  # noqa: E402

urlpatterns += [path('', include('anthias_rollback.urls'))]

urlpatterns += [path('', include(wagtail_urls))]
