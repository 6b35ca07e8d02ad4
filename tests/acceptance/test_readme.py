"""Every command the README shows exists and accepts the options it is shown with.

What each command does is tested where the feature is; this keeps the front door honest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def shell_lines() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    lines: list[str] = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        lines.extend(line.strip() for line in joined.splitlines() if line.strip())
    return lines


def manage_commands() -> dict[str, set[str]]:
    """``"command"`` or ``"command action"`` (for sub-commands) -> the options shown."""
    commands: dict[str, set[str]] = {}
    for line in shell_lines():
        match = re.search(r"manage\.py (\w+)((?: [a-z]+(?= |$))?)(.*)", line.split("#")[0])
        if match:
            name = (match.group(1) + match.group(2)).strip()
            options = set(re.findall(r"(--[a-z][a-z-]*)", match.group(3)))
            commands.setdefault(name, set()).update(options)
    return commands


def test_readme__shows_the_two_commands() -> None:
    lines = shell_lines()
    assert any(line.startswith("make demo") for line in lines)
    assert any(line.startswith("make test") for line in lines)
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "lint", "typecheck"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_readme__ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(("command", "options"), sorted(manage_commands().items()))
def test_readme__manage_command_exists_with_its_options(command: str, options: set[str]) -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDEVMODE", None)
    result = subprocess.run(
        [sys.executable, "-m", "django", *command.split(), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    missing = sorted(option for option in options if option not in result.stdout)
    assert not missing, f"README shows {command} with {missing}, which it does not accept"
