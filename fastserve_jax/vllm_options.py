"""vLLM engine options that a vLLM command line or `vllm.LLM(...)` call carries but that have no
counterpart here: the ones that mean nothing for this engine are accepted (`notes` says why
each has no effect), the ones naming features it lacks are refused before anything starts
(`refusal`), in one line. The command line's flags (serve/compat_flags.py) and LLM's keywords
(`llm_keywords`) share these tables; messages name flags, which LLM's name as keywords."""

from __future__ import annotations

import logging
import os
import re
import types

log = logging.getLogger("fastserve_jax")

NO_EFFECT = {
    "trust_remote_code": "--trust-remote-code has no effect: only the architectures fastserve-jax implements "
                         "(models/) are loaded, never code from the model directory",
    "download_dir": "--download-dir has no effect: nothing is downloaded; --model is a local directory or "
                    "a repo id in the local Hugging Face cache",
    "enforce_eager": "--enforce-eager has no effect: there are no CUDA graphs to turn off; every batch shape is "
                     "an XLA program compiled ahead (--warmup says when)",
    "disable_frontend_multiprocessing": "--disable-frontend-multiprocessing has no effect: the engine runs on a "
                                        "thread of the server's process unless --engine-process is given",
    "disable_custom_all_reduce": "--disable-custom-all-reduce has no effect: XLA chooses the collectives",
    "disable_fastapi_docs": "--disable-fastapi-docs has no effect: the server has no documentation pages",
    "distributed_executor_backend": "--distributed-executor-backend has no effect: several hosts start through "
                                    "jax.distributed (--coordinator-address, --num-processes, --process-id)",
    "scheduling_policy": "--scheduling-policy fcfs (vLLM's default) has no effect: requests are ordered by "
                         "--scheduler (default skip-join-mlfq; --scheduler fcfs is first come, first served)",
}


# vllm.LLM(...) keywords common in offline scripts that change nothing here (any value; logged)
LLM_NO_EFFECT = {
    "disable_log_stats": "disable_log_stats has no effect: LLM logs no periodic stats",
    "enable_chunked_prefill": "enable_chunked_prefill has no effect: prefill is always chunked to "
                              "max_num_batched_tokens",
    "max_seq_len_to_capture": "max_seq_len_to_capture has no effect: there are no CUDA graphs",
    "compilation_config": "compilation_config has no effect: XLA compiles every batch shape (warmup says when)",
    "max_logprobs": "max_logprobs has no effect: logprobs and prompt_logprobs are at most 20 (the sampler's)",
}


# vllm.LLM(...) keywords that scripts pass at values asking for nothing missing (vLLM's defaults
# or their equivalents): taken silently at those, refused by name at any other
LLM_AT_DEFAULT = {
    "task": (("auto", "generate"), "only text generation is implemented (no pooling or embedding tasks)"),
    "skip_tokenizer_init": ((False,), "the engine detokenizes its outputs; a model without a tokenizer is not "
                                      "served"),
    "hf_overrides": ((None, {}), "config.json is read as it is; edit a copy of the model directory instead"),
    "enable_sleep_mode": ((False,), "sleep mode is not implemented"),
    "tokenizer_revision": ((None,), "revisions are not implemented; the tokenizer is read from a local directory"),
}


# The refused options and their values that ask for nothing missing (the command line's defaults).
REFUSED = {"quantization": None, "kv_cache_dtype": "auto", "revision": None, "enable_lora": False,
           "lora_modules": None, "tokenizer_mode": "auto", "load_format": "auto", "scheduling_policy": None}


def refusal(a) -> str | None:
    """The one-line error for a flag naming a feature this engine lacks, or None."""
    if not hasattr(a, "kv_cache_dtype"):      # a command without the engine options
        return None
    if a.quantization is not None:
        return (f"--quantization {a.quantization}: quantized weights are not implemented; weights load in "
                "--dtype (float32 or bfloat16)")
    if a.kv_cache_dtype != "auto":
        return (f"--kv-cache-dtype {a.kv_cache_dtype}: only 'auto' is implemented (the KV cache is held in the "
                "model's --dtype)")
    if a.revision is not None:
        return (f"--revision {a.revision}: model revisions are not implemented; --model is read as it is on disk "
                "(a directory, or the local Hugging Face cache's snapshot) and nothing is downloaded, so check the "
                "revision out there and drop the flag")
    if a.enable_lora or a.lora_modules:
        return "--enable-lora/--lora-modules: LoRA adapters are not implemented"
    if a.tokenizer_mode != "auto":
        return (f"--tokenizer-mode {a.tokenizer_mode}: only 'auto' is implemented (the model's fast tokenizer, "
                "tokenizer.json)")
    if a.scheduling_policy not in (None, "fcfs"):
        return (f"--scheduling-policy {a.scheduling_policy}: request priorities are not implemented; only vLLM's "
                "default 'fcfs' is taken, and the order is --scheduler's")
    if a.load_format not in ("auto", "safetensors"):
        return f"--load-format {a.load_format}: only 'auto' and 'safetensors' are implemented (*.safetensors files)"
    return None


def notes(a) -> list[str]:
    """A line per flag given that has no effect here."""
    return [text for flag, text in NO_EFFECT.items() if getattr(a, flag, False)]


def as_keywords(text: str) -> str:
    """A message written for the command line, with each --flag-name as LLM's flag_name."""
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), text)


def llm_keywords(kwargs: dict) -> dict:
    """LLM's keywords without vLLM's options that change nothing here (each logged once, as
    vLLM logs) or that name a feature this engine lacks (a ValueError saying so)."""
    kwargs = dict(kwargs)
    if kwargs.pop("cpu_offload_gb", 0):                # vLLM's default 0 asks for nothing
        raise ValueError("cpu_offload_gb: offloading weights to host memory is not implemented (KV caches "
                         "swap to it: swap_space)")
    for k, (ok, why) in LLM_AT_DEFAULT.items():
        if k in kwargs and not any(kwargs[k] == v and type(kwargs[k]) is type(v) for v in ok):
            raise ValueError(f"{k}={kwargs[k]!r:.80}: {why}")
        kwargs.pop(k, None)
    if "seed" in kwargs and kwargs["seed"] is None:    # vLLM's: no fixed seed
        kwargs["seed"] = int.from_bytes(os.urandom(4), "little")
    given = {k: kwargs[k] for k in (*NO_EFFECT, *REFUSED, *LLM_NO_EFFECT) if k in kwargs}
    bad = refusal(types.SimpleNamespace(**{**REFUSED, **given}))
    if bad:
        raise ValueError(as_keywords(bad))
    for text in notes(types.SimpleNamespace(**given)) + [LLM_NO_EFFECT[k] for k in LLM_NO_EFFECT if k in given]:
        log.warning(as_keywords(text))
    return {k: v for k, v in kwargs.items() if k not in given}
