"""FastServe's gains on the real engine, and how well the simulator predicts them, in one run.

1. A/B over HTTP: `fastserve-jax serve` with the bundled demo model in interleaved pairs
   (fcfs, skip-join-mlfq, fcfs, ...; every run a fresh server), all on the same burst:
   --num-requests counting prompts with chat-like output lengths (2..257 tokens, skewed short
   with a long tail: workload.chat_output_lengths), Poisson arrivals at --overload times the
   capacity a probe measures (max-num-seqs clients in a closed loop on an fcfs server), a
   device KV pool of a quarter of the burst's live KV (workload.burst_pool_blocks; below the
   burst's peak, so it binds), a host pool that holds all of it, proactive swapping. Every
   answer is checked token for token; one wrong or failed answer stops the run.
2. Simulator fidelity: fastserve_jax.sim on the same requests (prompt tokens as the tokenizer
   makes them, output tokens = the exact answer's, the same arrival times), limits and pools,
   with the cost model profiled at the start of the run (every launch shape, on a fully
   warmed local engine; cached under the servers' key, so the skip-join servers use it too) and
   swap copy times (and the host time to issue one) measured on the engine's copy path, next
   to the engine's medians: first the model alone (the profile, the copies, and the host time
   of the policy's own calls as the simulator runs them), then calibrated on the fcfs servers'
   counters, read from /metrics before each server stops (sim_fidelity.calibrated): the
   launches scaled to their device phase (fastserve_iteration_phase_seconds_total), the
   policy's host time to their schedule phase, and a per-iteration overhead solved so the
   simulated fcfs mean seconds per iteration equal theirs (fastserve_busy_seconds_total /
   fastserve_iterations_total). Only fcfs is fitted; skip-join-mlfq is a held-out prediction.
3. The same burst on in-process engines (no HTTP server or client on the cores), fcfs and
   skip-join-mlfq alternating, --in-process-rounds runs each, their medians against the
   model alone and then calibrated the same way on the in-process fcfs runs, with each
   figure's run-to-run range and the engine's split of an iteration into scheduling,
   assembling, device and postprocessing time.

    python scripts/bench_preemption.py                             # 3 pairs of 400 requests
    python scripts/bench_preemption.py --pairs 5 --json out.json
    python scripts/bench_preemption.py --rate 30                   # skip the capacity probe
    python scripts/bench_preemption.py --in-process-rounds 5       # steadier in-process medians

The first server start compiles for minutes; later ones read ~/.cache/fastserve_jax. Client
latencies include HTTP, tokenizing and streaming; the busy counter covers the engine's step
(scheduling through appending tokens) but not the detokenizing and hand-off to the event
loop between steps, so that part stays outside the calibrated overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastserve_jax.cost_profile import profile_engine  # noqa: E402
from fastserve_jax.slo import PAPER_SLOS  # noqa: E402
from fastserve_jax.stats import PHASES  # noqa: E402
from fastserve_jax.workload import TraceRequest, burst_pool_blocks, kv_blocks, with_arrivals  # noqa: E402
from fastserve_jax.models import demo_task  # noqa: E402
from fastserve_jax.serve import bench_client  # noqa: E402
from fastserve_jax.serve.bench_answers import answer_problems, raise_on_problems, screen_pairs  # noqa: E402
from fastserve_jax.serve.bench_cmd import TRACE, LaunchedServer, build_workload, slo_figures  # noqa: E402
# part 2, the simulator against the engine, next to this script (scripts/ is on sys.path when it runs)
from sim_fidelity import (POLICIES, calibrated, engine_shape, measure_swap, servers_cost_model,  # noqa: E402
                          simulator_fidelity)
from sim_fidelity_in_process import in_process_fidelity  # noqa: E402

# (key, label, scale): the figures of one run, as the A/B table prints them
FIGURES = [("throughput_rps", "served req/s", 1), ("throughput_tps", "served tok/s", 1),
           ("mean_latency_per_token", "ms per token", 1e3), ("e2e_mean", "JCT mean s", 1), ("e2e_p99", "JCT p99 s", 1),
           ("ttft_mean", "TTFT mean s", 1), ("ttft_p99", "TTFT p99 s", 1),
           ("server_ttft_mean", "TTFT server mean s", 1),      # from the handler's start, not the send
           ("server_e2e_mean", "JCT server mean s", 1),        # handler's start to the engine's last token
           ("server_tpot_mean", "TPOT server ms", 1e3),       # the engine's own token times
           ("server_handoff_mean", "hand-off server ms", 1e3)]  # handler's start to the engine's add_request
# Prometheus counters of one server, differenced around the burst
COUNTERS = {"iterations": "fastserve_iterations_total", "busy_seconds": "fastserve_busy_seconds_total",
            "swap_stall_seconds": "fastserve_swap_stall_seconds_total",
            "recomputations": "fastserve_recomputations_total",
            "swap_out_blocks": 'fastserve_swap_blocks_total{direction="out"}',
            "swap_in_blocks": 'fastserve_swap_blocks_total{direction="in"}',
            # the server's own TTFT (from its request handler's start), against the client's (from the send)
            "server_ttft_sum": "fastserve_time_to_first_token_seconds_sum",
            "server_ttft_count": "fastserve_time_to_first_token_seconds_count",
            "server_e2e_sum": "fastserve_e2e_request_latency_seconds_sum",
            "server_e2e_count": "fastserve_e2e_request_latency_seconds_count",
            "server_tpot_sum": "fastserve_time_per_output_token_seconds_sum",
            "server_tpot_count": "fastserve_time_per_output_token_seconds_count",
            "server_handoff_sum": "fastserve_request_handoff_seconds_sum",
            "server_handoff_count": "fastserve_request_handoff_seconds_count",
            # where the iterations' time goes; the simulator's calibration reads the device phase
            **{f"{k}_seconds": f'fastserve_iteration_phase_seconds_total{{phase="{k}"}}' for k in PHASES}}
THROUGHPUT_TARGET, LATENCY_TARGET = 0.95, 1.5       # skip-join/fcfs served req/s; fcfs/skip-join ms per token


# ----------------------------------------------------------------------------- pure helpers (tested)

def paired_medians(runs: list[dict], key: str, base: str = "fcfs", other: str = "skip-join-mlfq") -> dict:
    """runs: [{mode: figures}] one per pair. Per mode the median of `key` over pairs, and the
    median over pairs of each pair's other / base ratio (each pair ran under the same load
    from the machine's other jobs, so its ratio is the paired measurement), and of base / other
    (`inverse`: with an even number of pairs not 1 / ratio, the middle two being averaged)."""
    per = {p: [r[p][key] for r in runs] for p in (base, other)}
    return dict({p: statistics.median(v) for p, v in per.items()},
                ratio=statistics.median(o / b for b, o in zip(per[base], per[other])),
                inverse=statistics.median(b / o for b, o in zip(per[base], per[other])))


def parse_counters(text: str) -> dict[str, float]:
    """COUNTERS' values from a Prometheus text exposition; raises if one is missing."""
    values = {}
    for name, series in COUNTERS.items():
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
        if m is None:
            raise ValueError(f"/metrics has no {series}; the server's metric names changed")
        values[name] = float(m.group(1))
    return values


