"""Turning validation failures into the one-paragraph messages users read."""

from __future__ import annotations

from typing import Any


def format_validation_error(exc: Any, what: str = "config") -> str:
    """A pydantic ValidationError as 'Invalid <what>:' plus one line per problem with its location."""
    lines = [f"Invalid {what}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "")
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown option (check the spelling; `qtoy config` prints every valid key)"
        if err.get("type") == "missing":
            msg = "required option is missing"
        lines.append(f"  {loc}: {msg}{_given(err)}" if loc else f"  {msg}")
    return "\n".join(lines)


def _given(err: dict) -> str:
    if err.get("type") in ("extra_forbidden", "missing") or "input" not in err:
        return ""
    value = err["input"]
    if isinstance(value, (dict, list)) and len(repr(value)) > 60:
        return ""
    return f" (got {value!r})"
