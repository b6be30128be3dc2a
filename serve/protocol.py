"""Request bodies of /v1/completions and /v1/chat/completions, checked field by field.

`json_body.parse_body` turns raw bytes into a dict (400 for invalid UTF-8, malformed JSON, NaN,
a non-object); `parse_completion` / `parse_chat` check every field's type and range, reject
unknown fields, and return a `Job`. Each error names the field and the accepted values.

Extensions beyond OpenAI's parameters, as vLLM names them (both endpoints):

- `top_k` (-1 disables it);
- `repetition_penalty` (in [1e-30, 1e30], 1 disables it) and `min_p` (in [0, 1], 0 disables it), with
  SamplingParams' semantics; left out, the model's generation_config.json value or neutral;
- `priority` (an integer, accepted and passed along; see serve/app.py for what the
  policies do with it);
- `ignore_eos` (bool): generate past the model's EOS tokens, until `max_tokens` or a stop;
- `stop_token_ids` (at most 64 token ids, each below the vocabulary size): finish with
  "stop" when one is sampled; like EOS, its text is not part of the output (unless
  include_stop_str_in_output);
- `min_tokens` (0 to max_tokens): until that many tokens are out, EOS and `stop_token_ids`
  cannot be sampled and stop strings are not looked for (vLLM's);
- `stream_options.continuous_usage_stats` (with `include_usage`, which is true unless
  `stream_options` says false, as in vLLM): every chunk carries the usage of its choice so far (prompt tokens of that
  choice's prompt, completion tokens so far; 0 on chat's opening role chunk).

Output text (vLLM's, both endpoints; SamplingParams and fastserve_jax/detokenizer.py say
how): `skip_special_tokens` (default true), `spaces_between_special_tokens` (default true),
`include_stop_str_in_output` (default false: a matched stop string is cut from the text).

Chat rendering (vLLM's; fastserve_jax/chat_template.py): `add_generation_prompt` (default
true), `continue_final_message` (default false; both true is a 400, as in vLLM) and
`chat_template_kwargs` (an object of extra template variables, e.g. {"enable_thinking":
false}; keys the renderer sets itself are a 400).

`logit_bias` (OpenAI's): an object mapping token ids (as strings) to numbers, added to those
tokens' logits before sampling, at most MAX_LOGIT_BIAS of them; logprobs stay the model's own.
Each number is clamped to OpenAI's [-100, 100], as vLLM's server does (until 2026-12-07 one
outside was a 400, so clients that ban a token with -1e9 failed here).

`echo` (/v1/completions; chat's is vLLM's, serve/openai_format.py) prepends each choice's prompt (a token-id prompt decoded)
to its text; when streaming, to the first chunk of each choice. With `logprobs` the engine
computes the prompt's logprobs too (SamplingParams.prompt_logprobs) and each choice's
logprobs cover its prompt tokens, then the generated ones (serve/openai_format.py). With
`echo`, `max_tokens` may be 0 (vLLM's): the answer is the prompt alone (Job.prompt_only).

vLLM's prompt and request fields (truncate_prompt_tokens, add_special_tokens, prompt_logprobs,
request_id, bad_words), OpenAI's ignored store, metadata, service_tier and hints, and vLLM's
fields that change nothing here (reasoning_effort, use_beam_search, ...):
serve/protocol_extras.py.

Accepted only at the value that asks for nothing (what clients such as vLLM's benchmark
send by default), rejected otherwise with a 400 naming the field and what is accepted:
`best_of` (equal to n: no candidates are ranked), `response_format` ({"type": "text"}),
`suffix`, and on
chat `tools` ([]), `tool_choice` ("none") and `parallel_tool_calls` (any bool, unused).
Chat messages may be an assistant's with `content: null` (read as "") and
`tool_calls: []`. Any other field is unknown and rejected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from fastserve_jax.chat_template import ChatOptions, ChatTemplateError, check_messages
from fastserve_jax.config import MAX_LOGPROBS
from fastserve_jax.sampling_params import FLOAT32_SAFE, MAX_LOGIT_BIAS

from fastserve_jax.serve.errors import bad_request
from fastserve_jax.serve.protocol_extras import FIELDS as EXTRA_FIELDS, only_empty, parse_extras, unsupported
from fastserve_jax.serve.json_body import (bool_field as _bool, int_field as _int, num_field as _num,
                                           str_field as _str, token_ids, typename as _typename)

MAX_N = 16                # choices per prompt
MAX_STOP = 64             # stop strings per request (vLLM has no bound; 8 until 2026-12-07)
MAX_STOP_TOKEN_IDS = 64   # the engine tests each sampled token against this list
OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16


# The Job fields that are None when a request leaves them out: the model's generation_config.json
# fills them (models/generation_config.SAMPLING_KEYS, not imported: this process may not load flax)
MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")


@dataclass(frozen=True)
class Job:
    """One validated request. prompts: strings or token-id lists (chat: the messages list
    as the only entry, rendered later with the chat template)."""

    chat: bool
    model: str | None
    prompts: list[Any]
    n: int
    max_tokens: int | None          # None: the rest of the context (chat's default)
    temperature: float | None       # None (left out): the model's default, else vLLM's (serve/prepare.py)
    top_p: float | None
    top_k: int | None
    repetition_penalty: float | None    # None: the model's default (serve/prepare.py), else 1
    min_p: float | None
    stop: list[str]
    seed: int | None
    logprobs: int | None            # top alternatives per token, None = no logprobs
    presence_penalty: float
    frequency_penalty: float
    stream: bool
    include_usage: bool
    continuous_usage: bool          # usage on every chunk (needs include_usage)
    priority: int
    user: str | None
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    echo: bool                      # completions: the prompt text before each choice's text
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None      # token id -> bias
    limit_field: str = "max_tokens"  # the field that set max_tokens (chat: max_completion_tokens unless max_tokens)
    prompt_only: bool = False  # max_tokens 0 with echo: one token generated, the prompt alone answered
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    chat_options: ChatOptions = ChatOptions()    # chat: how the messages are rendered
    # serve/protocol_extras.py's fields
    truncate_prompt_tokens: int | None = None   # keep the prompt's last k tokens (-1: what the context holds)
    add_special_tokens: bool | None = None      # None: the endpoint's default
    prompt_logprobs: int | None = None
    request_id: str | None = None               # the response id's suffix
    bad_words: tuple[str, ...] | None = None    # SamplingParams.bad_words
    allowed_token_ids: tuple[int, ...] | None = None   # SamplingParams.allowed_token_ids
    cache_salt: str | None = None               # SamplingParams.cache_salt
    tokens_as_ids: bool = False                 # return_tokens_as_token_ids
    return_token_ids: bool = False
    ignored: tuple[str, ...] = ()               # fields accepted and ignored (protocol_extras.IGNORED)

    @property
    def computed_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token the engine computes (vLLM's): prompt_logprobs', else
        with echo the logprobs' (chat: top_logprobs', 0 by default), returned beside the answer
        (a completion's choices, a chat response) and a completion's echo logprobs hold them.
        A chat stream carries none, so none are computed there."""
        if self.prompt_logprobs is not None or not self.echo:
            return self.prompt_logprobs
        if self.chat:
            return None if self.stream else (self.logprobs or 0)
        return self.logprobs


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


