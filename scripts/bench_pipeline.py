"""Pipeline structure: stage occupancy with 1 batch in flight against pp batches in flight,
and tokens/s of one device against tensor parallel, in one run.

FastServe keeps as many batches in flight as there are pipeline stages, so that while stage 1
works on batch A, stage 0 already works on batch B. This script serves the same greedy
workload (a random-weight Llama built here, no download) several ways and prints, from the
engine's own record of stage activity (sharding/pipeline.StageActivity):

  occ s0..   busy share of each stage over the run
  held       batches dispatched and not yet collected (time-weighted mean / max): the scheduler's view
  device     batches on the devices (first dispatch to last stage ready; mean / max)
  2+ busy    share of the time at least two stages computed at once
  tok/s      generated tokens per second of wall time (every run's outputs are checked equal)

On a CPU the "devices" are virtual and share the machine's cores, so occupancy and overlap
show the structure; the speed columns only mean something on real accelerators.

    python scripts/bench_pipeline.py                       # 8 virtual CPU devices
    python scripts/bench_pipeline.py --layers 8 --hidden 1024 --requests 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="per batch; with k batches in flight, k x this run")
    ap.add_argument("--cpu-devices", type=int, default=8, help="virtual CPU devices when there is no accelerator")
    ap.add_argument("--layouts", default="1x1,1x2,1x4,2x1,4x1,2x2",
                    help="TPxPP list; each pp > 1 layout runs with 1 and with pp batches in flight")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        jax.config.update("jax_num_cpu_devices", a.cpu_devices)
    except RuntimeError:
        pass
    from fastserve_jax import LLM, SamplingParams
    from fastserve_jax.models.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(tempfile.mkdtemp(prefix="bench-pipeline-"), "llama", num_hidden_layers=a.layers,
                                  hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4 // 64 * 64,
                                  num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                                  init_std=0.02)
    kw = dict(max_model_len=256, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=256, block_size=16,
              num_device_blocks=a.requests * 4 + 1, scheduler="mlfq", max_prefill_seqs=8)
    prompts = [[(11 * i + 5 * j) % (a.vocab - 1) + 1 for j in range(24 + (i * 7) % 40)] for i in range(a.requests)]
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
    runs = []
    for spec in a.layouts.split(","):
        tp, pp = (int(x) for x in spec.split("x"))
        if tp * pp > len(jax.devices()):
            print(f"skip {spec}: {tp * pp} devices wanted, {len(jax.devices())} visible", file=sys.stderr)
            continue
        for k in sorted({1, pp}):
            llm = LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, batches_in_flight=k,
                      record_stage_activity=True, **kw)
            llm.generate(prompts[:4], sp)                       # touch every path once
            act = llm.engine.runner.activity
            act.reset()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp)
            wall = time.perf_counter() - t0
            s = act.summary()
            toks = sum(len(o.token_ids) for o in outs)
            runs.append(dict(tp=tp, pp=pp, in_flight=k, wall_s=wall, tokens=toks, tok_s=toks / wall,
                             outputs=[o.token_ids for o in outs], **s))
            print(f"  tp={tp} pp={pp} in flight {k}: {wall:.2f} s", file=sys.stderr, flush=True)
            del llm
    ref = runs[0]["outputs"]
    print(f"\nrandom Llama: {a.layers} layers, hidden {a.hidden}, {a.heads} heads / {a.kv_heads} KV heads, vocab "
          f"{a.vocab}; {a.requests} greedy requests x {a.max_tokens} tokens; {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices ({jax.devices()[0].device_kind})")
    print(f"{'tp':>3} {'pp':>3} {'k':>2} {'occ per stage':<28} {'mean':>5} {'held':>9} {'device':>9} {'2+ busy':>8} "
          f"{'tok/s':>8} {'same':>5}")
    for r in runs:
        occ = " ".join(f"{o:.2f}" for o in r["occupancy"])
        print(f"{r['tp']:>3} {r['pp']:>3} {r['in_flight']:>2} {occ:<28} {r['mean_occupancy']:>5.2f} "
              f"{r['held_in_flight_mean']:>4.2f}/{r['held_in_flight_max']:<4} "
              f"{r['batches_in_flight_mean']:>4.2f}/{r['batches_in_flight_max']:<4} "
              f"{r['time_with_2plus_stages_busy']:>8.2f} {r['tok_s']:>8.1f} {str(r['outputs'] == ref):>5}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "outputs"} for r in runs], f, indent=1)
    return 0 if all(r["outputs"] == ref for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
