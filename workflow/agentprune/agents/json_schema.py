"""Walking a pydantic JSON schema: following ``$ref``, unwrapping nullable ``anyOf``, and
describing fields in one line each for a prompt.

Both the prompt builder (:mod:`agentprune.agents.base`) and the skeleton decoder
(:mod:`agentprune.agents.skeleton`) read schemas the same way, so the walk lives here.
"""

from __future__ import annotations

import json
from typing import Any


def resolve_node(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A schema node with ``$ref`` followed and a nullable ``anyOf`` unwrapped."""
    nullable = False
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        node = {**options[0], **{k: v for k, v in node.items() if k != "anyOf"}}
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node, nullable


def _kind(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """The type of a schema node in words: ``"a"|"b"``, ``integer``, ``list of ...`` (ranges are
    in the descriptions, with the run's own limits)."""
    if "enum" in node:
        return "|".join(json.dumps(v) for v in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    kind = node.get("type", "value")
    if kind == "array":
        item, _ = resolve_node(node.get("items", {}), defs)
        limit = f" (at most {node['maxItems']})" if "maxItems" in node else ""
        return f"list{limit} of {_kind(item, defs)}"
    return str(kind)


def describe_schema(schema: dict[str, Any], indent: str = "") -> list[str]:
    """One line per field of a JSON schema (nested objects indented): name, type or enum,
    description.

    Args:
        schema: a pydantic ``model_json_schema()`` (with ``$defs``) or one of its objects.
        indent: prefix of every line (nesting).

    Returns:
        Lines like ``- grouping ("isomorphic"|"global"|"uniform"): rank ...``.
    """
    defs = schema.get("$defs", {})
    return _describe(schema, defs, indent)


def _describe(schema: dict[str, Any], defs: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for name, raw in schema.get("properties", {}).items():
        node, nullable = resolve_node(raw, defs)
        description = raw.get("description") or node.get("description") or ""
        if node.get("type") == "object" or "properties" in node:
            kind = "object or null" if nullable else "object"
            lines.append(f"{indent}- {name} ({kind}): {description}".rstrip(": "))
            lines.extend(_describe(node, defs, indent + "  "))
            continue
        kind = _kind(node, defs) + (" or null" if nullable else "")
        lines.append(f"{indent}- {name} ({kind}): {description}".rstrip(": "))
    return lines
