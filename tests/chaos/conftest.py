"""Fixtures for the chaos scenarios.

``JSB_CHAOS_SCALE=full`` (``make chaos``) runs the full campaign; without it the same scenarios
run at a reduced scale that fits the default test run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import RESULTS_FILE, Campaign, recorded, summary_line


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.chaos)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not recorded:
        return
    terminalreporter.section("chaos results")
    for figures in recorded:
        terminalreporter.write_line(summary_line(figures))
    terminalreporter.write_line(f"(also written to {RESULTS_FILE.name})")


@pytest.fixture
def campaign(request: Any, settings: Any, tmp_path: Path) -> Iterator[Campaign]:
    """A scenario's own nats-server(s) and workers, killed by PID whatever the outcome."""
    run = Campaign(request.node.name, settings, tmp_path)
    try:
        yield run
    finally:
        run.teardown()