# ----------------------------------------------------------------------------- engine runs

def serve_burst(policy: str, argv: list[str], warm, work, arrivals, concurrency: int | None = None,
                serve_argv: tuple[str, ...] = ()) -> dict:
    """One fresh server: warm it with two requests, send the burst, check every answer.
    `serve_argv`: server options beside the engine's (e.g. --engine-process)."""
    # every request of the burst is admitted (the server's default queue of 256 refuses the rest
    # of a larger burst with 503s)
    # and fully warmed, as the in-process engines: a server still loading its shapes in the
    # background served the burst at half the rate (ms per iteration 17-19 against 7)
    server = LaunchedServer(policy, argv + ["--warmup", "full", "--max-pending", str(max(256, len(work) + len(warm))),
                                            *serve_argv])
    t0 = time.monotonic()
    try:
        server.wait_ready()
        ready = time.monotonic() - t0
        health = json.loads(asyncio.run(bench_client.request(server.url, "GET", "/health"))[2])
        if health.get("scheduler") != policy:
            raise RuntimeError(f"asked for scheduler {policy}, the server runs {health.get('scheduler')}")
        bad = answer_problems(asyncio.run(bench_client.run_load(server.url, [w[0] for w in warm])), warm, "warm-up")
        before = parse_counters(asyncio.run(bench_client.request(server.url, "GET", "/metrics"))[2].decode())
        results = asyncio.run(bench_client.run_load(server.url, [w[0] for w in work], arrivals, concurrency))
        after = parse_counters(asyncio.run(bench_client.request(server.url, "GET", "/metrics"))[2].decode())
    finally:
        server.stop()
    raise_on_problems(policy, server.log.name, bad + answer_problems(results, work))
    server.discard_log()
    m = bench_client.summarize(results)
    # per request, in the burst's order: how late the client sent it (its open loop shares the
    # cores), then TTFT and JCT from the send, and tokens; what the simulator is held against
    if arrivals is not None:
        m["per_request"] = [[round(r.sent - r.due, 5), round(r.chunk_times[0] - r.sent, 5),
                             round(r.end - r.sent, 5), r.completion_tokens] for r in results]
    m.update(slo_figures(results, PAPER_SLOS))
    m.update({k: after[k] - before[k] for k in COUNTERS}, server_ready_seconds=ready)
    m["iteration_seconds"] = m["busy_seconds"] / m["iterations"]
    for k in PHASES:
        m[f"{k}_seconds_per_iteration"] = m.pop(f"{k}_seconds") / m["iterations"]
    for key in ("server_ttft", "server_e2e", "server_tpot", "server_handoff"):
        m[f"{key}_mean"] = m.pop(f"{key}_sum") / max(m.pop(f"{key}_count"), 1.0)
    return m