def _stop_token_ids(body: dict) -> tuple[int, ...]:
    v = body.get("stop_token_ids")
    if v is None:
        return ()
    v = token_ids(v, 0)
    if v is None:
        raise bad_request("'stop_token_ids' must be an array of token ids (integers >= 0)", "stop_token_ids")
    if len(v) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"'stop_token_ids' has {len(v)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                          "stop_token_ids")
    return tuple(v)


def _logit_bias(body: dict) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    what = "an object mapping token ids (strings of digits, as \"50256\") to numbers"
    if not isinstance(v, dict):
        raise bad_request(f"'logit_bias' must be {what}, got {_typename(v)}", "logit_bias")
    out = {}
    for k, b in v.items():
        if not (k.isascii() and k.isdigit()) or isinstance(b, bool) or not isinstance(b, (int, float)) or b != b:
            raise bad_request(f"'logit_bias' must be {what}; got {k!r}: {b!r}", "logit_bias")
        k = k.lstrip("0") or "0"          # int() refuses 4,300 digits or more
        if len(k) > 18:
            raise bad_request(f"'logit_bias' names a token id of {len(k)} digits, past any vocabulary", "logit_bias")
        out[int(k)] = float(min(100, max(-100, b)))     # vLLM's clamp (SamplingParams.from_optional)
    if len(out) > MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' names {len(out)} tokens; at most {MAX_LOGIT_BIAS} are allowed", "logit_bias")
    return out or None


def _repetition_penalty(body: dict) -> float | None:
    v = _num(body, "repetition_penalty", None, -math.inf, math.inf)
    lo, hi = FLOAT32_SAFE          # SamplingParams' range: 1e-300 is 0 in float32, 1e300 inf
    if v is not None and not lo <= v <= hi:
        raise bad_request(f"'repetition_penalty' must be a number in [{lo:g}, {hi:g}] (1 disables it), got {v}",
                          "repetition_penalty")
    return v


