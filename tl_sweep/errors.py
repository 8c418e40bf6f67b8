"""The one exception type that means "the user can fix this".

Everything the user can get wrong (spec, data, weights, tracking URI, cluster address) raises
:class:`UserError` with a message that says what is wrong, where, and how to fix it. The CLI prints
that message as one line on stderr and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""

    exit_code = 2


def one_line(text: str, limit: int = 200) -> str:
    """The first line of an error message, without terminal colour codes (Ray colours its workers' output)."""
    import re

    return (re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines() or [""])[0][:limit]
