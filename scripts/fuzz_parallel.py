"""Fuzz tensor and pipeline parallelism: scripts/fuzz_engine.py's seeds on a mesh.

Each seed draws what fuzz_engine.draw draws (pools, policy, swap policy, copy path, requests,
aborts, prompt logprobs, seeded samples, n) and, from its own stream, a layout: tp in {1, 2}
and pp in {1, 2} (on 4 virtual CPU devices), a model whose head counts allow it (MODELS: GQA split on KV heads, one
KV head kept on both devices, a device holding parts of several GQA groups, a vocabulary tp
does not divide, tied embeddings, OPT's biases and learned positions), and with pp > 1 a
batches_in_flight of 0 (= pp), 1 or 3; at pp 1 some seeds keep 2 or 3 batches in flight
without pipelining (async scheduling, where drawn, with 2). The engine's tokens and prompt logprobs are
compared with the same single-device ample-memory run of the same model as fuzz_engine's, up to
its near-tie rule, and the KV ledger, the step limit and the empty pools and flights are checked
the same way.

Async scheduling runs only with one stage: where a seed draws it with pp > 1 the script checks
that the engine refuses it with a message naming pipeline_parallel_size, then serves with it
unset (resolved off).

    python scripts/fuzz_parallel.py 0 100             # seeds 0..99; one line per seed
    python scripts/fuzz_parallel.py 0 100 --jobs 2

Exit status 1 if any seed failed.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_engine  # noqa: E402

# name -> (random_checkpoint preset, config overrides). The prompts' token ids reach 250.
MODELS = {
    "llama": ("llama", {}),                                          # 4 query heads over 2 KV heads
    "llama-4l": ("llama", dict(num_hidden_layers=4)),                # 2 layers per stage
    "mistral": ("mistral", {}),                                      # 1 KV head: on both devices at tp 2
    "llama-6q3kv": ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)),   # spread groups
    "llama-v253": ("llama", dict(vocab_size=253)),                   # vocabulary replicated at tp 2
    "qwen2": ("qwen2", {}),                                          # tied embeddings, q/k/v biases
    "opt": ("opt", {}),
}
_paths: dict[str, str] = {}


def model_path(name: str) -> str:
    if name not in _paths:
        from fastserve_jax.models.random_checkpoint import make_random_checkpoint

        arch, overrides = MODELS[name]
        _paths[name] = make_random_checkpoint(os.path.join(tempfile.mkdtemp(prefix="fuzz-parallel-"), name),
                                              arch, **overrides)
    return _paths[name]


def draw_layout(seed: int) -> tuple[str, dict]:
    """(model name, engine options: tensor_parallel_size, pipeline_parallel_size, and
    batches_in_flight where drawn) for one seed, from its own stream."""
    rng = random.Random(seed + 5 * 10**6)
    tp, pp = rng.choice([(1, 2), (2, 1), (2, 2), (2, 2)])
    opts = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    if pp > 1:
        opts["batches_in_flight"] = rng.choice([0, 0, 1, 3])
    elif rng.random() < 0.25:
        opts["batches_in_flight"] = rng.choice([2, 3])
    return rng.choice(sorted(MODELS)), opts


def run_seed(seed: int) -> str:
    from fastserve_jax import LLM

    cfg, prompts, maxes, params = fuzz_engine.draw(seed)
    name, opts = draw_layout(seed)
    path = model_path(name)
    cfg = dict(cfg)
    if cfg["async_scheduling"] and (opts["pipeline_parallel_size"] > 1 or opts.get("batches_in_flight", 2) != 2):
        try:
            LLM(path, **fuzz_engine.BASE, **{k: v for k, v in cfg.items() if k != "fused_blocks"}, **opts)
        except ValueError as err:
            if "pipeline_parallel_size" not in str(err):
                raise
        else:
            raise RuntimeError(f"seed {seed}: async scheduling with {opts} was not refused")
        cfg["async_scheduling"] = None
    line = fuzz_engine.check_seed(seed, cfg, prompts, maxes, params, path, **opts)
    bif = f", batches_in_flight {opts['batches_in_flight']}" if "batches_in_flight" in opts else ""
    return f"{line}; {name} tp={opts['tensor_parallel_size']} pp={opts['pipeline_parallel_size']}{bif}"


if __name__ == "__main__":
    import jax

    jax.config.update("jax_num_cpu_devices", 4)    # tp x pp <= 4; before the backend starts (the workers fork)
    sys.exit(fuzz_engine.main(run=run_seed, doc=__doc__))
