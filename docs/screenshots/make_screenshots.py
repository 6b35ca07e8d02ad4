"""Regenerate the admin screenshots in this folder (status page, outbox list, dead letters).

Runs the screenshot browser tests against a fresh embedded nats-server and a throwaway SQLite
database; needs Debian's chromium at /usr/bin/chromium and ``pip install -e '.[test]'``::

    python docs/screenshots/make_screenshots.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        env = {
            **os.environ,
            "JSB_SCREENSHOT_DIR": str(HERE),
            "JSB_SQLITE_DIR": scratch,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
        }
        env.pop("DATABASE_URL", None)
        command = [sys.executable, "-m", "pytest", "tests/browser", "-q", "-k", "screenshots"]
        return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
