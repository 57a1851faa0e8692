"""Reading a JSON request body, and writing 422 answers that always encode.

    obj = parse_json_body(raw)            # raises BodyError (a 422) on anything but one clean JSON value
    errors = safe_errors(exc.errors())     # JSON-ready: finite numbers, valid UTF-8, bounded depth

The server reads `/v1/generate`'s body itself rather than through FastAPI's body parameter, so that it
can refuse what `json.loads` silently accepts: a key given twice (the last one would win), and values
nested deeper than any request needs (echoing them back in a 422 would recurse once per level).
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

MAX_DEPTH = 64  # containers inside containers; a valid request nests 2 levels ({"labels": [...]})
MAX_ECHO_CHARS = 200  # a refused string value is echoed back (as FastAPI does) up to this many characters


class BodyError(Exception):
    """The body is not one JSON value this server reads: a list of errors in FastAPI's 422 shape."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors[0]["msg"])
        self.errors = errors


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: a dict, refusing a key given twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def parse_json_body(raw: bytes, content_type: str | None = None) -> Any:
    """One JSON value from a request body (UTF-8, -16 or -32, as json.loads detects), or BodyError.

    Refused: a non-JSON Content-Type, malformed JSON, a key given twice in an object (named in the
    error), and nesting deeper than MAX_DEPTH."""
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            raise BodyError([_error("model_attributes_type", ("body",), "the body must be JSON "
                                    "(Content-Type: application/json)", None)])
    if not raw.strip():
        raise BodyError([_error("missing", ("body",), "Field required", None)])
    try:
        obj = json.loads(raw, object_pairs_hook=_object)
    except _DuplicateKey as e:
        key = sanitize(e.key)
        raise BodyError([_error("duplicate_key", ("body", key), f"key {key!r} is given twice; give each "
                                "field once", None)]) from None
    except json.JSONDecodeError as e:
        raise BodyError([_error("json_invalid", ("body", e.pos), "JSON decode error", {}, {"error": e.msg})]) from None
    except UnicodeDecodeError:
        raise BodyError([_error("json_invalid", ("body",), "JSON decode error", {},
                                {"error": "the body is not UTF-8, UTF-16 or UTF-32"})]) from None
    except RecursionError:  # json's C scanner stops near the interpreter's recursion limit
        raise BodyError([_too_deep()]) from None
    if nesting_depth(obj) > MAX_DEPTH:
        raise BodyError([_too_deep()])
    return obj


def nesting_depth(value: Any) -> int:
    """How many containers (lists, dicts) deep `value` goes; 0 for a scalar. Iterative: any depth."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:  # enough to refuse; no need to walk the rest
            return deepest
        stack.extend((child, depth) for child in v)
    return deepest


def _too_deep() -> dict[str, Any]:
    return _error("too_deep", ("body",), f"JSON nested deeper than {MAX_DEPTH} levels", None)


def _error(kind: str, loc: Sequence[Any], msg: str, value: Any, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    e = {"type": kind, "loc": tuple(loc), "msg": msg, "input": value}
    if ctx is not None:
        e["ctx"] = ctx
    return e


def sanitize(text: str) -> str:
    """`text` as valid UTF-8: a lone surrogate ("\\ud800", which json.loads accepts) becomes the
    6 characters `\\ud800`, so the answer that echoes it can be encoded."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_safe(value: Any, depth: int = 0) -> Any:
    """`value` as plain JSON: non-finite floats as strings ("nan", "inf"), strings valid UTF-8 and cut at
    MAX_ECHO_CHARS, other objects (exceptions in pydantic's ctx) as their str(), and nothing deeper than
    MAX_DEPTH + 2 levels (bodies are capped at MAX_DEPTH before they are validated; the cap here keeps
    the recursion bounded whatever reaches it)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        text = sanitize(value)
        return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."
    if depth > MAX_DEPTH + 2:
        return "..."
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {sanitize(str(k)): json_safe(v, depth + 1) for k, v in value.items()}
    return sanitize(str(value))


def safe_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic / FastAPI validation errors as JSON-ready dicts (type, loc, msg, input, ctx)."""
    out = []
    for e in errors:
        item = {"type": sanitize(str(e.get("type", "value_error"))), "loc": json_safe(list(e.get("loc", ()))),
                "msg": sanitize(str(e.get("msg", ""))), "input": json_safe(e.get("input"))}
        if e.get("ctx"):
            item["ctx"] = json_safe(e["ctx"])
        out.append(item)
    return out
