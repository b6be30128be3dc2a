"""Request bodies of /v1/completions and /v1/chat/completions, checked field by field.

`parse_body` turns raw bytes into a dict (400 for invalid UTF-8, malformed JSON, NaN, a
non-object); `parse_completion` / `parse_chat` check every field's type and range, reject
unknown fields, and return a `Job`. Each error names the field and the accepted values.

Extensions beyond OpenAI's parameters: `top_k` (-1 disables it) and `priority` (an
integer, accepted and passed along; see serve/app.py for what the policies do with it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastserve_jax.config import MAX_LOGPROBS

from fastserve_jax.serve.errors import bad_request

MAX_N = 16                # choices per prompt
MAX_STOP = 8              # stop strings per request
OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Job:
    """One validated request. prompts: strings or token-id lists (chat: the messages list
    as the only entry, rendered later with the tokenizer's template)."""

    chat: bool
    model: str | None
    prompts: list[Any]
    n: int
    max_tokens: int | None          # None: the rest of the context (chat's default)
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    logprobs: int | None            # top alternatives per token, None = no logprobs
    presence_penalty: float
    frequency_penalty: float
    stream: bool
    include_usage: bool
    priority: int
    user: str | None


def parse_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except ValueError as e:      # NaN/Infinity, or an integer literal past Python's digit limit
        raise bad_request(f"the request body is not acceptable JSON: {e}")
    except RecursionError:
        raise bad_request("the request body nests arrays or objects too deeply; flatten it")
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; send finite numbers")


# -- field checks -------------------------------------------------------------------------

def _typename(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"'{name}' must be an integer, got {_typename(v)} {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad_request(f"'{name}' must be in [{lo if lo is not None else '-inf'}, "
                          f"{hi if hi is not None else 'inf'}], got {v}", name)
    return v


def _num(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise bad_request(f"'{name}' must be a number, got {_typename(v)} {v!r}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad_request(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be true or false, got {_typename(v)} {v!r}", name)
    return v


def _str(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise bad_request(f"'{name}' must be a string, got {_typename(v)}", name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or an array of them", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' has {len(stops)} strings; at most {MAX_STOP} are allowed", "stop")
    return stops


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise bad_request("'stream_options' is only allowed with \"stream\": true", "stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise bad_request("'stream_options' must be an object with the one key 'include_usage'", "stream_options")
    return _bool(opts, "include_usage", False)


def _check_fields(body: dict, allowed: frozenset[str], endpoint: str, required: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(f"unknown or unsupported field(s) {unknown} for {endpoint}; supported fields are "
                          f"{sorted(allowed)}", unknown[0])
    if required not in body:
        raise bad_request(f"'{required}' is required", required)


_COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                     "frequency_penalty", "user", "stream", "stream_options", "top_k", "priority", "logprobs"})
COMPLETION_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}


def _common(body: dict, chat: bool, prompts: list[Any], max_tokens: int | None, logprobs: int | None) -> Job:
    stream = _bool(body, "stream", False)
    return Job(
        chat=chat, model=_str(body, "model"), prompts=prompts, n=_int(body, "n", 1, 1, MAX_N),
        max_tokens=max_tokens, temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_int(body, "top_k", -1, -1),
        stop=_stop(body), seed=_int(body, "seed", None, -2 ** 63, 2 ** 64 - 1), logprobs=logprobs,
        presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stream=stream, include_usage=_stream_options(body, stream), priority=_int(body, "priority", 0),
        user=_str(body, "user"))


def _prompts(v: Any) -> list[Any]:
    """A string, an array of strings, an array of token ids, or an array of those arrays."""
    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(v, str):
        out = [v]
    elif ids(v):
        out = [v]
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        out = list(v)
    elif isinstance(v, list) and v and all(ids(p) for p in v):
        out = list(v)
    else:
        raise bad_request("'prompt' must be a string, an array of strings, an array of token ids (integers), "
                          "or an array of such arrays, and not empty", "prompt")
    if any(p == "" for p in out):
        raise bad_request("'prompt' contains an empty string; give at least one character", "prompt")
    return out


def parse_completion(body: dict) -> Job:
    _check_fields(body, COMPLETION_FIELDS, "/v1/completions", "prompt")
    max_tokens = _int(body, "max_tokens", OPENAI_COMPLETION_DEFAULT_MAX_TOKENS, 1)
    return _common(body, False, _prompts(body["prompt"]), max_tokens, _int(body, "logprobs", None, 0, MAX_LOGPROBS))


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(v: Any) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad_request("'messages' must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise bad_request(f"messages[{i}] must be an object with 'role' one of {list(_ROLES)}", "messages")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad_request(f"messages[{i}] has unsupported field(s) {extra}; use 'role', 'content', 'name'",
                              "messages")
        content = m.get("content")
        if isinstance(content, list):   # content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}; "
                                  "this server accepts text only", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or an array of text parts", "messages")
        msg = {"role": m["role"], "content": content}
        if m.get("name") is not None:
            msg["name"] = _str(m, "name")
        out.append(msg)
    return out


def parse_chat(body: dict) -> Job:
    _check_fields(body, CHAT_FIELDS, "/v1/chat/completions", "messages")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    want = _bool(body, "logprobs", False)
    if top is not None and not want:
        raise bad_request("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    return _common(body, True, [_messages(body["messages"])], max_tokens, (top or 0) if want else None)
