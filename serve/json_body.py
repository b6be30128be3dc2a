"""A request body as JSON, and its fields read one by one: each reader takes the body, the
field's name and its default (a field sent as null reads as left out), and raises the 400
that names the field and what it accepts (serve/errors.py). serve/protocol.py says which
fields each endpoint takes."""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from fastserve_jax.serve.errors import bad_request


def parse_body(raw: bytes) -> dict:
    # UTF-8 (a BOM first, Notepad's or PowerShell's, dropped), or UTF-16 or UTF-32 as json.loads(bytes),
    # which vLLM's FastAPI reads the body with, tells them apart; strict, so no encoded surrogate
    encoding = json.detect_encoding(raw)
    try:
        text = raw.decode("utf-8-sig" if encoding.startswith("utf-8") else encoding)
    except UnicodeDecodeError as e:
        named = "UTF-8" if encoding.startswith("utf-8") else encoding.upper()
        raise bad_request(f"the request body is not valid {named} (byte {e.start}); send JSON encoded as UTF-8")
    try:
        body = json.loads(text, parse_constant=_reject_constant, parse_int=_int_literal)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except ValueError as e:      # NaN/Infinity
        raise bad_request(f"the request body is not acceptable JSON: {e}")
    except RecursionError:
        raise bad_request("the request body nests arrays or objects too deeply; flatten it")
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {typename(body)}")
    if _ESCAPED_SURROGATE.search(text) and _has_lone_surrogate(body):
        raise bad_request("the request body has an unpaired UTF-16 surrogate escape (\\ud800-\\udfff without its "
                          "other half: no Unicode character); send text as UTF-8 or escape both halves of a pair")
    return body


def _int_literal(text: str) -> int | float:
    """An integer literal; one past Python's digit limit for reading (4,300) reads as an infinite
    number, which the field's check refuses by name, as it refuses 1e400 (the body's error was
    Python's advice to raise the limit, naming no field)."""
    if len(text.lstrip("-")) <= (sys.get_int_max_str_digits() or len(text)):         # 0: no limit
        return int(text)
    return -math.inf if text.startswith("-") else math.inf


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send finite numbers")


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")    # valid UTF-8 holds none unescaped
_SURROGATE = re.compile("[\ud800-\udfff]")    # what json.loads leaves of an escape without its pair


def _has_lone_surrogate(body: dict) -> bool:
    """Whether a key or string anywhere in `body` holds half a surrogate pair (no tokenizer, and
    no UTF-8 writer of an error naming it, takes one); iterative, as bodies nest deeply."""
    stack: list[Any] = [body]
    while stack:
        v = stack.pop()
        if isinstance(v, str) and _SURROGATE.search(v):
            return True
        if isinstance(v, dict):
            stack += [*v, *v.values()]
        elif isinstance(v, list):
            stack += v
    return False


def typename(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def shown(v) -> str:
    """A value for an error message, cut at 40 characters (an integer may have thousands of digits)."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _finite(v: int | float) -> bool:
    """math.isfinite, False for an integer too large to be a float (isfinite raised OverflowError:
    a 500 for a 309-digit `temperature`)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def token_ids(v, lo: int | None = None) -> list[int] | None:
    """v as a list of token ids (integers >= lo), or None where it is not one; 5.0 is 5, as
    int_field takes it (vLLM's lax parsing of list[int]; until 2026-12-07 such lists were 400s)."""
    if not isinstance(v, list):
        return None
    out = [int(t) if isinstance(t, float) and t.is_integer() else t for t in v]
    if all(isinstance(t, int) and not isinstance(t, bool) and (lo is None or t >= lo) for t in out):
        return out
    return None


def int_field(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and math.isinf(v):       # 1e400, or an integer of more digits than Python reads
        raise bad_request(f"'{name}' must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], "
                          "got a number too large to read", name)
    if isinstance(v, float) and v.is_integer():      # 5.0 is 5, as vLLM's (pydantic's lax) parsing takes it
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"'{name}' must be an integer, got {typename(v)} {shown(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad_request(f"'{name}' must be in [{lo if lo is not None else '-inf'}, "
                          f"{hi if hi is not None else 'inf'}], got {shown(v)}", name)
    return v


def num_field(body: dict, name: str, default: float | None, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad_request(f"'{name}' must be a number, got {typename(v)} {shown(v)}", name)
    if not _finite(v):
        raise bad_request(f"'{name}' must be a finite number, got {shown(v)}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad_request(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {shown(v)}", name)
    return float(v)


def bool_field(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be true or false, got {typename(v)} {v!r}", name)
    return v


def str_field(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad_request(f"'{name}' must be a string, got {typename(v)}", name)
    return v
