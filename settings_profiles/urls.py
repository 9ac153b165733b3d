from django.contrib import admin
from django.urls import include, path

from anthias_app import views

urlpatterns = [
    path('admin/', admin.site.urls),
    path('api/v1/assets/count', views.asset_count),
    path('', include('anthias_rollback.urls')),
]
