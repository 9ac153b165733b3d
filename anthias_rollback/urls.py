from django.urls import path

from anthias_rollback import views

app_name = 'anthias_rollback'
urlpatterns = [
    path('health', views.health, name='health'),
]