def local_engine(argv: list[str], policy: str = "fcfs", warmup: str = "lazy"):
    """An in-process LLM with the servers' engine options (and their compiled executables,
    through the persistent cache): with fcfs it screens the pairs (bench_answers.screen_pairs),
    then gives the simulator the servers' cost model and this machine's swap copy times; last,
    each policy serves the burst in process (sim_fidelity_in_process.in_process_fidelity)."""
    from fastserve_jax import LLM
    from fastserve_jax.serve.engine_args import engine_kwargs, parse_engine_args

    # each run learns its output lengths afresh, as the servers (LaunchedServer) and the
    # simulator do, not from whatever traffic this user's cache last saw (policy_state.py)
    os.environ.setdefault("FASTSERVE_JAX_LENGTHS_DIR", "off")
    return LLM(None, **engine_kwargs(parse_engine_args([*argv, "--scheduler", policy, "--warmup", warmup])))


@dataclass
class Burst:
    """The burst both benchmarks serve, its engine options, and a warmed local fcfs engine."""

    work: list
    warm: list
    probe: list
    prompt_tokens: list[int]
    outputs: list[int]
    sized: list[TraceRequest]
    live: int
    pool: int
    argv: list[str]
    replaced: int
    llm: object


def burst_setup(a: argparse.Namespace) -> Burst:
    """Requests, pools and engine options from `a` (add_burst_args), the cost model profiled
    on a local engine, and the pairs the demo model misses replaced (screen_pairs)."""
    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_model_path())
    work, _ = build_workload(a.trace, a.num_requests, 1.0, False, 1.0, a.seed, "chat")
    prompt_tokens = [len(tok.encode(w[0]["prompt"])) for w in work]
    outputs = [demo_task.answer_num_tokens(a_, b_) for _, (a_, b_) in work]
    sized = [TraceRequest(0.0, p, o) for p, o in zip(prompt_tokens, outputs)]
    live = sum(kv_blocks(sized, a.block_size))
    pool = burst_pool_blocks(sized, a.block_size, a.pool_fraction)
    argv = ["--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens", str(a.max_num_batched_tokens),
            "--block-size", str(a.block_size), "--num-device-blocks", str(pool + 1),     # + the null block
            "--num-host-blocks", str(live), "--swap-policy", "proactive"] + \
        ([] if a.protect_decodes else ["--no-protect-decodes"]) + ([] if a.async_scheduling else ["--no-async-scheduling"])
    print(f"burst: {a.num_requests} counting prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens, outputs "
          f"{min(outputs)}-{max(outputs)} tokens (median {statistics.median(outputs):g}, mean "
          f"{statistics.mean(outputs):.1f}); live KV {live} blocks of {a.block_size}, device pool {pool} usable "
          f"blocks ({pool / live:.0%}; the largest request needs {max(kv_blocks(sized, a.block_size))}), host pool "
          f"{live}\nengine: {' '.join(argv)}", flush=True)
    warm, _ = build_workload(a.trace, 2, 1.0, False, 1.0, a.seed + 1, "chat")
    probe, _ = build_workload(a.trace, a.capacity_requests, 1.0, False, 1.0, a.seed + 2, "chat")
    llm = local_engine(argv, warmup="full")
    # The cost model is measured now, every shape at its own bucket, and cached under the
    # servers' key, so the servers' policies and the simulator both use this hour's machine (a
    # profile cached earlier had this VM at another speed: the in-process engine then ran 25%
    # faster than the simulator said). The median of 9 runs per point, not the engine's 3: one
    # slow (32 rows, 16 blocks) sample set the context coefficient 30% high once, and fcfs runs
    # mostly that launch.
    profile_engine(llm.engine, repeats=9, refresh=True)
    (work, warm, probe), replaced = screen_pairs(llm, [work, warm, probe], a.seed)
    if [len(tok.encode(w[0]["prompt"])) for w in work] != prompt_tokens:
        raise RuntimeError("a replacement pair tokenizes to another prompt length; the pool was sized without it")
    print(f"screened: {replaced} of {len(work) + len(warm) + len(probe)} pairs replaced by pairs of the same span "
          "(the demo model missed them on a local fcfs engine)", flush=True)
    return Burst(work, warm, probe, prompt_tokens, outputs, sized, live, pool, argv, replaced, llm)


