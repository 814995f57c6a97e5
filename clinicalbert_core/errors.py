"""Exceptions in one line, for logs, reports and CLI errors (never a traceback, never a note)."""

from __future__ import annotations


def message_line(e: BaseException, *, last: bool = False, limit: int = 300) -> str:
    """The first line of `e`'s message (`last=True`: the line that ends a remote traceback,
    `ValueError: ...`), cut at `limit` characters; "" when the message is empty."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if last else lines[0])[:limit] if lines else ""


def describe(e: BaseException) -> str:
    """`Type: first line`, or `Type` alone when the message is empty."""
    line = message_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
