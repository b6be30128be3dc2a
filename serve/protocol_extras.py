"""vLLM's request fields about the prompt and the request itself, on both endpoints (read by
serve/protocol.py into the Job):

- `truncate_prompt_tokens` (-1 or >= 1): keep the prompt's last k tokens; -1 keeps what the
  context holds next to max_tokens (serve/prepare.py);
- `add_special_tokens` (bool): encode a text prompt with the tokenizer's special tokens (BOS);
  completions default true; chat left out adds BOS unless the template wrote it, false never,
  true always (vLLM's chat default is false: serve/tokenize.py says why ours differs);
- `prompt_logprobs` (0 to --max-logprobs; not with "stream": true unless 0, as in vLLM): each
  choice's `prompt_logprobs` (completions) or the response's (chat): null for the first prompt
  token, then per token {token id: {logprob, rank, decoded_token}} (serve/openai_format.py);
- `request_id` (a string): the response's id is "cmpl-" / "chatcmpl-" and it (vLLM's); an
  X-Request-Id header wins over it, as in vLLM (`header_request_id`);
- `bad_words` (an array of strings, each with a character other than whitespace; null or []:
  none): SamplingParams.bad_words, tokenized and checked against the sampler's bias slots in
  serve/prepare.py;
- `allowed_token_ids` (a non-empty array of token ids, at most BIAS_SLOTS distinct; null: every
  token): SamplingParams.allowed_token_ids, its ids checked against the vocabulary in
  serve/prepare.py;
- `cache_salt` (a non-empty string): SamplingParams.cache_salt, the request shares prefix-cache
  blocks only with requests of the same salt (accepted, and of no effect, without
  --enable-prefix-caching);
- `return_tokens_as_token_ids` (bool): logprobs name each token "token_id:<id>" (vLLM's, for
  tokens whose text is not JSON-safe, such as a character's first byte);
- `return_token_ids` (bool): vLLM's `prompt_token_ids` and `token_ids` in the response
  (completions: on each choice; chat: `prompt_token_ids` on the response); streamed, the
  prompt's ids in each choice's first chunk and each chunk's new token ids;
- OpenAI's `store`, `metadata` and `service_tier`, and its hints `prompt_cache_key` (a string
  that groups requests for cache hits), `safety_identifier` (a string naming the end user)
  and `prediction` (predicted output, {"type": "content", "content": a string or text parts},
  which may speed a response up but never changes it): type-checked and ignored (vLLM ignores
  them, with a warning in its log, as we do);
- vLLM's fields that change nothing here, type-checked: `reasoning_effort` (one of
  REASONING_EFFORTS; vLLM reads it only for gpt-oss), `include_reasoning` (no reasoning
  parser: the text is as the model writes it), `length_penalty` (beam search's) and
  `vllm_xargs` (an object of strings, numbers or lists of them, for custom extensions:
  there are none), ignored with a warning in the log; `use_beam_search` (false),
  `logits_processors` ([]), `mm_processor_kwargs` and `kv_transfer_params` ({}) and OpenAI's
  `modalities` (["text"]) only at the value that asks for nothing (until 2026-12-07 each was
  an unknown field, a 400 at any value: LangChain's and LiteLLM's `reasoning_effort` option
  failed).
"""

from __future__ import annotations

from fastserve_jax.sampling_params import BIAS_SLOTS
from fastserve_jax.serve.errors import APIError, bad_request
from fastserve_jax.serve.json_body import bool_field, int_field, num_field, str_field, token_ids, typename

IGNORED = ("store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "prediction",
           "reasoning_effort", "include_reasoning", "length_penalty", "vllm_xargs")
INERT = ("use_beam_search", "logits_processors", "mm_processor_kwargs", "kv_transfer_params", "modalities")
FIELDS = frozenset({"truncate_prompt_tokens", "add_special_tokens", "prompt_logprobs", "request_id", "bad_words",
                    "allowed_token_ids", "cache_salt", "return_tokens_as_token_ids", "return_token_ids", *IGNORED,
                    *INERT})
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")     # OpenAI's; vLLM's are three of them
PREDICTION_SHAPE = '{"type": "content", "content": a string or text parts}'
MAX_REQUEST_ID = 256      # characters; it is written into every response and log line


def _request_id_ok(text: str) -> bool:
    """A request id the body's field or the X-Request-Id header may carry."""
    return 0 < len(text) <= MAX_REQUEST_ID and text.isprintable()


