"""Regexes a recipe matches tensor keys with (`re:` per-key labels,
`include_keys`, `exclude_keys`), run by RE2: matching takes time linear in
the key's length whatever the pattern, so a recipe cannot make a build hang
(`^([a-z]+)+!$` backtracks for ever in Python's `re`), and groups do not
capture, so none costs more than a plain one. RE2 has no backreferences or
lookaround; such a pattern is refused, as is one longer than
`MAX_PATTERN_CHARS` (keys are a few hundred characters at most). Imports no
torch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import re2

MAX_PATTERN_CHARS = 1_000
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the refusal says what is wrong; RE2 would also log it
_OPTIONS.never_capture = True  # only whether it matches is asked


@dataclass(frozen=True)
class KeyRegex:
    """A checked pattern; equal, hashable and picklable as its text."""

    pattern: str

    def search(self, key: str) -> bool:
        """True when the pattern matches somewhere in `key` (as `re.search`)."""
        return _compiled(self.pattern).search(key) is not None


def key_regex(pattern: str) -> KeyRegex:
    """`pattern` checked; ValueError says why RE2 cannot use it."""
    _compiled(pattern)
    return KeyRegex(pattern)


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re2._Regexp:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"the regex {pattern[:40]!r}... has {len(pattern):,} characters; a key regex has "
            f"at most {MAX_PATTERN_CHARS:,}"
        )
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args else "invalid"
        raise ValueError(
            f"{pattern!r} is not a valid regex ({reason}): key regexes are RE2's, which "
            "match in linear time and have no backreferences or lookaround"
        ) from None
