"""From a parsed `Job` to engine inputs: render chat messages with the model's own chat
template, tokenize, check lengths against the context, and build one SamplingParams per
choice. Runs on the event loop before anything is queued; every failure is a 400 whose
message states the limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastserve_jax import chat_template as chat_template_module
from fastserve_jax.chat_template import ChatOptions, ChatTemplateError
from fastserve_jax.admission import check_bad_words, truncate_prompt, truncation_length
from fastserve_jax.config import SamplingParams
from fastserve_jax.sampling_params import BIAS_SLOTS, bias_tokens, choice_seed

from fastserve_jax.serve.engine_loop import EngineInfo
from fastserve_jax.serve.errors import bad_request
from fastserve_jax.serve.json_body import shown
from fastserve_jax.serve.protocol import MODEL_DEFAULTED, Job

if TYPE_CHECKING:
    from fastserve_jax.engine import LLMEngine


def render_chat(tokenizer, messages: list[dict], options: ChatOptions = ChatOptions(),
                chat_template: str | None = None, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of the conversation by the server's --chat-template, else the tokenizer's (by
    default with the assistant's turn opened), as `LLM.chat` renders it (fastserve_jax/chat_template.py)."""
    try:
        return chat_template_module.render_chat(tokenizer, messages, options, chat_template, add_special_tokens)[1]
    except ChatTemplateError as e:
        raise bad_request(str(e), e.param)


def _params(job: Job, max_tokens: int, seed: int | None, defaults: dict,
            min_tokens: int | None = None) -> SamplingParams:
    """`min_tokens`: None for the job's. `defaults`: the engine's sampling_defaults (the model's
    generation_config.json), for the MODEL_DEFAULTED fields the request left out, as vLLM's server takes
    them; SamplingParams' own where the model has none."""
    given = {k: getattr(job, k) for k in MODEL_DEFAULTED if getattr(job, k) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, **{**defaults, **given}, seed=seed, stop=job.stop or None,
                              logprobs=job.logprobs,
                              presence_penalty=job.presence_penalty, frequency_penalty=job.frequency_penalty,
                              ignore_eos=job.ignore_eos, stop_token_ids=list(job.stop_token_ids) or None,
                              min_tokens=job.min_tokens if min_tokens is None else min_tokens,
                              logit_bias=job.logit_bias, prompt_logprobs=job.computed_prompt_logprobs,
                              skip_special_tokens=job.skip_special_tokens,
                              spaces_between_special_tokens=job.spaces_between_special_tokens,
                              include_stop_str_in_output=job.include_stop_str_in_output,
                              bad_words=list(job.bad_words) if job.bad_words else None,
                              allowed_token_ids=list(job.allowed_token_ids) if job.allowed_token_ids else None,
                              cache_salt=job.cache_salt)
    except ValueError as e:
        raise bad_request(str(e))


def _prompt_ids(job: Job, prompt, eng: "LLMEngine | EngineInfo", chat_template: str | None) -> list[int] | str:
    """The prompt's token ids as add_special_tokens asks (a text left for `validate` to encode at
    the default), cut to its last truncate_prompt_tokens: a text prompt keeps its leading special
    tokens (BOS) within them, as the tokenizer's left truncation in vLLM keeps them."""
    head: list[int] = []
    if job.chat:
        src = render_chat(eng.tokenizer, prompt, job.chat_options, chat_template, job.add_special_tokens)
    elif isinstance(prompt, str) and (job.add_special_tokens is False or job.truncate_prompt_tokens is not None):
        src = eng.tokenizer.encode(prompt, add_special_tokens=job.add_special_tokens is not False)
        if job.truncate_prompt_tokens is not None and job.add_special_tokens is not False:
            head = src[:len(src) - len(eng.tokenizer.encode(prompt, add_special_tokens=False))]
    else:
        src = prompt
    k = job.truncate_prompt_tokens
    if k is None:
        return src
    try:
        k = truncation_length(k, eng.context_limit, job.max_tokens)
    except ValueError:          # past the context: named as this server's
        raise bad_request(f"'truncate_prompt_tokens' is {k}, more than the {eng.context_limit} tokens of this server's "
                          "context (/v1/models' max_model_len); give a smaller value or -1", "truncate_prompt_tokens")
    return truncate_prompt(src, k, len(head))