_STREAM_OPTIONS = ("include_usage", "continuous_usage_stats", "include_obfuscation")    # the last: OpenAI's, unused


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous usage), as vLLM reads them: include_usage is true unless it says
    false once stream_options is sent (until 2026-12-07 false, so `{"continuous_usage_stats": true}`
    sent no usage at all), continuous_usage_stats needs it, and an empty object asks for nothing,
    streamed or not."""
    opts = body.get("stream_options")
    if opts is None or opts == {}:
        return stream and opts is not None, False
    if not stream:
        raise bad_request("'stream_options' is only allowed with \"stream\": true", "stream_options")
    if not isinstance(opts, dict) or set(opts) - set(_STREAM_OPTIONS):
        raise bad_request(f"'stream_options' must be an object with the keys {list(_STREAM_OPTIONS)} (booleans)",
                          "stream_options")
    _bool(opts, "include_obfuscation", False)       # type-checked; chunks are never padded here
    # null is no usage, as vLLM reads `bool(include_usage)` (it was the default, true, until 2026-12-07)
    include = _bool(opts, "include_usage", False) if "include_usage" in opts else True
    continuous = _bool(opts, "continuous_usage_stats", False)
    return include, include and continuous


def _defaults_only(body: dict, n: int) -> None:
    """The fields accepted only at the value that asks for nothing (module docstring)."""
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise unsupported("best_of", f"best_of={best_of} with n={n}; this server returns n samples and does not "
                                      "generate extra candidates to rank, so send best_of equal to n or leave it out")
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_object", "json_schema"):
        raise unsupported("response_format", f"type {kind!r}: structured (JSON) output is not supported; send "
                                              "{\"type\": \"text\"} or leave it out")
    if fmt is not None and (not isinstance(fmt, dict) or {k: v for k, v in fmt.items() if v is not None}
                            != {"type": "text"}):      # json_schema: null beside it is vLLM's too
        raise bad_request("'response_format' must be {\"type\": \"text\"} (the only format this server produces)",
                          "response_format")


def check_fields(body: dict, allowed: frozenset[str], endpoint: str, required: str) -> None:
    unknown = sorted(k for k in set(body) - allowed if body[k] is not None)     # null: left out, as every field
    if unknown:
        raise bad_request(f"unknown or unsupported field(s) {unknown} for {endpoint}; supported fields are "
                          f"{sorted(allowed)}", unknown[0])
    if body.get(required) is None:
        raise bad_request(f"'{required}' is required", required)


_COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                     "frequency_penalty", "user", "stream", "stream_options", "top_k", "priority", "logprobs",
                     "ignore_eos", "stop_token_ids", "min_tokens", "best_of", "logit_bias", "response_format",
                     "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
                     "repetition_penalty", "min_p"}) | EXTRA_FIELDS
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "echo", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls", "add_generation_prompt", "continue_final_message",
                         "chat_template_kwargs"}


def _common(body: dict, chat: bool, prompts: list[Any], max_tokens: int | None, logprobs: int | None,
            echo: bool = False, max_logprobs: int = MAX_LOGPROBS) -> Job:
    stream = _bool(body, "stream", False)
    n = _int(body, "n", 1, 1, MAX_N)
    _defaults_only(body, n)
    include_usage, continuous_usage = _stream_options(body, stream)
    return Job(
        chat=chat, model=_str(body, "model"), prompts=prompts, n=n,
        max_tokens=max_tokens, temperature=_num(body, "temperature", None, 0.0, 2.0),
        top_p=_num(body, "top_p", None, 0.0, 1.0, lo_open=True), top_k=_int(body, "top_k", None, -1),
        repetition_penalty=_repetition_penalty(body),
        min_p=_num(body, "min_p", None, 0.0, 1.0),
        stop=_stop(body), seed=_int(body, "seed", None, -2 ** 63, 2 ** 64 - 1), logprobs=logprobs,
        presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stream=stream, include_usage=include_usage, continuous_usage=continuous_usage,
        priority=_int(body, "priority", 0), user=_str(body, "user"), ignore_eos=_bool(body, "ignore_eos", False),
        stop_token_ids=_stop_token_ids(body), echo=echo, min_tokens=_int(body, "min_tokens", 0, 0),
        logit_bias=_logit_bias(body), skip_special_tokens=_bool(body, "skip_special_tokens", True),
        spaces_between_special_tokens=_bool(body, "spaces_between_special_tokens", True),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        **parse_extras(body, stream, max_logprobs))


def _prompts(v: Any) -> list[Any]:
    """A string, an array of strings, an array of token ids, or an array of those arrays."""
    nonempty = isinstance(v, list) and bool(v)
    if isinstance(v, str):
        out = [v]
    elif nonempty and (one := token_ids(v)) is not None:
        out = [one]
    elif nonempty and all(isinstance(p, str) for p in v):
        out = list(v)
    elif nonempty and None not in (many := [token_ids(p) if p else None for p in v]):
        out = many
    else:
        raise bad_request("'prompt' must be a string, an array of strings, an array of token ids (integers), "
                          "or an array of such arrays, and not empty", "prompt")
    return out                  # "" is a prompt where the tokenizer adds BOS (vLLM's; admission.py)


def _logprobs_field(body: dict, name: str, limit: int) -> int | None:
    """A count of logprobs per token, at most `limit` (the server's --max-logprobs)."""
    v = _int(body, name, None, 0)
    if v is not None and v > limit:
        raise bad_request(f"'{name}' is {v}, more than this server allows: at most {limit} (--max-logprobs)", name)
    return v


def parse_completion(body: dict, max_logprobs: int = MAX_LOGPROBS) -> Job:
    """max_logprobs: the most logprobs a request may ask (the server's --max-logprobs)."""
    check_fields(body, COMPLETION_FIELDS, "/v1/completions", "prompt")
    echo = _bool(body, "echo", False)
    # left out: OpenAI's 16; an explicit null: the rest of the context, as vLLM reads it
    max_tokens = _int(body, "max_tokens", None if "max_tokens" in body else OPENAI_COMPLETION_DEFAULT_MAX_TOKENS,
                      0 if echo else 1)
    logprobs = _logprobs_field(body, "logprobs", max_logprobs)
    if body.get("suffix") is not None:
        raise unsupported("suffix", "text after the insertion point is not supported; leave it out")
    if max_tokens == 0 and _int(body, "min_tokens", 0, 0):
        raise bad_request("'min_tokens' must be 0 with 'max_tokens' 0 (echo of the prompt alone)", "min_tokens")
    job = _common(body, False, _prompts(body["prompt"]), 1 if max_tokens == 0 else max_tokens, logprobs, echo,
                  max_logprobs)
    return replace(job, prompt_only=max_tokens == 0)


def parse_messages(v: Any) -> list[dict]:
    """chat_template.check_messages, its ValueError a 400 naming `messages`."""
    try:
        return check_messages(v)
    except ValueError as e:
        raise bad_request(str(e), "messages") from None


def parse_chat(body: dict, max_logprobs: int = MAX_LOGPROBS, content_format: str = "auto") -> Job:
    check_fields(body, CHAT_FIELDS, "/v1/chat/completions", "messages")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    top = _logprobs_field(body, "top_logprobs", max_logprobs)
    want = _bool(body, "logprobs", False)
    if top and not want:            # 0 without logprobs asks for nothing, as vLLM reads it
        raise bad_request("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    no_tools(body)
    options = parse_chat_options(body, content_format)
    job = _common(body, True, [parse_messages(body["messages"])], max_tokens, (top or 0) if want else None,
                  _bool(body, "echo", False), max_logprobs)
    named = body.get("max_completion_tokens") is not None or body.get("max_tokens") is None   # the newer name
    return replace(job, chat_options=options, limit_field="max_completion_tokens" if named else job.limit_field)


def parse_chat_options(body: dict, content_format: str = "auto") -> ChatOptions:
    """The request's chat fields; `content_format` is the server's --chat-template-content-format."""
    try:
        return ChatOptions(_bool(body, "add_generation_prompt", True), _bool(body, "continue_final_message", False),
                           body.get("chat_template_kwargs"), content_format, [] if body.get("tools") == [] else None)
    except ChatTemplateError as e:
        raise bad_request(str(e), e.param)


def no_tools(body: dict) -> None:
    """Chat's tool fields, accepted only when they ask for no tools."""
    if body.get("tool_choice") == "required" and body.get("tools") == []:
        body["tool_choice"] = "none"        # OpenAI's and vLLM's: no tools to require, and tools dropped
        del body["tools"]
    only_empty(body, "tools", list, "this server has no tool (function) calling")
    choice = body.get("tool_choice")
    if choice is not None and choice != "none":
        raise unsupported("tool_choice", f"got {json.dumps(choice)}; with no tools only \"none\" or null is "
                                          "accepted")
    _bool(body, "parallel_tool_calls", False)    # type-checked; unused without tools