def add_burst_args(ap: argparse.ArgumentParser) -> None:
    # 400, the simulator's burst (scripts/repro_fastserve.py): a burst of 120 at 3.5x the probed
    # capacity arrives within 0.6 s, about four batches, too little queueing for any ranking to
    # matter much (docs/scheduling_log.md, "The real engine")
    ap.add_argument("--num-requests", type=int, default=400, help="requests in the burst (default 400)")
    ap.add_argument("--overload", type=float, default=3.5, help="arrival rate as a multiple of the probed capacity")
    ap.add_argument("--rate", type=float, default=None, help="arrival rate in requests/s (skips the capacity probe)")
    ap.add_argument("--capacity-requests", type=int, default=64, help="requests of the capacity probe (default 64)")
    # 0.25: with 0.45 of the default burst's live KV the pool never filled (requests finish while
    # others arrive: the simulator puts the peak at 36%), so nothing was swapped
    ap.add_argument("--pool-fraction", type=float, default=0.25,
                    help="usable device KV blocks as a fraction of the burst's live KV (< 0.5; default 0.25)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-protect-decodes", dest="protect_decodes", action="store_false",
                    help="skip-join as the paper has it (serve --no-protect-decodes), here and in the simulator")
    ap.add_argument("--seed", type=int, default=0, help="seed of the requests and arrivals")
    ap.add_argument("--trace", default=TRACE, help="the request trace (default: the shared Azure conversation trace)")
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                    help="every engine (both policies' servers, the in-process runs) without async scheduling, the "
                         "loop the simulator models (by default they schedule asynchronously)")


