"""Keep credentials out of text that reaches logs, health reports and the admin."""

from __future__ import annotations

import re

_CREDENTIALS_IN_TEXT = re.compile(r"(\w+://)[^/@\s]+@")


def scrub(text: str) -> str:
    """Remove credentials that an underlying error message may have copied from a URL."""
    return _CREDENTIALS_IN_TEXT.sub(r"\1***@", text)


__all__ = ["scrub"]
