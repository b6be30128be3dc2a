"""The Python batch API, with vLLM's names: `LLM(...).generate(prompts, sampling_params)` and
`LLM(...).chat(messages, sampling_params)`."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time

from collections import abc
from typing import Sequence

from fastserve_jax.chat_template import ChatOptions, conversations, render_chat
from fastserve_jax.config import EngineConfig
from fastserve_jax.sampling_params import SamplingParams, choice_seed
from fastserve_jax.cost_profile import refine_profile
from fastserve_jax.engine import LLMEngine
from fastserve_jax.engine_vllm import no_lora_or_priority
from fastserve_jax.interrupts import interrupts_between_steps
from fastserve_jax.lifecycle import recover_after_fault
from fastserve_jax.prompts import Prompt, one_prompt, prompt_list
from fastserve_jax.request import CompletionOutput, Request, RequestOutput
from fastserve_jax.runner.compile_guard import compile_stats
from fastserve_jax.runner.compiler import resolve_warmup
from fastserve_jax.runner.persistent_cache import enable_compilation_cache
from fastserve_jax.vllm_options import llm_keywords

log = logging.getLogger(__name__)


class LLM:
    """An engine over one model. `model=None` serves the bundled demo model.

    Keyword arguments are EngineConfig fields (max_model_len, max_num_seqs,
    max_num_batched_tokens, block_size, num_device_blocks, seed, scheduler, buckets,
    tensor_parallel_size, pipeline_parallel_size, attention_backend ...). dtype: "auto"
    (bfloat16 on GPU and TPU, float32 on CPU), "float32" or "bfloat16". attention_backend:
    "auto" (a Pallas kernel on GPU and TPU, jnp reference elsewhere), "reference" or "pallas"
    (interpret mode on CPU: for tests); see docs/attention.md. async_scheduling: None (on with
    one pipeline stage unless batches_in_flight is given), True or False; see docs/performance.md, section 5.
    gpu_memory_utilization (vLLM's, default 0.9): the fraction of each accelerator's memory the
    engine may use, which sizes the KV pool unless num_device_blocks is given (on CPU the pool
    takes a fixed 4 GiB instead: kv_sizing.auto_num_blocks). swap_space (vLLM's, default 4): GiB of
    host memory per device for swapped-out KV unless num_host_blocks is given (0: no host pool).

    `generation_config`: "auto" (the default: sampling parameters a call leaves out, and a
    generate without sampling_params, take the model's generation_config.json temperature,
    top_p, top_k, repetition_penalty and min_p, as vLLM's do) or "vllm" (neutral defaults);
    models/generation_config.py. `tokenizer` (vLLM's): a directory to load the tokenizer from
    instead of the model's (its chat template and EOS token come with it).

    `warmup`: "lazy" (compile each shape the first time a batch needs it), "background"
    (enough to answer any request now, the rest on a thread) or "full" (everything first;
    nothing compiles afterwards); see runner/compiler.py. `mirror`: multi-host leader hook
    that receives every device operation for the other processes (fastserve_jax/multihost.py).
    """

    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 num_device_blocks: int | None = None, warmup: str | bool = "lazy", progress=None, mirror=None,
                 generation_config: str = "auto", tokenizer: str | None = None, **engine_kwargs) -> None:
        from fastserve_jax.models.generation_config import check_mode

        resolve_warmup(warmup)                              # a bad mode fails before anything loads
        check_mode(generation_config)                       # and so does a bad generation_config
        engine_kwargs = llm_keywords(engine_kwargs)         # vLLM's options without effect here, or refused
        if "num_gpu_blocks_override" in engine_kwargs:      # vLLM's name, as the command line takes it
            if num_device_blocks is not None:
                raise ValueError("give num_device_blocks or vLLM's num_gpu_blocks_override, not both")
            num_device_blocks = engine_kwargs.pop("num_gpu_blocks_override")
        path, model_cfg, cfg = engine_config(model, dtype=dtype, max_model_len=max_model_len,
                                             num_device_blocks=num_device_blocks, **engine_kwargs)
        enable_compilation_cache(cfg.compilation_cache_dir)
        start, t0 = compile_stats(), time.perf_counter()
        self.engine = LLMEngine.from_pretrained(path, cfg, model_cfg=model_cfg, warmup=warmup, progress=progress,
                                                mirror=mirror, generation_config=generation_config, tokenizer=tokenizer)
        self.startup_seconds = time.perf_counter() - t0            # load, warm-up and profile
        self.startup_compiles = compile_stats().since(start)
        self._generating = threading.Lock()       # LLMEngine is single-threaded: one generate at a time

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        """vLLM's name for `tokenizer`."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate samples with when given no sampling_params: vLLM's defaults, with the
        model's generation_config.json temperature, top_p, top_k, repetition_penalty and min_p
        (unless generation_config="vllm")."""
        return SamplingParams(**self.engine.sampling_defaults)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix (enable_prefix_caching), so the next requests
        compute theirs again (a cold measurement, say). False where caching is off."""
        with self._generating:
            if not self.engine.kv.caching:
                return False
            self.engine.kv.reset()
            return True

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine (`self.engine`), which takes vLLM's engine methods too (engine_vllm.py)."""
        return self.engine

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_request=None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order, with its `n` completions in `outputs` (seeded
        `choice_seed(seed, j)` when a seed is given). A prompt is a string, token ids (a list, tuple or
        1-D integer array) or vLLM's {"prompt": text} / {"prompt_token_ids": ids} (TextPrompt,
        TokensPrompt), with an optional "cache_salt" (SamplingParams.cache_salt). Every prompt
        is validated before any is queued. use_tqdm=True draws vLLM's progress bar of processed
        prompts on stderr (off by default here, unlike vLLM); a callable makes the bar, as in
        vLLM. Calls from several threads run one after another. vLLM's lora_request and priority
        must ask for nothing (None, or 0s)."""
        salted = [one_prompt(p, i) for i, p in enumerate(prompt_list(prompts))]
        prompts, salts = [p for p, _ in salted], [salt for _, salt in salted]
        _no_lora_or_priority(lora_request, priority, len(prompts))
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        elif isinstance(sampling_params, abc.Sequence) and not isinstance(sampling_params, str):
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts; "
                                 "pass one, or one per prompt")
            if not prompts:
                return []
        else:
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them (one per prompt), "
                             f"got {type(sampling_params).__name__}")
        params = [sp if salt is None or not isinstance(sp, SamplingParams) else dataclasses.replace(sp, cache_salt=salt)
                  for sp, salt in zip(params, salts)]
        runs = [[dataclasses.replace(sp, n=1, best_of=None, seed=choice_seed(sp.seed, j))
                 for j in range(sp.n)]
                if isinstance(sp, SamplingParams) else [sp] for sp in params]
        for i, (p, subs) in enumerate(zip(prompts, runs)):
            try:
                self.engine.validate(p, subs[0])
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        with self._generating:      # another thread's generate finishes first, then this one runs
            refine_profile(self.engine)        # a background warm-up's provisional cost model, once it is done
            groups = self._run(prompts, runs, use_tqdm)
        out = []
        for g in groups:
            first, *rest = [self.engine.output_of(r) for r in g]
            first.outputs += [CompletionOutput(j, o.text, o.token_ids, o.finish_reason, o.logprobs, o.stop_reason)
                              for j, o in enumerate(rest, 1)]
            out.append(self._with_decoded_tokens(first))
        return out

    def _with_decoded_tokens(self, out: RequestOutput) -> RequestOutput:
        """Logprob entries that give vLLM's decoded_token: each token's text alone."""
        decode = self.engine.tokenizer.decode

        def entries(lps):
            return None if lps is None else [lp if lp is None else dataclasses.replace(
                lp, texts={t: decode([t]) for t in lp}) for lp in lps]
        for c in out.outputs:
            c.logprobs = entries(c.logprobs)
        out.logprobs, out.prompt_logprobs = out.outputs[0].logprobs, entries(out.prompt_logprobs)
        return out

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False,
             lora_request=None, chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools: list | None = None,
             chat_template_kwargs: dict | None = None, mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's: one conversation (a list of {"role", "content"} dicts) or a list of them, each
        rendered by `chat_template` (a Jinja template) or else the tokenizer's own, as the server
        renders /v1/chat/completions (fastserve_jax/chat_template.py), then generated as `generate`
        does; one output per conversation, whose `prompt` is the rendered text. add_generation_prompt opens the
        assistant's turn; continue_final_message (with add_generation_prompt=False) leaves the
        final message open for the model to continue; chat_template_kwargs are extra template
        variables (e.g. {"enable_thinking": False}); chat_template_content_format is how content
        reaches the template (chat_template.CONTENT_FORMATS); `tools` (tool schemas) reach the
        template, as in vLLM, whose LLM.chat parses no tool call out of the answer either. The
        arguments come in vLLM's order; mm_processor_kwargs must be empty (text models only).
        Bad input raises ValueError before any conversation is queued."""
        if mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs: fastserve-jax serves text models only; pass None")
        _no_lora_or_priority(lora_request, None)
        options = ChatOptions(add_generation_prompt, continue_final_message, chat_template_kwargs,
                              chat_template_content_format, tools)
        convs = conversations(messages)
        if isinstance(sampling_params, (list, tuple)) and len(sampling_params) != len(convs):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(convs)} conversations; "
                             "pass one, or one per conversation")
        rendered = []
        for i, conv in enumerate(convs):
            try:
                rendered.append(render_chat(self.tokenizer, conv, options, chat_template))
            except ValueError as e:
                raise ValueError(f"conversation {i}: {e}" if len(convs) > 1 else str(e)) from None
        try:
            outs = self.generate([ids for _, ids in rendered], sampling_params, use_tqdm)
        except ValueError as e:     # generate names its prompts "prompt i": here they are conversations
            head, sep, rest = str(e).partition(": ")
            if not (sep and head.startswith("prompt ") and head[7:].isdigit()):
                raise
            raise ValueError(f"conversation {head[7:]}: {rest}" if len(convs) > 1 else rest) from None
        for out, (text, _) in zip(outs, rendered):
            out.prompt = text
        return outs

    def _run(self, prompts: list, runs: list[list[SamplingParams]], use_tqdm: bool = False) -> list[list[Request]]:
        """Queue the requests and step until all are done. Interrupted (KeyboardInterrupt,
        or a step that raises), the requests of this call are aborted, which frees their KV:
        none runs on in a later generate. A Ctrl-C is taken between steps (interrupts.py)."""
        groups: list[list[Request]] = []
        in_step = False
        before = set(self.engine.live_request_ids())    # added to the engine directly: not this call's
        try:
            with interrupts_between_steps() as check:
                for p, subs in zip(prompts, runs):
                    groups.append([])
                    for sp in subs:
                        groups[-1].append(self.engine.add_request(p, sp))
                    check()
                bar = _progress(len(groups), use_tqdm) if use_tqdm else None
                while any(not r.finished for g in groups for r in g):
                    in_step = True
                    self.engine.step()
                    in_step = False
                    check()
                    if bar is not None:
                        bar.update(sum(all(r.finished for r in g) for g in groups) - bar.n)
                if bar is not None:
                    bar.close()
                check()     # a Ctrl-C during the last step still interrupts
        except BaseException:
            # this call's requests, finished ones too (one whose release raised is live), and one
            # the engine registered as the interrupt landed, before add_request returned it
            ids = dict.fromkeys([r.request_id for g in groups for r in g] +
                                [rid for rid in self.engine.live_request_ids() if rid not in before])
            for _ in range(2):      # an abort whose release raised runs again (lifecycle.py), and the
                for rid in ids:     # others still run (they were left live for good)
                    try:
                        self.engine.abort(rid)
                    except Exception:
                        log.exception("aborting %s after an interrupted generate", rid)
            # an exception from the caller's own signal handler may have landed inside a step: a
            # half-updated ledger, a lost cache, keys given to blocks no step wrote (later prompts
            # matched them and answered wrong, until 2026-12-07), as after the server's failed step
            recover_after_fault(self.engine, in_step)
            raise
        return groups

    def __getattr__(self, name: str):
        """vLLM's LLM methods this one lacks, refused by name (not a bare AttributeError)."""
        if name in _NOT_HERE:
            raise AttributeError(f"LLM.{name}: {_NOT_HERE[name]}")
        raise AttributeError(f"'LLM' object has no attribute {name!r}")


# vLLM's LLM attributes with no counterpart here, and why
_POOLING = "pooling models (embeddings, scores, classification) are not implemented; this engine generates text"
_NOT_HERE = {"beam_search": "beam search is not implemented (vLLM's is a separate API too); sample with n and "
                            "cumulative_logprob", "encode": _POOLING, "embed": _POOLING, "score": _POOLING,
             "classify": _POOLING, "reward": _POOLING,
             "sleep": "sleep mode is not implemented", "wake_up": "sleep mode is not implemented"}


def _no_lora_or_priority(lora_request, priority, n: int | None = None) -> None:
    """vLLM's lora_request and priority: one, or one per prompt of `n` (engine_vllm.py checks
    what they ask for)."""
    for name, v in (("lora_request", lora_request), ("priority", priority)):
        if n is not None and isinstance(v, abc.Sequence) and len(v) != n:
            raise ValueError(f"{name}: got {len(v)} for {n} prompts; pass one per prompt")
    no_lora_or_priority(lora_request, priority)


def _progress(total: int, use_tqdm=True):
    """vLLM's bar of processed prompts (tqdm comes with transformers' dependencies); `use_tqdm`
    a callable (a tqdm class, tqdm.notebook's, a partial) makes it, as in vLLM (it was ignored)."""
    from tqdm import tqdm

    return (use_tqdm if callable(use_tqdm) else tqdm)(total=total, desc="Processed prompts", dynamic_ncols=True)


def engine_config(model, *, dtype: str = "auto", max_model_len: int | None = None,
                  num_device_blocks: int | None = None, **engine_kwargs) -> tuple:
    """(the model directory, its ModelConfig (config.json, read once and handed to the loader),
    the EngineConfig that LLM(model, ...) serves with), checked before anything loads; `bench`
    checks the options it hands to the servers it starts here too (serve/engine_args.py)."""
    import jax

    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.config import ModelConfig
    from fastserve_jax.models.hf_files import local_model_dir, weight_files
    from fastserve_jax.sharding.parallel_config import ParallelConfig

    if model is not None and not (isinstance(model, (str, os.PathLike)) and os.fspath(model)):
        raise ValueError(f"model must be a path (a model directory), a repo id in the local Hugging Face cache, or "
                         f"None (the demo model), got {model!r:.80}")
    path = local_model_dir(os.fspath(model)) if model is not None else demo_model_path()
    if jax.config.jax_disable_jit:          # every request failed with a 500 (2026-12-07)
        raise ValueError("JAX_DISABLE_JIT is set: the engine runs ahead-of-time compiled programs only; unset it")
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(engine_kwargs) - known)
    if unknown:
        raise ValueError(f"unknown LLM arguments {unknown}; valid ones are {sorted(known)}")
    model_cfg = ModelConfig.from_pretrained(path)
    if max_model_len is None:
        max_model_len = min(model_cfg.max_positions, EngineConfig.max_model_len)
        if model_cfg.max_positions > max_model_len:        # vLLM serves the model's whole context
            _say_context_cap(path, max_model_len, model_cfg.max_positions)
    model_cfg.check_context(max_model_len)
    cfg = EngineConfig(dtype=dtype, max_model_len=max_model_len, num_device_blocks=num_device_blocks or 0,
                       **engine_kwargs)
    # the mesh's and the weight files' checks, which need no device (found as the engine started,
    # after serve's port opened, until 2026-12-07)
    ParallelConfig(cfg.tensor_parallel_size, cfg.pipeline_parallel_size).check_model(
        model_cfg.num_layers, model_cfg.num_heads, model_cfg.intermediate_size)
    weight_files(path)
    cfg.resolve()                   # the bucket lists' checks, which need no model (a server bench starts failed)
    return path, model_cfg, cfg


@functools.cache         # once per model: serve checks its options before LLM reads them again
def _say_context_cap(path: str, served: int, positions: int) -> None:
    log.warning("serving %d of the model's %d positions (the default max_model_len); give max_model_len "
                "(--max-model-len) for more", served, positions)
