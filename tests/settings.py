"""Settings for the test suite. ``DATABASE_URL`` (django-environ syntax) picks the database."""

from __future__ import annotations

import json
import os
import tempfile

import environ

env = environ.Env()

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "jetstream_bridge",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

_sqlite_dir = os.environ.get("JSB_SQLITE_DIR") or tempfile.gettempdir()
DATABASES = {
    "default": env.db_url(
        "DATABASE_URL", default=f"sqlite:///{os.path.join(_sqlite_dir, 'jsb-tests.sqlite3')}"
    )
}
if DATABASES["default"]["ENGINE"].endswith("mysql"):
    # PyMySQL needs no C headers; Django accepts it in place of mysqlclient.
    import pymysql

    pymysql.install_as_MySQLdb()
    DATABASES["default"].setdefault("OPTIONS", {})["charset"] = "utf8mb4"
    # The server's usual default, which folds case: the bridge's id columns must be exact
    # by their own migration (models.ExactCharField), not by a test database made binary.
    DATABASES["default"]["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_general_ci"}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not :memory:, so worker subprocesses started by tests see the same database.
    DATABASES["default"]["TEST"] = {
        "NAME": os.path.join(_sqlite_dir, f"jsb-test-{os.getpid()}.sqlite3")
    }
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30

JETSTREAM_BRIDGE = {
    "ENV": env.str("NATS_ENV", default="test"),
    "APP_NAME": env.str("APP_NAME", default="alpha"),
    "DESTINATION_APP": env.str("DESTINATION_APP", default="beta"),
    "CONNECT_TIMEOUT": "3s",
}

# Worker subprocesses started by tests receive the test's own overrides (see conftest).
JETSTREAM_BRIDGE.update(json.loads(os.environ.get("JSB_TEST_OVERRIDES", "{}")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"jetstream_bridge": {"handlers": ["console"], "level": "INFO"}},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if os.environ.get("JSB_OTEL_SPANS_FILE"):
    # A worker subprocess of tests/integration/test_otel.py: export its spans to that file.
    from tests.otel_spans import export_to_file

    export_to_file(os.environ["JSB_OTEL_SPANS_FILE"])
