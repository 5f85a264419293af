"""JSON schemas a request asks the answer to follow, checked before any engine compiles them.

A schema whose `$ref` chain only aliases itself (`{"$ref": "#"}`, or `$defs` that refer to
each other and to nothing else) describes no value: grammar compilers turn it into a rule
that derives only itself (xgrammar: `root ::= root`), which no token can start, and the
request fails inside the engine (a 500) instead of being refused. Recursion that makes
progress (a tree whose `children` are `items` of `{"$ref": "#"}`) describes values and is
accepted.

The walk is iterative, so no schema, however deep, raises RecursionError here. Pure: the
standard library and `server.errors` only, so every route (ssrl's own or the forward to
vLLM's serving layer) can call `check_request_schemas` on the raw body.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from server.errors import APIError

# Keywords whose subschemas the same value must match: a cycle through these alone never
# reaches a value of its own.
_SAME_VALUE_ALL = ("allOf",)
_SAME_VALUE_ANY = ("anyOf", "oneOf")
# Keywords whose subschemas describe a part of the value (or constrain it without producing
# it): recursion through these makes progress. Walked only to find every subschema in use.
_ONE_SUBSCHEMA = (
    "additionalProperties",
    "unevaluatedProperties",
    "propertyNames",
    "items",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
)
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("prefixItems", "items")

NO_VALUE = (
    "is a cycle of references ($ref, allOf, anyOf, oneOf) that never reaches a type, a "
    "property or an item, so it describes no value; a recursive schema must recurse through "
    "properties or items"
)


def resolve_pointer(root: Any, ref: str) -> Any | None:
    """The subschema a local `$ref` ("#" or "#/a/b", RFC 6901) names in `root`; None when it
    is not local or names nothing (the engine reports those in its own words)."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    node = root
    for raw in ref[2:].split("/") if ref != "#" else ():
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _children(node: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every subschema `node` applies but those of _SAME_VALUE_* (pointer segment, subschema);
    `$defs` aside (they are used through `$ref`)."""
    for key in _ONE_SUBSCHEMA:
        if isinstance(node.get(key), dict):
            yield key, node[key]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield f"{key}/{_escape(str(name))}", sub
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield f"{key}/{i}", sub


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


@dataclass
class _Node:
    """A subschema in use, where it was met, and what it needs before it describes a value."""

    # Met under `parent` at `segment`, or (parent None) at `segment` itself: "#" or a `$ref`.
    # The pointer is built only for the answer: a deep schema's pointers would be quadratic.
    parent: int | None
    segment: str
    # Subschemas it is an alias or conjunction of ($ref, allOf): each must describe a value.
    needs_all: list[int] = field(default_factory=list)
    # Groups of alternatives (anyOf, oneOf): one of each group must describe a value.
    needs_any: list[list[int]] = field(default_factory=list)


def _pointer(nodes: dict[int, _Node], n: int) -> str:
    segments = []
    at: int | None = n
    while at is not None:
        segments.append(nodes[at].segment)
        at = nodes[at].parent
    return "/".join(reversed(segments))


def _graph(schema: dict[str, Any]) -> dict[int, _Node]:
    """Every subschema reachable from the root (by id), in the order a reader meets them."""
    nodes: dict[int, _Node] = {}
    queue: deque[dict[str, Any]] = deque()

    def visit(parent: int | None, segment: str, sub: Any) -> int | None:
        if not isinstance(sub, dict):
            return None  # true/false or junk: not a reference cycle (the engine judges it)
        if id(sub) not in nodes:
            nodes[id(sub)] = _Node(parent, segment)
            queue.append(sub)
        return id(sub)

    visit(None, "#", schema)
    while queue:
        node = queue.popleft()
        here = id(node)
        entry = nodes[here]
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = visit(None, ref, resolve_pointer(schema, ref))
            if target is not None:
                entry.needs_all.append(target)
        for key in _SAME_VALUE_ALL:
            members = node.get(key)
            for i, sub in enumerate(members if isinstance(members, list) else ()):
                target = visit(here, f"{key}/{i}", sub)
                if target is not None:
                    entry.needs_all.append(target)
        for key in _SAME_VALUE_ANY:
            members = node.get(key)
            if not isinstance(members, list) or not members:
                continue
            ids = [visit(here, f"{key}/{i}", sub) for i, sub in enumerate(members)]
            # A member that is no object (true) already describes a value: the group is met.
            if all(i is not None for i in ids):
                entry.needs_any.append([i for i in ids if i is not None])
        for segment, sub in _children(node):
            visit(here, segment, sub)
    return nodes


def alias_cycle(schema: Any) -> str | None:
    """The JSON pointer of the first subschema in use that is only a cycle of references
    (it describes no value), else None.

    A least fixpoint over the subschemas: one describes a value when everything it aliases
    or conjoins (`$ref`, `allOf`) does and one alternative of each `anyOf` / `oneOf` does;
    anything else (a type, properties, items, an enum, an empty schema) describes a value.
    Whatever that never reaches is a cycle of pure references.
    """
    if not isinstance(schema, dict):
        return None
    nodes = _graph(schema)
    # Unmet needs per subschema (each `needs_all` entry, and each alternatives group once).
    unmet = {n: len(node.needs_all) + len(node.needs_any) for n, node in nodes.items()}
    waiting: dict[int, list[tuple[int, int | None]]] = {}
    for n, node in nodes.items():
        for target in node.needs_all:
            waiting.setdefault(target, []).append((n, None))
        for g, alternatives in enumerate(node.needs_any):
            for target in alternatives:
                waiting.setdefault(target, []).append((n, g))
    met_groups: set[tuple[int, int]] = set()
    ready = deque(n for n, count in unmet.items() if count == 0)
    describes = set(ready)
    while ready:
        target = ready.popleft()
        for n, group in waiting.get(target, ()):
            if group is not None:
                if (n, group) in met_groups:
                    continue
                met_groups.add((n, group))
            unmet[n] -= 1
            if unmet[n] == 0 and n not in describes:
                describes.add(n)
                ready.append(n)
    return next((_pointer(nodes, n) for n in nodes if n not in describes), None)


def check_schema(schema: Any, param: str) -> None:
    """A 400 naming `param` when `schema` describes no value (a cycle of references)."""
    try:
        pointer = alias_cycle(schema)
    except RecursionError:  # not expected (the walk is iterative): still the client's schema
        raise APIError(
            400, "The JSON schema is nested too deeply.", param=param, code="invalid_value"
        ) from None
    if pointer is not None:
        raise APIError(
            400,
            f"Invalid JSON schema: the subschema at '{pointer}' {NO_VALUE}.",
            param=param,
            code="invalid_value",
        )


def request_schemas(body: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(param, schema) for every JSON schema a chat or Responses request body carries for the
    engine to compile: `response_format.json_schema.schema`, `structured_outputs.json`,
    `text.format.schema` (Responses), and each function tool's parameters."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and isinstance(response_format.get("json_schema"), dict):
        yield "response_format", response_format["json_schema"].get("schema")
    structured = body.get("structured_outputs")
    if isinstance(structured, dict):
        spec = structured.get("json")
        if isinstance(spec, str):  # vLLM also takes the schema as JSON text
            try:
                spec = json.loads(spec)
            except ValueError:
                spec = None  # vLLM reports text that is no JSON
        yield "structured_outputs", spec
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        yield "text.format", text["format"].get("schema")
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("function"), dict):  # chat
            yield f"tools[{i}].function.parameters", tool["function"].get("parameters")
        else:  # Responses: the function's fields are the tool's own
            yield f"tools[{i}].parameters", tool.get("parameters")


def check_request_schemas(body: Mapping[str, Any]) -> None:
    """400 (param `response_format`, `structured_outputs`, `text.format` or the tool's
    `parameters`) for any schema of a chat or Responses request body that describes no value;
    also a 400 for JSON text in `structured_outputs.json` nested too deeply to parse."""
    try:
        schemas = list(request_schemas(body))
    except RecursionError:  # json.loads of `structured_outputs.json`
        raise APIError(
            400, "The JSON schema is nested too deeply.", param="structured_outputs", code="invalid_value"
        ) from None
    for param, schema in schemas:
        check_schema(schema, param)