def burst_rate(a: argparse.Namespace, b: Burst) -> tuple[float | None, float]:
    """(probed capacity or None, the burst's arrival rate): --rate, or --overload x the
    capacity an fcfs server serves to max-num-seqs clients in a closed loop."""
    if a.rate is not None:
        return None, a.rate
    # a full warm-up: with a cold compilation cache the probe otherwise times the background
    # compiles of a lazy start (4.5 req/s instead of 65-71 on the demo model); it also fills
    # the cache for every server after it
    m = serve_burst("fcfs", b.argv + ["--warmup", "full"], b.warm, b.probe, None, concurrency=a.max_num_seqs)
    capacity = m["throughput_rps"]
    print(f"capacity probe (fcfs, {a.capacity_requests} requests, {a.max_num_seqs} clients in a closed loop): "
          f"{capacity:.2f} req/s, {m['throughput_tps']:.0f} tok/s", flush=True)
    return capacity, a.overload * capacity


# ----------------------------------------------------------------------------- printing

def print_paired(runs: list[dict], figures: list[tuple[str, str, float]], base: str, other: str,
                 heads: tuple[str, str, str]) -> dict:
    """A table of `figures`: per pair base, other and other/base, then the paired medians."""
    width = max(len(label) for _, label, _ in figures) + 2
    print(f"{'':{width}s}" + "".join(f"{f'pair {i + 1}':>27s}" for i in range(len(runs))) + f"{'median':>27s}")
    print(f"{'':{width}s}" + "".join(f"{h:>9s}" for h in heads) * (len(runs) + 1))
    medians = {}
    for key, label, scale in figures:
        line = f"{label:{width}s}"
        for r in runs:
            b, o = r[base][key], r[other][key]
            line += f"{scale * b:9.4g}{scale * o:9.4g}{o / b:9.3f}"
        medians[key] = med = paired_medians(runs, key, base, other)
        line += f"{scale * med[base]:9.4g}{scale * med[other]:9.4g}{med['ratio']:9.3f}"
        print(line)
    return medians