def parse_extras(body: dict, stream: bool, max_logprobs: int) -> dict:
    """The Job fields of these request fields."""
    truncate = int_field(body, "truncate_prompt_tokens", None, -1)
    if truncate == 0:
        raise bad_request("'truncate_prompt_tokens' must be -1 (what the context holds) or >= 1 (the prompt's last "
                          "that many tokens), got 0", "truncate_prompt_tokens")
    prompt_logprobs = int_field(body, "prompt_logprobs", None)
    if prompt_logprobs is not None:
        if prompt_logprobs < 0:
            raise bad_request(f"'prompt_logprobs' must be in [0, {max_logprobs}] (-1, every token of the vocabulary, "
                              f"is not supported), got {prompt_logprobs}", "prompt_logprobs")
        if prompt_logprobs > max_logprobs:
            raise bad_request(f"'prompt_logprobs' is {prompt_logprobs}, more than this server allows: at most "
                              f"{max_logprobs} (--max-logprobs)", "prompt_logprobs")
        if stream and prompt_logprobs > 0:
            raise bad_request("'prompt_logprobs' are not available with \"stream\": true", "prompt_logprobs")
    request_id = str_field(body, "request_id")
    if request_id is not None and not _request_id_ok(request_id):
        raise bad_request(f"'request_id' must be 1 to {MAX_REQUEST_ID} printable characters", "request_id")
    bool_field(body, "store", False)
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad_request(f"'metadata' must be an object of strings, got {typename(metadata)}", "metadata")
    str_field(body, "service_tier")
    str_field(body, "prompt_cache_key")
    str_field(body, "safety_identifier")
    _prediction(body.get("prediction"))
    _inert(body)
    salt = str_field(body, "cache_salt")
    if salt == "":
        raise bad_request("'cache_salt' must be a non-empty string if given", "cache_salt")
    return dict(cache_salt=salt, truncate_prompt_tokens=truncate, add_special_tokens=bool_field(body, "add_special_tokens", None),
                prompt_logprobs=prompt_logprobs, request_id=request_id, bad_words=_bad_words(body),
                allowed_token_ids=_allowed_token_ids(body),
                tokens_as_ids=bool_field(body, "return_tokens_as_token_ids", False),
                return_token_ids=bool_field(body, "return_token_ids", False),
                ignored=tuple(k for k in IGNORED if body.get(k) is not None))


def unsupported(name: str, detail: str) -> APIError:
    """The 400 of a known field at a value this server cannot honour."""
    return bad_request(f"unsupported value of '{name}': {detail}", name)


def only_empty(body: dict, name: str, kind: type[list] | type[dict], why: str) -> None:
    """`name` may be null or empty (an array or an object, by `kind`), nothing else."""
    v, empty = body.get(name), "[]" if kind is list else "{}"
    if v is not None and not isinstance(v, kind):
        raise bad_request(f"'{name}' must be {'an array' if kind is list else 'an object'}, got {typename(v)}", name)
    if v:
        raise unsupported(name, f"{why}; send {empty} or null")


def _inert(body: dict) -> None:
    """vLLM's fields that change nothing here (module docstring), type-checked."""
    effort = str_field(body, "reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"'reasoning_effort' must be one of {list(REASONING_EFFORTS)}, got {effort!r}",
                          "reasoning_effort")
    bool_field(body, "include_reasoning", True)
    num_field(body, "length_penalty", None, float("-inf"), float("inf"))
    xargs = body.get("vllm_xargs")
    if xargs is not None and not (isinstance(xargs, dict) and all(
            _scalar(v) or (isinstance(v, list) and all(map(_scalar, v))) for v in xargs.values())):
        raise bad_request("'vllm_xargs' must be an object whose values are strings, numbers or lists of them",
                          "vllm_xargs")
    if bool_field(body, "use_beam_search", False):
        raise unsupported("use_beam_search", "beam search is not supported; send false or leave it out")
    only_empty(body, "logits_processors", list, "custom logits processors are not supported")
    only_empty(body, "mm_processor_kwargs", dict, "this server takes no images, audio or video")
    only_empty(body, "kv_transfer_params", dict, "this server has no disaggregated prefill")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", f"got {modalities!r}; this server writes text only: send [\"text\"] or "
                                        "leave it out")


def _scalar(v) -> bool:
    return isinstance(v, (str, int, float))       # a bool too: vLLM's parser takes it as an int


def header_request_id(value: bytes | None) -> str | None:
    """The X-Request-Id header's first non-empty value (None: none), checked as the request_id
    field is."""
    if value is None:
        return None
    try:                        # as clients send it (Starlette reads headers as Latin-1: "ü" read as "Ã¼")
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not _request_id_ok(text):
        raise bad_request(f"the X-Request-Id header must be 1 to {MAX_REQUEST_ID} printable characters (UTF-8)")
    return text


def _allowed_token_ids(body: dict) -> tuple[int, ...] | None:
    ids = body.get("allowed_token_ids")
    if ids is None:
        return None
    ids = token_ids(ids, 0) if ids else None
    if ids is None:
        raise bad_request("'allowed_token_ids' must be a non-empty array of token ids (integers >= 0), or null",
                          "allowed_token_ids")
    if len(set(ids)) > BIAS_SLOTS:
        raise bad_request(f"'allowed_token_ids' may name at most {BIAS_SLOTS} distinct tokens, got {len(set(ids))}",
                          "allowed_token_ids")
    return tuple(ids)


def _bad_words(body: dict) -> tuple[str, ...] | None:
    words = body.get("bad_words")
    if words is None:
        return None
    if not isinstance(words, list):
        raise bad_request(f"'bad_words' must be an array of strings, got {typename(words)}", "bad_words")
    odd = [typename(w) for w in words if not isinstance(w, str)]
    if odd:
        raise bad_request(f"'bad_words' must be an array of strings, got {odd[0]} among them", "bad_words")
    if not all(w.strip() for w in words):
        raise bad_request("'bad_words' entries must hold a character other than whitespace", "bad_words")
    return tuple(words) or None


def _prediction(p) -> None:
    """OpenAI's predicted output: null or {"type": "content", "content": a string or an array
    of text parts}; a 400 naming `prediction` otherwise."""
    if p is None:
        return
    content = p.get("content") if isinstance(p, dict) else None
    parts_ok = isinstance(content, list) and all(isinstance(x, dict) and x.get("type") == "text"
                                                 and isinstance(x.get("text"), str) for x in content)
    if not (isinstance(p, dict) and p.get("type") == "content" and set(p) <= {"type", "content"}
            and (isinstance(content, str) or parts_ok)):
        raise bad_request(f"'prediction' must be {PREDICTION_SHAPE}, got {typename(p)}", "prediction")
