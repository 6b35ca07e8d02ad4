"""One settings module for the three example services; the environment says which one runs.

    APP_NAME=orders   DESTINATION_APP=billing,shipping python manage.py ...
    APP_NAME=billing  DESTINATION_APP=orders           python manage.py ...
    APP_NAME=shipping DESTINATION_APP=orders           python manage.py ...

Each service installs only its own app (its models and its ``jetstream_handlers``) and gets its
own SQLite file (``DATABASE_URL`` overrides it). ``DESTINATION_APP`` is deliberately read from
the environment only, so ``manage.py check`` without it shows the bridge's system check.
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

env = environ.Env()
BASE_DIR = Path(__file__).resolve().parent.parent
SERVICES = ("orders", "billing", "shipping")
SERVICE = env.str("APP_NAME", default="orders")
if SERVICE not in SERVICES:
    raise ImproperlyConfigured(f"APP_NAME must be one of {', '.join(SERVICES)}, not {SERVICE!r}")
DATA_DIR = Path(env.str("DEMO_DATA_DIR", default=str(BASE_DIR / ".data")))

SECRET_KEY = env.str("SECRET_KEY", default="example-only-not-secret")
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "jetstream_bridge",
    SERVICE,
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "example.urls"
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

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / f'{SERVICE}.sqlite3'}")
}

# NATS_URLS, NATS_ENV, APP_NAME and DESTINATION_APP come from the environment.
JETSTREAM_BRIDGE = {
    "MAX_DELIVER": 3,
    "ACK_WAIT": "10s",
    "BACKOFF": ["500ms", "1s", "2s"],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": f"[{SERVICE}] %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"jetstream_bridge": {"handlers": ["console"], "level": "WARNING"}},
}
