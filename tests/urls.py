from django.urls import path

from settings_profiles.urls import urlpatterns as host_urlpatterns
from tests import monitor_views

urlpatterns = list(host_urlpatterns) + [
    path('monitor-test/flaky', monitor_views.flaky),
]
