"""Regenerate admin-status.png and admin-outbox.png in this folder.

Runs the screenshot browser test against a fresh embedded nats-server and a throwaway SQLite
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
        test = "tests/browser/test_admin_browser.py"
        command = [sys.executable, "-m", "pytest", test, "-q", "-k", "screenshots"]
        return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
