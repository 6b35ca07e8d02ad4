"""``path("health/jetstream/", include("jetstream_bridge.urls"))`` serves the health view."""

from __future__ import annotations

from django.urls import path

from .views import HealthView

app_name = "jetstream_bridge"

urlpatterns = [path("", HealthView.as_view(), name="health")]
