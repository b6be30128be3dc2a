"""Proactive vs reactive swapping vs recomputation, under device-memory pressure, in one run.

Three parts, each printing its figures side by side:

1. engine: the real engine with the bundled demo model replays one slice of the Azure trace
   (counting prompts with the trace's output lengths,
   Poisson arrivals at several times what it serves: an overload burst) once per swap policy,
   with a device pool far smaller than the live KV. Every answer is checked, and compared with
   a last row whose pool holds all the requests' KV at once (nothing swaps or recomputes): the
   same answers, request by request. Reports mean/p99
   latency, latency per output token, throughput, swap traffic, and the share
   of loop time stalled waiting for swap copies.
2. copy: the swap copy path (kv_transfer.KVTransfer: jitted gather + device_put to pinned_host,
   and back with a donated scatter; on the CPU the gather writes into host memory itself) on
   a cache shaped like a 7B Llama's (32 layers, 8 KV heads of 128, float32), against the link
   alone as the engine measures it at start (probe_link) and numpy copies of the same bytes on
   this machine.
3. sim: the simulator at the paper's scale (OPT-13B on an A100 cost model, PCIe transfer
   model) on a longer slice of the trace, the same three policies.

    python scripts/bench_swap.py                     # all three parts
    python scripts/bench_swap.py --part copy --part sim
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastserve_jax import AZURE_TRACE  # noqa: E402
from fastserve_jax import LLM, SamplingParams  # noqa: E402
from fastserve_jax.slo import summarize  # noqa: E402
from fastserve_jax.workload import TraceRequest, load_trace  # noqa: E402
from fastserve_jax.models import demo_task  # noqa: E402

POLICIES = ("proactive", "reactive", "recompute")
TRACE = AZURE_TRACE        # shipped with the package (fastserve_jax/traces)
DEMO_MAX_TOKENS = 257   # the shipped demo model answers spans B - A <= 255: 256 numbers + EOS


def build_workload(trace: str, n: int, output_scale: float, seed: int, tokenizer):
    rows, _ = load_trace(trace)
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.choice(len(rows), n, replace=False)]
    out = []
    for r in picked:
        a, b = demo_task.pair_for_output_len(min(DEMO_MAX_TOKENS, max(2, round(r.output_tokens * output_scale))), rng)
        prompt = demo_task.make_prompt(a, b)
        out.append((prompt, (a, b), TraceRequest(0.0, len(tokenizer.encode(prompt)), demo_task.answer_num_tokens(a, b))))
    return out


def replay(llm: LLM, work, arrivals: list[float], policy: str) -> dict:
    """Feed requests at their arrival times (relative to now) while stepping the engine."""
    eng = llm.engine
    eng.set_scheduler(policy)
    start = time.monotonic()
    pending = sorted(range(len(work)), key=lambda i: arrivals[i])
    reqs = {}
    k = 0
    while k < len(pending) or eng.has_unfinished():
        now = time.monotonic() - start
        while k < len(pending) and arrivals[pending[k]] <= now:
            i = pending[k]
            prompt, _, tr = work[i]
            # max_tokens is the exact answer length: EOS ends every request there, and the
            # srpt oracle reads it as the true output length.
            reqs[i] = eng.add_request(prompt, SamplingParams(max_tokens=tr.output_tokens, temperature=0),
                                      arrival_time=start + arrivals[i])
            k += 1
        if eng.has_unfinished():
            eng.step()
        elif k < len(pending):
            time.sleep(max(0.0, arrivals[pending[k]] - (time.monotonic() - start)))
    done = [reqs[i] for i in range(len(work))]
    wrong = sum(not demo_task.check_answer(a, b, r.output_text) for r, (_, (a, b), _) in zip(done, work))
    m = summarize(done)
    m.update(wrong_answers=wrong, preemptions=sum(r.num_preemptions for r in done),
             texts=[r.output_text for r in done])
    return m




def part_engine(a) -> dict:
    from fastserve_jax.workload import with_arrivals

    out = {}
    kw = dict(max_model_len=512, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=256, block_size=16,
              num_device_blocks=a.device_blocks, num_host_blocks=a.host_blocks, scheduler="skip-join-mlfq",
              cost_model="demo-cpu", warmup="full")     # compiled before the replay: unwarmed, the first
                                                        # policy paid the compiles (0.60-0.77 s mean latency
                                                        # against 0.12-0.15 s warmed, 2026-12-02)
    work = None
    # The last row's pool holds every request's KV at once (nothing swaps or recomputes): the
    # answers the pressured rows must reproduce, request by request, on this backend.
    ample = None
    for policy in POLICIES + ("ample",):
        if policy == "ample":
            ample = 1 + sum(-(-(w[2].prompt_tokens + w[2].output_tokens) // 16) for w in work)
        llm = LLM(None, swap_policy="recompute" if policy == "ample" else policy,
                  **(kw | {"num_device_blocks": max(ample, a.max_num_seqs * 32 + 1)} if ample else kw))
        if work is None:
            work = build_workload(a.trace, a.num_requests, a.output_scale, a.seed, llm.tokenizer)
            arrivals = [t.arrival for t in with_arrivals([w[2] for w in work], a.rate, "poisson", 1.0, a.seed)]
        e = llm.engine
        m = replay(llm, work, arrivals, "skip-join-mlfq")
        st = e.stats
        loop = st.schedule + st.assemble + st.device + st.postprocess
        m.update(swap_out_blocks=st.swap_out_blocks, swap_in_blocks=st.swap_in_blocks,
                 swap_bytes=st.swap_out_bytes + st.swap_in_bytes, swap_ins_ahead=st.swap_ins_ahead,
                 swap_ins_on_demand=st.swap_ins_on_demand, swap_outs_ahead=st.swap_outs_ahead,
                 recomputations=st.recomputations, stall_share=st.swap_stall / loop if loop else 0.0,
                 iterations=st.iterations)
        out[policy] = m
    for m in out.values():
        m["differ_from_ample"] = sum(x != y for x, y in zip(m["texts"], out["ample"]["texts"]))
        del m["texts"]
    from fastserve_jax.kv_sizing import kv_block_bytes

    per_token = kv_block_bytes(e.model_cfg, e.cfg) / e.cfg.block_size
    kv_bytes = sum(w[2].prompt_tokens + w[2].output_tokens for w in work) * per_token
    print(f"\n== engine: demo model, {a.num_requests} trace requests at {a.rate} req/s, device pool "
          f"{a.device_blocks - 1} blocks x 16 tokens, host {a.host_blocks}, max_num_seqs {a.max_num_seqs} "
          f"(all requests' KV together: {kv_bytes / 1e6:.2f} MB)")
    for m in out.values():
        m["lpt_ms"] = m["mean_latency_per_token"] * 1e3
    _table(out, [("mean_jct", "mean lat s", 2), ("p99_jct", "p99 lat s", 2), ("lpt_ms", "ms/token", 1),
                 ("throughput_rps", "req/s", 3),
                 ("throughput_tps", "tok/s", 1), ("wrong_answers", "wrong", 0),
                 ("differ_from_ample", "differ", 0), ("recomputations", "recomp", 0),
                 ("swap_out_blocks", "blk out", 0), ("swap_ins_ahead", "in ahead", 0),
                 ("swap_ins_on_demand", "in demand", 0), ("stall_share", "stall %", 100)])
    return out


def part_copy(a) -> dict:
    import jax
    import jax.numpy as jnp

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from fastserve_jax.models.attention import KVCache
    from fastserve_jax.runner import kv_transfer
    from fastserve_jax.runner.compiler import run_jobs
    from fastserve_jax.runner.kv_transfer import KVTransfer

    L, BS, H, D, N = 32, 16, 8, 128, a.copy_blocks
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), PartitionSpec())
    shape = (L, 2 * N + 1, BS, H, D)
    cache = KVCache(jnp.ones(shape, jnp.float32, device=sharding), jnp.ones(shape, jnp.float32, device=sharding))
    block_bytes = 2 * L * BS * H * D * 4
    with kv_transfer.forced_copy_path(a.copy_path):
        t = KVTransfer([sharding], N, block_bytes, shape)
    run_jobs(t.compile_jobs([cache]))
    out_ids = tuple(range(1, N + 1))
    in_ids = tuple(range(N + 1, 2 * N + 1))
    nbytes = N * block_bytes
    times_out, times_in = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        t.swap_out([cache], "r", out_ids)
        while not t.out_landed("r"):
            time.sleep(0)
        times_out.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        [cache] = t.swap_in_now([cache], "r", in_ids)
        jax.block_until_ready(cache)
        times_in.append(time.perf_counter() - t0)
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    pool = np.ones((L, 2 * N + 1, BS * H * D), np.float32)
    memcpy, gather = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        memcpy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pool[:, 1:N + 1].copy()
        pool[:, 1:N + 1].copy()
        gather.append(time.perf_counter() - t0)
    gbs = lambda ts: nbytes / min(ts) / 1e9
    link = t.probe_link([cache])          # the engine's own start-up figure: the link alone
    res = dict(bytes=nbytes, memory_kind=t.memory_kind, swap_out_gbs=gbs(times_out), swap_in_gbs=gbs(times_in),
               memcpy_gbs=gbs(memcpy), numpy_slice_copy_gbs=gbs(gather),
               link_out_gbs=link.bytes_per_second("out") / 1e9, link_in_gbs=link.bytes_per_second("in") / 1e9)
    print(f"\n== copy: {N} blocks of {block_bytes / 1e6:.1f} MB ({nbytes / 1e9:.2f} GB) per swap, best of "
          f"{a.repeats}, host memory kind {t.memory_kind}")
    fused = t.fused(N)
    out_path, in_path = (("gather into host memory", "donated scatter from host") if fused else
                         ("gather + device_put to host", "device_put + donated scatter"))
    res["fused"] = fused
    print(f"  {'swap-out (' + out_path + ')':40} {res['swap_out_gbs']:6.2f} GB/s "
          f"= {res['swap_out_gbs'] / res['memcpy_gbs']:.2f}x memcpy")
    print(f"  {'swap-in  (' + in_path + ')':40} {res['swap_in_gbs']:6.2f} GB/s "
          f"= {res['swap_in_gbs'] / res['memcpy_gbs']:.2f}x memcpy")
    print(f"  the link alone (probe_link, the engine's) {res['link_out_gbs']:6.2f} GB/s out, "
          f"{res['link_in_gbs']:.2f} GB/s in")
    print(f"  numpy memcpy of the same bytes           {res['memcpy_gbs']:6.2f} GB/s")
    print(f"  numpy strided slice copy (K and V)       {res['numpy_slice_copy_gbs']:6.2f} GB/s")
    return res


def part_sim(a) -> dict:
    from fastserve_jax.config import SchedulerConfig
    from fastserve_jax.cost_model import CostModel
    from fastserve_jax.sim import SimConfig, simulate
    from fastserve_jax.workload import load_trace, with_arrivals

    cost = CostModel.load("opt-13b-a100")
    trace, _ = load_trace(a.trace, a.sim_requests)
    out = {}
    for rate in a.sim_rate:
        tr = with_arrivals(trace, rate, "poisson", 1.0, a.seed)
        for policy in POLICIES:
            cfg = SimConfig(max_num_seqs=32, max_num_batched_tokens=2048, kv_capacity_tokens=a.sim_device_tokens,
                            host_kv_capacity_tokens=a.sim_host_tokens, swap_policy=policy,
                            scheduler_config=SchedulerConfig(base_quantum=cost.decode_time(1)))
            m = simulate(tr, "skip-join-mlfq", cost, cfg).metrics()
            m["stall_share"] = m["swap_stall_seconds"] / m["swap_busy_seconds"]
            out[f"{policy} @ {rate}"] = m
    print(f"\n== sim: opt-13b-a100 cost model, PCIe {cost.swap_bandwidth / 1e9:.1f} GB/s, {a.sim_requests} Azure "
          f"requests, device KV {a.sim_device_tokens} tokens, host {a.sim_host_tokens}, skip-join MLFQ")
    _table(out, [("mean_jct", "mean lat s", 2), ("p99_jct", "p99 lat s", 2), ("throughput_rps", "req/s", 3),
                 ("preemptions", "recomp", 0), ("swap_blocks_out", "blk out", 0), ("swap_ins_ahead", "in ahead", 0),
                 ("swap_ins_on_demand", "in demand", 0), ("stall_share", "stall %", 100)])
    return out


def _table(rows: dict, cols: list[tuple[str, str, int]]) -> None:
    print(f"  {'':>18}" + "".join(f"{h:>11}" for _, h, _ in cols))
    for name, m in rows.items():
        cells = []
        for k, _, d in cols:
            v = m[k]
            cells.append(f"{v * 100:>10.2f}%" if d == 100 else f"{v:>11.{d}f}")
        print(f"  {name:>18}" + "".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", action="append", choices=["engine", "copy", "sim"])
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--output-scale", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=80.0,
                    help="engine part: requests/s (the default is several times what the engine serves)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--device-blocks", type=int, default=20, help="engine part: device pool incl. the null block")
    ap.add_argument("--host-blocks", type=int, default=400)
    ap.add_argument("--copy-blocks", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copy-path", choices=["backend", "fused", "device_put"], default="backend",
                    help="copy part: this backend's swap copies (default: by kv_transfer.FUSED_MAX_BYTES), or "
                         "force the fused gather/scatter through host memory or the jax.device_put path")
    ap.add_argument("--sim-requests", type=int, default=1000)
    ap.add_argument("--sim-rate", type=float, nargs="+", default=[0.6, 0.9])
    ap.add_argument("--sim-device-tokens", type=int, default=12000)
    ap.add_argument("--sim-host-tokens", type=int, default=120000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    parts = a.part or ["engine", "copy", "sim"]
    results = {p: globals()[f"part_{p}"](a) for p in parts}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
