"""Django settings for the benchmark processes (``DJANGO_SETTINGS_MODULE=benchmarks.settings``).

The harness passes everything through the environment: ``DATABASE_URL`` (PostgreSQL),
``NATS_URLS``, ``NATS_ENV``, ``APP_NAME`` and ``DESTINATION_APP`` (read by the bridge's own
settings fallbacks), and ``BENCH_USE_OUTBOX`` / ``BENCH_FAST_PATH``.
"""

from __future__ import annotations

import environ

env = environ.Env()

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/jsb_bench"

SECRET_KEY = "benchmarks-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "jetstream_bridge",
    "benchmarks",
]
DATABASES = {"default": env.db_url("DATABASE_URL", default=DEFAULT_DATABASE_URL)}
# Long-running workers keep their connection, as a production deployment would configure
# them; with the default of 0 the consumer reconnects once per batch (close_old_connections).
DATABASES["default"]["CONN_MAX_AGE"] = env.int("BENCH_CONN_MAX_AGE", default=600)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

JETSTREAM_BRIDGE = {
    "USE_OUTBOX": env.bool("BENCH_USE_OUTBOX", default=True),
    "OUTBOX_FAST_PATH": env.bool("BENCH_FAST_PATH", default=True),
    "CONNECT_TIMEOUT": "5s",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"jetstream_bridge": {"handlers": ["console"], "level": "WARNING"}},
}
