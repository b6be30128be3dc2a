"""vLLM engine flags that a vLLM command line carries but that have no counterpart here: the
ones that mean nothing for this engine are accepted, the ones naming features it lacks are
refused before anything starts, in one line rather than argparse's "unrecognized arguments"
(fastserve_jax/vllm_options.py says which and why)."""

from __future__ import annotations

import argparse


def add_compat_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM flags accepted for compatibility (no effect here) or refused with a reason")
    g.add_argument("--trust-remote-code", action="store_true", help="accepted, no effect (no remote code is run)")
    g.add_argument("--download-dir", default=None, help="accepted, no effect (nothing is downloaded)")
    g.add_argument("--enforce-eager", action="store_true", help="accepted, no effect (no CUDA graphs)")
    g.add_argument("--quantization", "-q", default=None, help="not implemented: weights load in --dtype")
    g.add_argument("--kv-cache-dtype", default="auto", help="only auto: the KV cache is held in --dtype")
    g.add_argument("--revision", default=None, help="not implemented: --model is read as it is on disk")
    g.add_argument("--enable-lora", action="store_true", help="not implemented")
    g.add_argument("--lora-modules", nargs="+", default=None, help="not implemented")
    g.add_argument("--disable-frontend-multiprocessing", action="store_true", help="accepted, no effect")
    g.add_argument("--disable-custom-all-reduce", action="store_true", help="accepted, no effect")
    g.add_argument("--disable-fastapi-docs", action="store_true", help="accepted, no effect")
    g.add_argument("--distributed-executor-backend", default=None, help="accepted, no effect (jax.distributed)")
    g.add_argument("--tokenizer-mode", default="auto", help="only auto (the fast tokenizer) is implemented")
    g.add_argument("--load-format", default="auto", help="only auto or safetensors is implemented")
    g.add_argument("--scheduling-policy", default=None, help="only fcfs (vLLM's default), no effect: the order is "
                                                              "--scheduler's")
