"""vLLM engine flags that a vLLM command line carries but that have no counterpart here: the
ones that mean nothing for this engine are accepted (`notes` says why each has no effect), the
ones naming features it lacks are refused before anything starts (`refusal`), in one line
rather than argparse's "unrecognized arguments"."""

from __future__ import annotations

import argparse

NO_EFFECT = {
    "trust_remote_code": "--trust-remote-code has no effect: only the architectures fastserve-jax implements "
                         "(models/) are loaded, never code from the model directory",
    "enforce_eager": "--enforce-eager has no effect: there are no CUDA graphs to turn off; every batch shape is "
                     "an XLA program compiled ahead (--warmup says when)",
    "disable_frontend_multiprocessing": "--disable-frontend-multiprocessing has no effect: the engine runs on a "
                                        "thread of the server's process unless --engine-process is given",
    "disable_custom_all_reduce": "--disable-custom-all-reduce has no effect: XLA chooses the collectives",
    "disable_fastapi_docs": "--disable-fastapi-docs has no effect: the server has no documentation pages",
    "distributed_executor_backend": "--distributed-executor-backend has no effect: several hosts start through "
                                    "jax.distributed (--coordinator-address, --num-processes, --process-id)",
}


def add_compat_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM flags accepted for compatibility (no effect here) or refused with a reason")
    g.add_argument("--trust-remote-code", action="store_true", help="accepted, no effect (no remote code is run)")
    g.add_argument("--enforce-eager", action="store_true", help="accepted, no effect (no CUDA graphs)")
    g.add_argument("--quantization", "-q", default=None, help="not implemented: weights load in --dtype")
    g.add_argument("--kv-cache-dtype", default="auto", help="only auto: the KV cache is held in --dtype")
    g.add_argument("--revision", default=None, help="not implemented: --model is a local directory")
    g.add_argument("--enable-lora", action="store_true", help="not implemented")
    g.add_argument("--lora-modules", nargs="+", default=None, help="not implemented")
    g.add_argument("--disable-frontend-multiprocessing", action="store_true", help="accepted, no effect")
    g.add_argument("--disable-custom-all-reduce", action="store_true", help="accepted, no effect")
    g.add_argument("--disable-fastapi-docs", action="store_true", help="accepted, no effect")
    g.add_argument("--distributed-executor-backend", default=None, help="accepted, no effect (jax.distributed)")
    g.add_argument("--tokenizer-mode", default="auto", help="only auto (the fast tokenizer) is implemented")
    g.add_argument("--load-format", default="auto", help="only auto or safetensors is implemented")


def refusal(a: argparse.Namespace) -> str | None:
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
        return (f"--revision {a.revision}: model revisions are not implemented; --model names a local directory "
                "and nothing is downloaded, so check the revision out there and drop the flag")
    if a.enable_lora or a.lora_modules:
        return "--enable-lora/--lora-modules: LoRA adapters are not implemented"
    if a.tokenizer_mode != "auto":
        return (f"--tokenizer-mode {a.tokenizer_mode}: only 'auto' is implemented (the model's fast tokenizer, "
                "tokenizer.json)")
    if a.load_format not in ("auto", "safetensors"):
        return f"--load-format {a.load_format}: only 'auto' and 'safetensors' are implemented (*.safetensors files)"
    return None


def notes(a: argparse.Namespace) -> list[str]:
    """A line per flag given that has no effect here."""
    return [text for flag, text in NO_EFFECT.items() if getattr(a, flag, False)]
