"""Text that came from a file, made safe to print on a terminal."""

from __future__ import annotations

import re

# Characters that a terminal interprets: C0 and C1 controls, and the bidi overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character escaped (`\\x1b`), so that names and
    metadata from a downloaded file cannot move the cursor, recolour or retitle
    the terminal, or break a one-line message."""
    return _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)
