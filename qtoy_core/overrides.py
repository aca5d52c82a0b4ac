"""`--set key=value` overrides on nested config dicts (no torch)."""

from __future__ import annotations

import json
from typing import Any

from qtoy_registry import QtoyError


class OverrideError(QtoyError, ValueError):
    pass


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, null, lists, dicts), the plain string otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `a.b.c=value` assignments to a nested dict (a copy). A component given by a bare name
    ("attention": "quadratic") becomes {"name": "quadratic"} when one of its options is set."""
    out = json.loads(json.dumps(data))
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OverrideError(f"--set {item!r} is not key=value: write e.g. --set d_model=128 or "
                                f"--set attention.impl=plain")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            if isinstance(child, str):
                child = {"name": child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise OverrideError(f"--set {item!r}: {part!r} is a value ({child!r}), not a section with options")
            node[part] = child
            node = child
        node[leaf] = parse_value(raw)
    return out
