"""vLLM's /tokenize and /detokenize: request bodies checked field by field (unknown fields and
bad values are 400s naming the field, as in serve/protocol.py) and answered from the
tokenizer in the front end, which may not load jax (serve --engine-process).

    POST /tokenize    {"prompt": text, "add_special_tokens": true}
                      or {"messages": [...], "add_generation_prompt": true, "continue_final_message": false,
                          "chat_template_kwargs": {...}, "add_special_tokens": (see below)}
                      either with "return_token_strs": false, "model"
                      -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"tokens": [ids], "model"} -> {"prompt": text}

Chat messages are rendered as /v1/chat/completions renders them (the server's --chat-template,
else the tokenizer's). Left out, `add_special_tokens` on chat gives the very ids a chat
completion is prompted with (BOS added unless the template wrote it); vLLM's default there is
false, which a request can still ask for (the rendered text encoded with no special tokens).
`max_model_len` is the context limit /v1/models advertises (fewer tokens than --max-model-len
where the device KV pool holds fewer). /detokenize decodes with special tokens kept, as vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastserve_jax.chat_template import ChatOptions, ChatTemplateError, render_chat
from fastserve_jax.serve.engine_loop import EngineInfo
from fastserve_jax.serve.errors import bad_request
from fastserve_jax.serve.json_body import bool_field, str_field, token_ids, typename
from fastserve_jax.serve.prepare import render_chat as render_chat_ids
from fastserve_jax.serve.protocol import check_fields, no_tools, parse_chat_options, parse_messages

if TYPE_CHECKING:
    from fastserve_jax.engine import LLMEngine

_COMMON = frozenset({"model", "add_special_tokens", "return_token_strs"})
PROMPT_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {"messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                         "tools", "tool_choice", "parallel_tool_calls"}    # a chat body counted as sent (no tools)


@dataclass(frozen=True)
class TokenizeJob:
    model: str | None
    prompt: str | None                   # a completion's text, or None for chat
    messages: list[dict] | None
    add_special_tokens: bool | None      # None: the endpoint's default (module docstring)
    return_token_strs: bool
    chat_options: ChatOptions = ChatOptions()


def parse_tokenize(body: dict, content_format: str = "auto") -> TokenizeJob:
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise bad_request("/tokenize takes either 'prompt' (text) or 'messages' (a chat), exactly one of them",
                          "prompt")
    chat = body.get("messages") is not None
    if chat:
        no_tools(body)
    field = "messages" if chat else "prompt"
    check_fields(body, CHAT_FIELDS if chat else PROMPT_FIELDS, f"/tokenize with '{field}'", field)
    if not chat and not isinstance(body["prompt"], str):
        raise bad_request(f"'prompt' must be a string (the text to tokenize), got {typename(body['prompt'])}",
                          "prompt")
    add = body.get("add_special_tokens")
    return TokenizeJob(str_field(body, "model"), None if chat else body["prompt"],
                       parse_messages(body["messages"]) if chat else None,
                       None if add is None else bool_field(body, "add_special_tokens", True),
                       bool_field(body, "return_token_strs", False),
                       parse_chat_options(body, content_format) if chat else ChatOptions())


def tokenize(job: TokenizeJob, eng: "LLMEngine | EngineInfo", chat_template: str | None = None) -> dict:
    """The /tokenize answer (run off the event loop, as prepare is)."""
    tok = eng.tokenizer
    if job.messages is None:
        ids = tok.encode(job.prompt, add_special_tokens=job.add_special_tokens is not False)
    elif job.add_special_tokens is None:
        ids = render_chat_ids(tok, job.messages, job.chat_options, chat_template)
    else:
        try:
            text = render_chat(tok, job.messages, job.chat_options, chat_template)[0]
        except ChatTemplateError as e:
            raise bad_request(str(e), e.param)
        ids = tok.encode(text, add_special_tokens=job.add_special_tokens)
    return {"count": len(ids), "max_model_len": eng.context_limit, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if job.return_token_strs else None}


def parse_detokenize(body: dict, eng: "LLMEngine | EngineInfo") -> tuple[str | None, list[int]]:
    """(model, token ids) of a /detokenize body."""
    vocab_size = eng.vocab_size if isinstance(eng, EngineInfo) else eng.model_cfg.vocab_size
    check_fields(body, frozenset({"model", "tokens"}), "/detokenize", "tokens")
    ids: Any = token_ids(body["tokens"])
    if ids is None:
        raise bad_request(f"'tokens' must be an array of token ids (integers), got {typename(body['tokens'])}",
                          "tokens")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"'tokens' must hold token ids in [0, {vocab_size}) (this model's vocabulary), got "
                          f"{bad[:5]}", "tokens")
    return str_field(body, "model"), ids


def detokenize(ids: list[int], eng: "LLMEngine | EngineInfo") -> dict:
    return {"prompt": eng.tokenizer.decode(ids)}