def print_ab(runs: list[dict]) -> dict:
    medians = print_paired(runs, FIGURES, "fcfs", "skip-join-mlfq", ("fcfs", "sj", "sj/fcfs"))
    swaps = " ".join(f"{int(r[p]['swap_out_blocks'])}/{int(r[p]['swap_in_blocks'])}" for r in runs for p in POLICIES)
    print(f"(client-side, over HTTP; sj = skip-join-mlfq; median column: median over pairs, and the median of the "
          f"per-pair ratios. blocks swapped out/in per run, fcfs sj per pair: {swaps})")
    thr, lat = medians["throughput_rps"]["ratio"], medians["mean_latency_per_token"]["inverse"]
    print(f"targets: skip-join served req/s within 5% of fcfs: {thr:.3f}x "
          f"({'met' if thr >= THROUGHPUT_TARGET else 'MISSED'}); latency per token >= 1.5x better: {lat:.2f}x "
          f"({'met' if lat >= LATENCY_TARGET else 'MISSED'})")
    return medians


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved fcfs / skip-join runs (default 3)")
    add_burst_args(ap)
    ap.add_argument("--engine-process", action="store_true",
                    help="serve with the engine in a process of its own (serve --engine-process)")
    ap.add_argument("--in-process-rounds", type=int, default=3,
                    help="alternating in-process runs per policy for the simulator comparison (default 3; medians)")
    ap.add_argument("--json", default="bench_preemption.json", help="where the figures go")
    a = ap.parse_args()
    if a.pairs < 1 or a.in_process_rounds < 1 or a.num_requests < 2 or a.capacity_requests < 1 or not a.overload > 0:
        ap.error("--pairs, --in-process-rounds, --capacity-requests >= 1, --num-requests >= 2 and --overload > 0")
    t_start = time.monotonic()
    b = burst_setup(a)
    work, warm, argv, llm = b.work, b.warm, b.argv, b.llm
    prompt_tokens, outputs, sized, live, pool, replaced = (b.prompt_tokens, b.outputs, b.sized, b.live, b.pool,
                                                           b.replaced)
    out = dict(args=vars(a), engine_argv=argv, live_kv_blocks=live, pool_blocks=pool, screened_replaced=replaced,
               workload=dict(pairs=[w[1] for w in work], prompt_tokens=prompt_tokens, output_tokens=outputs), runs=[])
    try:
        capacity, rate = burst_rate(a, b)
        arrivals = [r.arrival for r in with_arrivals(sized, rate, seed=a.seed)]       # as bench draws them
        out.update(capacity_rps=capacity, rate=rate, arrivals=arrivals)
        print(f"arrivals: Poisson at {rate:.2f} req/s, the last at {arrivals[-1]:.1f} s", flush=True)
        for i in range(a.pairs):
            pair = {}
            for policy in POLICIES:
                pair[policy] = m = serve_burst(policy, argv, warm, work, arrivals,
                                               serve_argv=("--engine-process",) if a.engine_process else ())
                print(f"  pair {i + 1} {policy}: {m['throughput_rps']:.2f} req/s, "
                      f"{1e3 * m['mean_latency_per_token']:.1f} ms/token, JCT mean {m['e2e_mean']:.2f} s "
                      f"(server ready in {m['server_ready_seconds']:.0f} s)", flush=True)
            out["runs"].append(pair)
    except RuntimeError as e:
        out["error"] = str(e)
        _write(a.json, out, t_start)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n== A/B: fcfs vs skip-join-mlfq on the real engine (demo model, over HTTP)")
    out["medians"] = medians = print_ab(out["runs"])
    trace = [TraceRequest(t, p, o) for t, p, o in zip(arrivals, prompt_tokens, outputs)]
    path = servers_cost_model(llm.engine)
    shape, swap = engine_shape(llm.engine), measure_swap(llm.engine)
    out.update(simulator_fidelity(shape, path, swap, trace, out["runs"], medians, a.max_num_seqs))
    del llm
    b.llm = None
    build = lambda policy: local_engine(argv, policy, "full")             # noqa: E731  (nothing compiles mid-burst)
    out["in_process"] = in_process_fidelity(build, work, arrivals, out["sim"], a.in_process_rounds,
                                            lambda fcfs: calibrated(shape, trace, swap, fcfs))
    out["phase_stretch"] = print_phase_stretch(out["runs"], out["in_process"]["engine"])
    _write(a.json, out, t_start)
    return 0


def print_phase_stretch(runs: list[dict], in_process: dict) -> dict:
    """Each policy's ms per iteration by phase on the servers (median over runs) against the
    in-process engine: where the HTTP server's share of the cores and of the GIL lands (a
    phase that releases the GIL, as one issuing copies, loses it to the event loop; docs/
    scheduling.md, "Why skip-join's servers stretch more than fcfs's")."""
    keys = [f"{p}_seconds_per_iteration" for p in PHASES] + ["iteration_seconds"]
    table = {}
    print("\n== ms per iteration by phase: servers (median) / in process")
    for policy in POLICIES:
        row = {k: (statistics.median(r[policy][k] for r in runs), in_process[policy][k]) for k in keys
               if all(k in r[policy] for r in runs) and k in in_process[policy]}
        table[policy] = {k: dict(servers=v[0], in_process=v[1]) for k, v in row.items()}
        print(f"{policy:15s} " + "  ".join(f"{k.split('_')[0]} {1e3 * v[0]:.3f} / {1e3 * v[1]:.3f}"
                                            for k, v in row.items()))
    return table


def _write(path: str, out: dict, t_start: float) -> None:
    out["wall_seconds"] = time.monotonic() - t_start
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(f"\nwall time {out['wall_seconds']:.0f} s; figures in {path}")


if __name__ == "__main__":
    sys.exit(main())