def _check_token_ids(job: Job, eng: "LLMEngine | EngineInfo") -> None:
    """Here rather than in the engine's own check, so the 400 names the field."""
    vocab = eng.vocab_size if isinstance(eng, EngineInfo) else eng.model_cfg.vocab_size
    for name, ids in (("stop_token_ids", job.stop_token_ids), ("logit_bias", sorted(job.logit_bias or ())),
                      ("allowed_token_ids", sorted(set(job.allowed_token_ids or ())))):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise bad_request(f"'{name}' must name token ids in [0, {vocab}) (this model's vocabulary), got "
                              f"{bad[:5]}", name)
    if job.min_tokens and job.allowed_token_ids is None:       # allowed tokens are all a row's slots hold
        biased = bias_tokens(job.logit_bias, job.stop_token_ids, () if job.ignore_eos else eng.eos_ids)
        if len(biased) > BIAS_SLOTS:
            raise bad_request(f"with 'min_tokens', 'logit_bias' and 'stop_token_ids' (and EOS) may name at most "
                              f"{BIAS_SLOTS} tokens together, got {len(biased)}", "logit_bias")
    if job.bad_words:
        try:
            check_bad_words(_params(job, max(job.min_tokens, 1), None, {}), eng.tokenizer, vocab, eng.eos_ids)
        except ValueError as e:
            raise bad_request(str(e), "bad_words")


def prepare(job: Job, eng: "LLMEngine | EngineInfo",
            chat_template: str | None = None) -> tuple[list[tuple[list[int], SamplingParams]], int]:
    """[(prompt ids, params)] in choice order (prompt i's choices at i*n .. i*n+n-1), and the
    prompt tokens of the request (each prompt counted once, as OpenAI's usage does).
    chat_template: the server's --chat-template (None: the tokenizer's)."""
    limit = eng.context_limit          # max_model_len, or the device KV pool's tokens where fewer
    context = ("this model's maximum context length" if limit == eng.cfg.max_model_len else
               "this server's context limit (what its device KV pool holds)")
    _check_token_ids(job, eng)
    probe = _params(job, 1, job.seed, eng.sampling_defaults, min_tokens=0)
    out, prompt_tokens = [], 0
    for i, prompt in enumerate(job.prompts):
        where = f"prompt {i}: " if len(job.prompts) > 1 else ""
        src = _prompt_ids(job, prompt, eng, chat_template)
        try:
            _, ids = eng.validate(src, probe)
        except ValueError as e:
            raise bad_request(f"{where}{e}", "messages" if job.chat else "prompt")
        max_tokens = job.max_tokens if job.max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            total = f" ({len(ids) + max_tokens} in all)" if max_tokens <= limit else ""
            raise bad_request(     # the number cut as other fields' are (it echoed all of 4,000 digits)
                f"{where}{context} is {limit} tokens, but the prompt has {len(ids)} "
                f"tokens and {shown(max_tokens)} more were requested{total}; lower "
                f"{job.limit_field} to at most {limit - len(ids)} or shorten the prompt", job.limit_field)
        if job.min_tokens > max_tokens:
            raise bad_request(f"{where}'min_tokens' is {job.min_tokens} but at most {max_tokens} tokens can be "
                              "generated; lower it", "min_tokens")
        for j in range(job.n):
            seed = choice_seed(None if job.seed == -1 else job.seed, j)     # -1: no seed, as in vLLM
            params = _params(job, max_tokens, seed, eng.sampling_defaults)
            try:
                eng.validate(ids, params)    # the KV-pool check with the real max_tokens
            except ValueError as e:
                raise bad_request(f"{where}{e}", "max_tokens")
            out.append((ids, params))
        prompt_tokens += len(ids)
    return out, prompt_tokens
