"""One error type for bad input: it names the file, the column and example rows."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import zip_longest
from typing import Any


class DataValidationError(ValueError):
    """A dataset breaks the contract. ``str()`` is the one message a user needs."""

    def __init__(
        self,
        file: str,
        column: str | None = None,
        message: str = "",
        rows: Sequence[int] | None = None,
        examples: Sequence[Any] | None = None,
        count: int | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.rows = list(rows or [])
        self.examples = list(examples or [])
        self.count = count
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file + (f", column '{self.column}'" if self.column else "")
        text = f"{where}: {' '.join(str(self.message).splitlines())}"  # always one line
        if self.count is not None:
            text += f" ({self.count} row(s))"
        if self.rows:
            shown = ", ".join(
                f"row {r}" + ("" if e is None else f" ({e})")
                for r, e in zip_longest(self.rows, self.examples[: len(self.rows)])
            )
            text += f"; e.g. {shown}"
        return text


def describe(exc: BaseException, limit: int = 300) -> str:
    """One line saying what went wrong in ``exc``, without traceback text.

    Errors raised inside Ray tasks carry the remote traceback in their text; the last unindented
    line of it is the underlying error (``ArrowInvalid: ...``).
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    lines = [ln.rstrip() for ln in str(exc).splitlines() if ln.strip()]
    body = [ln for ln in lines if not ln[:1].isspace() and not ln.startswith("Traceback")]
    text = (body or lines or [type(exc).__name__])[-1]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
