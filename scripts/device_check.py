"""One run on one accelerator: our decode and prefill against the device's own roofline and
against transformers `generate` on the same device, for the reference and the Pallas path.

    PYTHONPATH=. python scripts/device_check.py            # GPU: Llama-3-8B shapes, bf16, < 8 min
    PYTHONPATH=. python scripts/device_check.py --model 1b # Llama-3.2-1B shapes
    PYTHONPATH=. python scripts/device_check.py --smoke    # CPU, tiny model, seconds (tests run this)

Before a run on a lent device, check it here: `python3 -m pytest -m slow tests/test_device_check.py`
(the smoke run; out of the default suite since 2026-12-06, 12-15 s of its 2 cores).

Runs from the source tree (no install, no server imports). Steps, in order:
1. the device's rates, each the best of XLA's and torch's: HBM bandwidth from a copy and a sum
   over a large array, bf16 peak from a large square matmul;
2. correctness: a small random Llama-3-style checkpoint served by the engine on each backend in
   bf16 and scored teacher-forced by transformers on the same device (device_check_parity.py);
3. transformers + torch `generate` on the same device and shapes (random weights of its own:
   speed does not depend on the values): decode tokens/s at batch 1 and 32, taken as the
   difference between generating 1 and 1 + N tokens after the same prompt;
4. the Triton kernel alone (GPU and CPU; a TPU runs its own kernel): decode attention over one
   layer's cache at batch 1/32/128 and a 2,048-token context, for six tunings, then the
   fastest with three other (warps, stages), and the reference path's gather: time, the
   bandwidth its KV bytes need, and its output against the gather's (at most 90 s). It runs
   after the platform's own backend's steps 5 and 6 and before the other backends': Pallas
   cells after it run its fastest tuning, on a GPU the Pallas cells before it the defaults;
5. for each attention backend (the platform's own first: pallas on GPU and TPU): a
   random-weight model on the device, the engine's ModelRunner over it, and launches built by
   its LaunchBuilder (batches 1/8/32/128 at contexts 512 and 2,048; a 2,048-token prefill). A
   decode step is one forward of the launch, logits included, sampling and scheduling
   excluded; each against the HBM roofline (weight + KV bytes over step 1's bandwidth), the
   prefill against its peak;
6. right after its backend's step 5, the whole engine (LLMEngine's loop: scheduling,
   sampling, detokenizing) on the platform's own backend (--all-engines: each),
   synchronous and async, timed as transformers is in
   step 3 at its batches and the first context: the like-for-like comparison with `generate`
   (device_check_engine.py), with the engines' greedy tokens compared.
Cells that would overrun --budget-s are skipped and listed; --no-parity/--no-hf/--no-sweep/
--no-launch/--no-engine leave steps out. A part that raises is reported as an error in its
place and the run goes on. JSON goes to $OUT/device_check.json when $OUT is set (or to
--json), rewritten after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the device
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine_machine import decode_cost, device_rates  # noqa: E402
from device_check_engine import decode_cell, decode_prompt_len, engine_decode  # noqa: E402
from device_check_kernel import guarded, kernel_sweep  # noqa: E402
from device_check_parity import bf16_parity  # noqa: E402
from device_check_table import print_table  # noqa: E402

# Llama-3-8B and Llama-3.2-1B shapes (transformers LlamaConfig kwargs); "tiny" is the smoke model
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
               tie_word_embeddings=True),
    "tiny": dict(num_hidden_layers=2),
}
# tunings: the Triton kernel's (blocks per loop step, programs a decode launch splits up to),
# timed alone at kernel_cells (batch, context); warps_stages: (num_warps, num_stages) tried
# with the fastest of them; the engine then runs with the fastest of all
FULL = dict(batches=(1, 8, 32, 128), contexts=(512, 2048), prefill=2048, hf_batches=(1, 32), hf_new=32,
            hf_repeats=2, copy_bytes=4 << 30, square=8192, steps=10, block_size=16,
            tunings=((1, 128), (2, 128), (4, 128), (1, 512), (4, 512), (8, 512)), warps_stages=((4, 3), (8, 2), (8, 3)),
            kernel_cells=((1, 2048), (32, 2048), (128, 2048)),
            parity=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, init_std=0.02),
            parity_tokens=16)
SWEEP_BUDGET_S = 90.0      # the kernel sweep's share of the run: the engine's cells come after it
SMOKE = dict(batches=(2,), contexts=(24,), prefill=32, hf_batches=(2,), hf_new=8, hf_repeats=3,
             copy_bytes=16 << 20, square=256, steps=2, block_size=8, tunings=((1, 128), (2, 4)), warps_stages=((8, 3),),
             kernel_cells=((2, 24),), parity=dict(init_std=0.1),
             parity_tokens=4)


def versions() -> dict:
    """The installed versions the figures depend on (None where a package is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "torch", "transformers", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def model_config(name: str, dtype: str) -> dict:
    from fastserve_jax.models.random_checkpoint import hf_config_dict

    d = hf_config_dict("llama", **SHAPES[name])
    d["dtype"] = dtype
    return d


def hf_decode(hf_cfg: dict, dtype: str, batches, contexts, new: int, device: str, deadline: float,
              repeats: int = 2) -> dict:
    """transformers `generate` decode tokens/s per batch/context (device_check_engine.decode_cell)."""
    import torch
    import transformers

    tdtype = getattr(torch, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(tdtype)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(hf_cfg)).eval()
        torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for ctx in contexts:
        for b in batches:
            if time.perf_counter() > deadline:
                out[f"{b}x{ctx}"] = "skipped (time)"
                continue
            ids = torch.randint(3, hf_cfg["vocab_size"], (b, decode_prompt_len(ctx, new)), device=device)
            run = lambda n: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                           min_new_tokens=n, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                run(2)
                sync()
                out[f"{b}x{ctx}"] = decode_cell(lambda n: (run(n), sync()), b, ctx, new, repeats)
    model = run = None                     # frees the weights before empty_cache (the lambda holds it too)
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def random_params(model_cfg, dtype: str, seed: int = 0) -> dict:
    """Our param tree drawn on the device (normal * 0.02, norm scales 1): nothing on disk."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from fastserve_jax.models import param_shapes

    flat = flatten_dict(param_shapes(model_cfg, dtype))

    def draw(key):
        return {path: jnp.ones(s.shape, s.dtype) if path[-1] == "scale" else
                jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype) * jnp.asarray(0.02, s.dtype)
                for i, (path, s) in enumerate(flat.items())}

    out = jax.jit(draw)(jax.random.key(seed))
    return unflatten_dict(out)


def decode_launch(runner, kv, batch: int, context: int, vocab: int):
    """A decode launch built by the engine's builder: `batch` sequences of `context` tokens
    (the last one the query), their blocks allocated in `kv`."""
    from fastserve_jax.config import SamplingParams
    from fastserve_jax.request import Request
    from fastserve_jax.scheduler.base import ScheduledRequest

    items = []
    for i in range(batch):
        req = Request(f"d{batch}-{context}-{i}", [3 + (i + j) % (vocab - 3) for j in range(context)],
                      SamplingParams(max_tokens=1), 0.0)
        kv.allocate(req, context)
        req.num_computed_tokens = context - 1
        items.append(ScheduledRequest(req, 1))
    return runner.builder.build(items, kv)[0], items


def prefill_launch(runner, kv, tokens: int, vocab: int):
    from fastserve_jax.config import SamplingParams
    from fastserve_jax.request import Request
    from fastserve_jax.scheduler.base import ScheduledRequest

    req = Request(f"p{tokens}", [3 + j % (vocab - 3) for j in range(tokens)], SamplingParams(max_tokens=1), 0.0)
    kv.allocate(req, tokens)
    return runner.builder.build([ScheduledRequest(req, tokens)], kv), [req]


def time_launches(runner, launches, steps: int) -> float:
    """Seconds per forward of `launches` (dispatched back to back, the last one waited for)."""
    import jax

    for _ in range(2):
        jax.block_until_ready([runner.forward(ln) for ln in launches])
    t0 = time.perf_counter()
    for _ in range(steps):
        out = [runner.forward(ln) for ln in launches]
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def run_backend(backend: str, model_cfg, p: dict, dtype: str, rates: dict, platform: str, deadline: float) -> dict:
    """Every decode cell and the prefill for one attention backend, on a fresh model and cache."""
    import jax

    from fastserve_jax.config import EngineConfig
    from fastserve_jax.kv_cache import KVManager
    from fastserve_jax.kv_sizing import kv_block_bytes
    from fastserve_jax.runner.model_runner import ModelRunner
    from fastserve_jax.sharding.layout import ModelLayout

    bs = p["block_size"]
    max_len = max(max(p["contexts"]), p["prefill"])
    blocks = max(p["batches"]) * -(-max(p["contexts"]) // bs) + 1
    params = random_params(model_cfg, dtype)
    weight = sum(x.nbytes for x in jax.tree.leaves(params))
    cfg = EngineConfig(dtype=dtype, max_model_len=max_len, max_num_seqs=max(p["batches"]), block_size=bs,
                       max_num_batched_tokens=p["prefill"], num_device_blocks=blocks, attention_backend=backend,
                       decode_batch_buckets=tuple(p["batches"]), prefill_token_buckets=(p["prefill"],))
    cfg = cfg.resolve(weight, kv_block_bytes(model_cfg, cfg), platform)
    costs = {(b, c): decode_cost(model_cfg, params, b, c) for b in p["batches"] for c in p["contexts"]}
    runner = ModelRunner(params, model_cfg, cfg, blocks, ModelLayout(model_cfg), free_params=True)
    del params
    kv = KVManager(blocks, bs)
    cells = {}
    t0 = time.perf_counter()
    plan = [(b, c) for c in sorted(p["contexts"], reverse=True) for b in p["batches"]]
    launches = {}
    for b, c in plan:
        ln, items = decode_launch(runner, kv, b, c, model_cfg.vocab_size)
        launches[(b, c)] = ln
        for s in items:
            kv.free(s.request)
    pre, reqs = prefill_launch(runner, kv, p["prefill"], model_cfg.vocab_size)
    kv.free(reqs[0])
    runner.compiler.compile_now(sorted({ln.key for ln in launches.values()} | {ln.key for ln in pre}, key=str),
                                threads=min(16, os.cpu_count() or 1))
    compile_s = time.perf_counter() - t0
    for b, c in plan:
        if time.perf_counter() > deadline:
            cells[f"{b}x{c}"] = "skipped (time)"
            continue
        step = time_launches(runner, [launches[(b, c)]], p["steps"])
        cost = costs[(b, c)]
        roof = (cost["weight_bytes"] + cost["kv_bytes"]) / (rates["bandwidth_gbs"] * 1e9)
        cells[f"{b}x{c}"] = dict(batch=b, context=c, step_ms=1e3 * step, tokens_per_s=b / step,
                                 roofline_ms=1e3 * roof, roofline_fraction=roof / step,
                                 weight_bytes=cost["weight_bytes"], kv_bytes=cost["kv_bytes"])
    out = dict(backend=backend, compile_s=compile_s, decode=cells)
    if backend == "pallas" and platform != "tpu":
        from fastserve_jax.models.paged_attention import tuning
        out["tuning"] = tuning().describe()
    if time.perf_counter() < deadline:
        t = time_launches(runner, pre, p["steps"])
        n, c = p["prefill"], model_cfg
        # the layers for every token, the head for the logits rows, causal attention
        head = c.hidden_size * c.vocab_size
        flops = (2 * (costs[(p["batches"][0], p["contexts"][0])]["params_read"] - head) * n
                 + 2 * head * cfg.max_prefill_seqs + 2 * c.num_layers * c.num_heads * c.head_dim * n * (n + 1))
        out["prefill"] = dict(tokens=n, ms=1e3 * t, tflops=flops / t / 1e12,
                              peak_fraction=flops / t / 1e12 / rates["peak_tflops"])
    del runner
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes: checks the script runs")
    ap.add_argument("--model", choices=["8b", "1b"], default="8b")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip cells that would start after this")
    ap.add_argument("--backends", default=None, help="default: the platform's own backend first (pallas on GPU "
                    "and TPU, reference on CPU), so its engine cells come first within the budget")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-parity", action="store_true", help="skip the bf16 parity check (step 2)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip the kernel sweep (step 4): the tuning of FASTSERVE_JAX_TRITON_TUNING or the defaults")
    ap.add_argument("--no-launch", action="store_true", help="skip the launch cells (step 5)")
    ap.add_argument("--no-engine", action="store_true", help="skip the whole-engine cells (step 6)")
    ap.add_argument("--all-engines", action="store_true", help="step 6 on every backend, not only the platform's own")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    import jax
    import jax.numpy as jnp

    from fastserve_jax.models.config import ModelConfig
    from fastserve_jax.models.paged_attention import TUNING_ENV

    p, name = (SMOKE, "tiny") if a.smoke else (FULL, a.model)
    dev = jax.devices()[0]
    dtype = "bfloat16"
    path = a.json or (os.path.join(os.environ["OUT"], "device_check.json") if os.environ.get("OUT") else None)
    res = dict(device=f"{dev.device_kind} ({dev.platform})", model=name, dtype=dtype, jax=jax.__version__,
               versions=versions(), rates=device_rates(p["copy_bytes"], p["square"], jnp.bfloat16), hf={},
               kernel=None, ours={}, engine={}, timeline={})

    def save(part: str | None = None) -> None:  # after every part: a run cut short keeps what it measured
        res["seconds"] = time.perf_counter() - t_start
        if part:                                # seconds from the start at which each part ended
            res["timeline"][part] = round(res["seconds"], 1)
        if path:
            with open(path, "w") as f:
                json.dump(res, f, indent=1)

    save("rates")
    backends = (a.backends or ("pallas,reference" if dev.platform in ("gpu", "tpu") else "reference,pallas")).split(",")
    torch_device = "cuda" if dev.platform == "gpu" else "cpu"         # transformers' (a TPU's: the host)
    if not a.no_parity:
        res["parity"] = guarded("the bf16 parity check", bf16_parity, backends, p["parity"], torch_device,
                                p["parity_tokens"])
        save("parity")
    hf_cfg = model_config(name, dtype)
    if not a.no_hf:
        res["hf"] = guarded("transformers generate", hf_decode, hf_cfg, dtype, p["hf_batches"], p["contexts"],
                            p["hf_new"], torch_device, deadline, p["hf_repeats"])
        save("transformers")
    model_cfg = ModelConfig.from_dict(hf_cfg)
    engines = [] if a.no_engine else backends if a.all_engines else backends[:1]

    def sweep() -> None:                   # the TPU's kernel has no such knobs
        if "pallas" in backends and dev.platform != "tpu" and not a.no_sweep:
            res["kernel"] = guarded("the kernel sweep", kernel_sweep, model_cfg, p, dtype, res["rates"],
                                    min(deadline, time.perf_counter() + SWEEP_BUDGET_S))
            if res["kernel"].get("best_tuning"):               # Pallas cells after it run the fastest
                os.environ[TUNING_ENV] = ",".join(f"{k}={v}" for k, v in res["kernel"]["best_tuning"].items())
            save("kernel sweep")

    # the platform's own backend first (launch cells, then its engine, sync and "+async"), then
    # the kernel sweep, then the other backends: on a GPU the default path is measured, on the
    # kernel's defaults (the H200's pick), before the sweep takes its share of the time
    for i, b in enumerate(backends):
        if i == 1:
            sweep()
        if not a.no_launch:
            res["ours"][b] = guarded(f"the {b} backend", run_backend, b, model_cfg, p, dtype, res["rates"],
                                     dev.platform, deadline)
            save(f"launches {b}")
        for e in [b, b + "+async"] if b in engines else []:
            cells = res["engine"][e] = {}          # filled and saved cell by cell
            # a cell compiles its launches lazily: it starts only while its backend's whole compile
            # (step 5) still fits before the deadline, so the run stays within its time
            compile_s = res["ours"].get(b, {}).get("compile_s", 0.0)
            cells.update(guarded(f"the engine on {e}", engine_decode, e, model_cfg, lambda: random_params(model_cfg, dtype),
                                 dtype, p["hf_batches"], p["contexts"][:1], p["hf_new"], p["block_size"], p["prefill"],
                                 deadline - compile_s, p["hf_repeats"], cells, save))
            save(f"engine {e}")
    if len(backends) < 2:
        sweep()
    print_table(res)
    if path:
        print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
