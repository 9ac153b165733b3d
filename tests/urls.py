from settings_profiles.urls import urlpatterns as host_urlpatterns

urlpatterns = list(host_urlpatterns)
