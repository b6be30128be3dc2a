"""Simulator fidelity, part 2 of scripts/bench_preemption.py: fastserve_jax.sim on the burst the
real engine served, with the servers' cost model and swap copy times measured on the engine's
copy path, held against the engine's medians; first the model alone (the profile, the copies'
link and issue times, the policy's own host time), then calibrated on fcfs's iteration phases
(skip-join-mlfq held out; `calibrated`), and with the HTTP front end measured on fcfs added. The
in-process engines are in sim_fidelity_in_process.py; the server runs, the A/B table and the
command line stay in bench_preemption.py.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from fastserve_jax.workload import TraceRequest
from sim_by_length import by_length, print_by_length

# The A/B's two policies: the calibration fits fcfs; skip-join-mlfq is the held-out prediction
POLICIES = ("fcfs", "skip-join-mlfq")
# (engine figure, simulator figure, label, scale): what the simulator is held against
FIDELITY = [("e2e_mean", "mean_jct", "JCT mean s", 1), ("mean_latency_per_token", "mean_latency_per_token",
                                                        "ms per token", 1e3),
            ("e2e_p99", "p99_jct", "JCT p99 s", 1), ("ttft_mean", "mean_ttft", "TTFT mean s", 1),
            ("throughput_rps", "throughput_rps", "served req/s", 1), ("iterations", "iterations", "iterations", 1),
            ("iteration_seconds", "iteration_seconds", "ms per iteration", 1e3),
            ("swap_out_blocks", "swap_blocks_out", "blocks swapped out", 1)]
# the in-process figures whose run-to-run range is printed
SPREAD = ("e2e_mean", "mean_latency_per_token", "throughput_rps", "iteration_seconds")


# ----------------------------------------------------------------------------- pure helpers (tested)

def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    if not measured > 0:
        raise ValueError(f"the measured value must be > 0 to compare against, got {measured!r}")
    return (predicted - measured) / measured


def fidelity_rows(real: dict, sim: dict, tolerance: float = 0.15) -> list[dict]:
    """Per FIDELITY figure present in both: the engine's value, the simulator's, the relative
    error of the simulator's, and whether it is within `tolerance`."""
    rows = []
    for rk, sk, label, scale in FIDELITY:
        if rk in real and sk in sim and real[rk] > 0:
            err = relative_error(sim[sk], real[rk])
            rows.append(dict(figure=label, scale=scale, real=real[rk], sim=sim[sk], rel_err=err,
                             within=abs(err) <= tolerance))
    return rows


def calibrate_overhead(measured: float, sim_mean, xtol: float = 1e-7, max_rounds: int = 30) -> float:
    """The per-iteration host overhead x >= 0 (seconds) at which the simulator's mean seconds
    per iteration, sim_mean(x), equal the engine's `measured` mean.

    sim_mean rises about linearly in x (slope near 1, bent by the batches a slower clock lets
    form, and by swap stalls), so secant steps (the first with slope 1) converge in a few
    simulations. A bracket of the points below and above
    `measured` catches the jumps of discrete schedules: a step outside it is replaced by its
    midpoint. Returns 0 if the profile alone already reaches `measured`."""
    if not measured > 0:
        raise ValueError(f"the measured seconds per iteration must be > 0, got {measured!r}")
    lo, hi, x, prev = 0.0, float("inf"), 0.0, None
    for _ in range(max_rounds):
        f = sim_mean(x)
        if f >= measured and x == 0.0:
            return 0.0
        lo, hi = (x, hi) if f < measured else (lo, x)
        slope = (f - prev[1]) / (x - prev[0]) if prev and x != prev[0] and f != prev[1] else 1.0
        step = x + (measured - f) / slope if slope > 0 else (lo + hi) / 2
        if not lo < step < hi:
            step = (lo + hi) / 2
        if abs(step - x) <= xtol:
            return step
        prev, x = (x, f), step
    raise RuntimeError(f"no overhead within {xtol:g} s after {max_rounds} simulations (last {x:.6g} s gave "
                       f"{f:.6g} s per iteration, the engine {measured:.6g} s)")


# ----------------------------------------------------------------------------- the engine's cost model and swap copy times

def servers_cost_model(eng) -> str:
    """Give `eng` the cost model the skip-join servers profiled (same engine options, so the
    same cache key); returns its path. Raises if it is not cached: the simulator must run on
    the servers' model, not on one profiled here."""
    from fastserve_jax.cost_profile import cost_cache_key
    from fastserve_jax.models.loader import cache_root

    path = os.path.join(cache_root() or "", "cost_models", f"{cost_cache_key(eng)}.json")
    if not os.path.isfile(path):
        raise RuntimeError(f"no cached cost model at {path}: the skip-join servers profiled under another key")
    eng.set_scheduler("skip-join-mlfq")          # loads the cached profile
    return path


def measure_swap(eng, sizes=(1, 2, 4, 8, 16), repeats: int = 7) -> tuple[float, float, float]:
    """(latency s, bandwidth bytes/s, issue s) of one copy on the engine's swap path: half the
    median time of a swap-out (gather, device-to-host, until it lands) and swap-in
    (host-to-device, scatter) of each size, fitted as latency + bytes / bandwidth (least
    squares); and the median host time to issue one request's copy (half the sum of the
    swap-out call, the swap-in's start and its landing call, each until it returns, over every
    size): what the engine's thread spends per request it moves, beside the copy itself."""
    import jax
    import numpy as np

    from fastserve_jax.kv_sizing import kv_block_bytes

    swaps, ys, issue = eng.runner.swaps, [], []
    for n in sizes:
        samples = []
        for i in range(repeats + 1):                  # the first call of a size may compile: untimed
            blocks = [("probe", tuple(range(1, n + 1)))]
            t0 = time.perf_counter()
            swaps.swap_out(blocks)
            t1 = time.perf_counter()
            while not swaps.transfer.out_landed("probe"):
                time.sleep(0)
            t2 = time.perf_counter()
            swaps.start_swap_in(blocks)
            t3 = time.perf_counter()
            while not swaps.transfer.in_landed("probe"):
                time.sleep(0)
            t4 = time.perf_counter()
            swaps.land("probe")                       # dispatches the scatter into the cache
            t5 = time.perf_counter()
            jax.block_until_ready(eng.runner.caches)
            samples.append((time.perf_counter() - t0) / 2)      # one copy each way
            if i:
                issue.append((t1 - t0 + t3 - t2 + t5 - t4) / 2)
        ys.append(statistics.median(samples[1:]))
    slope, latency = np.polyfit([n * kv_block_bytes(eng.model_cfg, eng.cfg) for n in sizes], ys, 1)
    # a copy of these few kilobytes is all launch overhead; a slope lost in noise reads as free bytes
    return max(0.0, float(latency)), float(1.0 / slope) if slope > 0 else float("inf"), statistics.median(issue)


# ----------------------------------------------------------------------------- simulator

def scaled_launches(cost, speed: float):
    """`cost` with every launch time (the prefill and decode tables and both context
    coefficients) multiplied by `speed`; the swap figures and the host overhead unchanged."""
    import dataclasses

    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed!r}")
    return dataclasses.replace(cost, prefill_seconds=tuple(speed * t for t in cost.prefill_seconds),
                               decode_seconds=tuple(speed * t for t in cost.decode_seconds),
                               decode_context=speed * cost.decode_context, prefill_context=speed * cost.prefill_context)


def front_end_offsets(fcfs: dict) -> tuple[float, float] | None:
    """(TTFT, JCT) seconds the HTTP path adds to the engine's, from the fcfs servers' medians:
    the client's figure less the server's (the client's send to the handler's start, and the
    streamed token back to the client), plus the server's hand-off (the handler's start to the
    engine's add_request: parsing, tokenizing, the engine thread's next look at its inbox),
    where measured; None without the server's figures."""
    if not all(k in fcfs for k in ("server_ttft_mean", "server_e2e_mean", "ttft_mean", "e2e_mean")):
        return None
    handoff = fcfs.get("server_handoff_mean", 0.0)
    return (max(0.0, fcfs["ttft_mean"] - fcfs["server_ttft_mean"]) + handoff,
            max(0.0, fcfs["e2e_mean"] - fcfs["server_e2e_mean"]) + handoff)


def front_end_figures(requests, ttft_offset: float, e2e_offset: float) -> dict:
    """The simulated requests' mean and p99 JCT, mean TTFT and latency per token as a client
    would see them: each request's TTFT and JCT plus the front end's offsets; and per request,
    in the trace's order, [TTFT, JCT, output tokens] so (`per_request`, as the servers')."""
    from fastserve_jax.slo import mean_latency_per_token, request_latencies

    requests = sorted(requests, key=lambda r: int(r.request_id[1:]))      # the simulator's ids: r0, r1, ...
    jct, ttft, _, out = request_latencies(requests)
    jct, ttft = jct + e2e_offset, ttft + ttft_offset
    return dict(mean_jct=float(jct.mean()), p99_jct=float(np.percentile(jct, 99)),
                mean_ttft=float(ttft.mean()), mean_latency_per_token=mean_latency_per_token(jct, out),
                per_request=[[round(float(t), 5), round(float(j), 5), int(n)] for t, j, n in zip(ttft, jct, out)])


def async_overlap() -> float:
    """SimConfig.async_overlap here: on a CPU the host's thread takes one of the launch's cores."""
    import jax
    return 1.0 - 1.0 / (os.cpu_count() or 1) if jax.default_backend() == "cpu" else 1.0


def simulate_policies(eng, trace: list[TraceRequest], swap: tuple[float, float, float], overhead: float = 0.0,
                      policies=POLICIES, host_scale: float = 1.0, speed: float = 1.0,
                      front_end: tuple[float, float] | None = None) -> tuple[dict, object]:
    """fastserve_jax.sim per policy with the engine's limits, pools and cost model, `swap` =
    measure_swap's (latency, bandwidth, issue seconds), plus `overhead` host seconds per
    iteration (the policy's config stays the engine's own, engine.policy_config, fitted to
    the unscaled profile), plus `host_scale` times the seconds the
    simulator spends in the policy's own calls (SimConfig.host_time_scale); every launch time
    of the profile multiplied by `speed` (scaled_launches), while the policy sees the engine's
    own profile, as the engine's does (SimConfig.policy_cost); with `front_end` (front_end_offsets)
    the latency figures are the client's (front_end_figures)."""
    import dataclasses

    from fastserve_jax.kv_sizing import kv_block_bytes
    from fastserve_jax.sim import SimConfig, simulate

    cfg, kv = eng.cfg, eng.kv
    latency, bandwidth, issue = swap
    cost = dataclasses.replace(scaled_launches(eng.cost_model, speed),
                               kv_bytes_per_token=kv_block_bytes(eng.model_cfg, cfg) // cfg.block_size,
                               swap_latency=latency, swap_issue_seconds=issue, iteration_overhead=overhead,
                               swap_bandwidth=min(bandwidth, 1e15))      # CostModel needs a finite figure
    sim_cfg = SimConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                        block_size=cfg.block_size, kv_capacity_tokens=kv.num_usable_blocks * cfg.block_size,
                        host_kv_capacity_tokens=kv.num_host_blocks * cfg.block_size, swap_policy=cfg.swap_policy,
                        swap_reserve_blocks=cfg.swap_reserve_blocks, host_time_scale=host_scale,
                        scheduler_config=eng.policy_config(), policy_cost=eng.cost_model,
                        async_scheduling=bool(cfg.async_scheduling), async_overlap=async_overlap())
    runs = {p: simulate(trace, p, cost, sim_cfg) for p in policies}
    sims = {p: dict(r.metrics(), **(front_end_figures(r.requests, *front_end) if front_end else {}))
            for p, r in runs.items()}
    for m in sims.values():
        m["iteration_seconds"] = m["swap_busy_seconds"] / m["iterations"]      # swap stalls included, as the engine's
        m["launch_seconds_per_iteration"] = m["launch_seconds"] / m["iterations"]
    return sims, cost


# The simulator times the policy's own calls as it runs them (SimConfig.host_time_scale), so
# on a busy machine two simulations of one run differ: in a tight burst by a tenth on skip-join's
# ms per iteration and by 2x on its TTFT (docs/scheduling.md, the session's last run of
# 2026-12-06). The predictions are each policy's median simulation of SIM_REPEATS.
SIM_REPEATS = 3


def simulate_median(*args, repeats: int = SIM_REPEATS, **kw) -> tuple[dict, object]:
    """simulate_policies `repeats` times; per policy, the simulation whose mean JCT is the
    median of them (one whole simulation, so its figures and per-request rows agree)."""
    runs = [simulate_policies(*args, **kw) for _ in range(repeats)]
    cost = runs[0][1]
    out = {}
    for p in runs[0][0]:
        ordered = sorted((r[0][p] for r in runs), key=lambda m: m["mean_jct"])
        out[p] = ordered[len(ordered) // 2]
    return out, cost


# ----------------------------------------------------------------------------- simulator vs engine

def print_fidelity(real: dict, sims: dict, medians: dict, note: str, labels: dict | None = None,
                   engine: str = "median over the runs of each policy, client-side") -> dict:
    """Per policy the fidelity rows; then the skip-join / fcfs ratios of mean JCT and latency per
    token (the engine's: medians[key]["ratio"], the median of per-pair ratios over HTTP).
    `engine` says where the engine's figures come from. Returns both for the JSON."""
    labels = labels or {}
    rows = {p: fidelity_rows(real[p], sims[p]) for p in POLICIES}
    ratios = [dict(figure=label, real=medians[rk]["ratio"], sim=sims["skip-join-mlfq"][sk] / sims["fcfs"][sk])
              for rk, sk, label, _ in FIDELITY[:2]]
    print(f"{'policy':16s}{'figure':20s}{'engine':>11s}{'sim':>11s}{'rel err':>9s}")
    for policy, rs in rows.items():
        for r in rs:
            print(f"{labels.get(policy, policy):16s}{r['figure']:20s}{r['scale'] * r['real']:11.4g}"
                  f"{r['scale'] * r['sim']:11.4g}{100 * r['rel_err']:8.1f}%{'' if r['within'] else '  (> 15%)'}")
    for r in ratios:
        print(f"{'sj/fcfs':16s}{r['figure']:20s}{r['real']:11.3f}{r['sim']:11.3f}"
              f"{100 * relative_error(r['sim'], r['real']):8.1f}%")
    print(f"(engine: {engine}; sim: fastserve_jax.sim, the median of {SIM_REPEATS} simulations by mean JCT{note}; "
          "rel err = sim / engine - 1)")
    return dict(rows=rows, ratios=ratios)


def engine_shape(eng):
    """What simulate_policies reads of an engine (its options, pool sizes, model config and
    cost model), without holding the engine: the benchmark drops its setup engine before the
    in-process runs build theirs."""
    from types import SimpleNamespace

    config = eng.policy_config()
    return SimpleNamespace(cfg=eng.cfg, model_cfg=eng.model_cfg, cost_model=eng.cost_model,
                           policy_config=lambda: config,
                           kv=SimpleNamespace(num_usable_blocks=eng.kv.num_usable_blocks,
                                              num_host_blocks=eng.kv.num_host_blocks))


def calibrated(shape, trace: list[TraceRequest], swap: tuple[float, float, float], fcfs: dict) -> dict:
    """Fit the simulation to the fcfs engine's figures `fcfs` (medians), three numbers, each
    from one phase of the engine's iterations (EngineStats):
    - `speed`: its device seconds per iteration over the simulated launch seconds per
      iteration; it scales every launch of the profile (the machine's speed while the engine
      served, against the moment it was profiled: on the 2-core VM they differ by up to 1.5x);
    - `host_scale`: its schedule seconds per iteration over the seconds the simulator spent in
      the same policy calls per iteration; it scales that measured host time (the engine runs
      them beside its launches on the same cores, the simulator alone; the phase also holds the
      engine's own per-iteration bookkeeping, which this folds in);
    - `overhead`: the host seconds per iteration that bring the simulated fcfs seconds per
      iteration to the engine's (assembling, appending tokens, detokenizing, the front end).
    skip-join is then simulated with all three, a held-out prediction. Without the phase
    figures (an older server) speed and host_scale stay 1. With async scheduling the device
    phase is only a wait, so `overhead` is the assemble and postprocess phases, run beside each
    launch (SimConfig.async_scheduling), and `speed` is solved to fit the ms per iteration."""
    base, _ = simulate_policies(shape, trace, swap, policies=("fcfs",))
    b = base["fcfs"]
    speed, host_scale = 1.0, 1.0
    if fcfs.get("device_seconds_per_iteration") and fcfs.get("schedule_seconds_per_iteration"):
        speed = fcfs["device_seconds_per_iteration"] / b["launch_seconds_per_iteration"]
        host_scale = fcfs["schedule_seconds_per_iteration"] / (b["policy_host_seconds"] / b["iterations"])
    measured = fcfs["iteration_seconds"]
    if shape.cfg.async_scheduling and fcfs.get("assemble_seconds_per_iteration") is not None:
        overhead = fcfs["assemble_seconds_per_iteration"] + fcfs["postprocess_seconds_per_iteration"]
        for _ in range(12):        # the launches are most of an iteration: proportional steps converge
            f = simulate_policies(shape, trace, swap, overhead, ("fcfs",), host_scale, speed)[0]["fcfs"]
            if abs(f["iteration_seconds"] / measured - 1) < 1e-3:
                break
            speed *= measured / f["iteration_seconds"]
    else:
        overhead = calibrate_overhead(measured, lambda x: simulate_policies(
            shape, trace, swap, x, ("fcfs",), host_scale, speed)[0]["fcfs"]["iteration_seconds"])
    sims, _ = simulate_median(shape, trace, swap, overhead, host_scale=host_scale, speed=speed)
    return dict(speed=speed, host_scale=host_scale, iteration_overhead=overhead, fcfs_measured_iteration_seconds=measured,
                async_scheduling=bool(shape.cfg.async_scheduling), sim=sims)


def _fit_note(cal: dict) -> str:
    return (f"launches x {cal['speed']:.3f}, policy host time x {cal['host_scale']:.2f}, + "
            f"{1e3 * cal['iteration_overhead']:.3f} ms per iteration" +
            (", the host work beside each launch (async scheduling)" if cal.get("async_scheduling") else ""))


def print_held_out(fid: dict) -> None:
    held = {r["figure"]: r for r in fid["rows"]["skip-join-mlfq"]}
    met = all(held[f]["within"] for f in ("JCT mean s", "ms per token"))
    print(f"held-out skip-join: JCT mean {100 * held['JCT mean s']['rel_err']:+.1f}%, ms per token "
          f"{100 * held['ms per token']['rel_err']:+.1f}% (aim: both within 15%: {'met' if met else 'MISSED'})")


def simulator_fidelity(shape, path: str, swap: tuple[float, float, float], trace: list[TraceRequest],
                       runs: list[dict], medians: dict, max_num_seqs: int) -> dict:
    """The model alone (the profile, swap copy times and the policy's host time as the
    simulator measures it), then calibrated on the fcfs servers (skip-join held out); returns
    their figures for the JSON."""
    sims, cost = simulate_median(shape, trace, swap)
    latency, bandwidth, issue = swap
    real = {p: {k: statistics.median(r[p][k] for r in runs) for k in runs[0][p]
                if isinstance(runs[0][p][k], (int, float))} for p in POLICIES}
    print(f"\n== simulator fidelity, the model alone: the same {len(trace)} requests and arrivals; cost model {path} "
          f"({cost.name}; decode batch 1 {1e3 * cost.decode_time(1):.2f} ms, batch {max_num_seqs} "
          f"{1e3 * cost.decode_time(max_num_seqs):.2f} ms); swap copy {1e3 * latency:.2f} ms + bytes / "
          f"{bandwidth / 1e9:.3g} GB/s and {1e3 * issue:.3f} ms of host time to issue one, measured on the engine's "
          "copy path; each iteration also charged the host time of the policy's own calls as the simulator ran them")
    res = dict(cost_model=dict(path=path, **cost.to_json()), sim=sims, fidelity=print_fidelity(real, sims, medians, ""))
    # The serving engine also assembles its launches, appends tokens, detokenizes and shares its
    # 2 cores (and the GIL) with the HTTP server every iteration, and the machine runs at another
    # speed than when it was profiled: three numbers fitted on the fcfs runs only; skip-join is
    # then predicted.
    cal = calibrated(shape, trace, swap, real["fcfs"])
    print(f"\n== calibrated on the fcfs servers ({_fit_note(cal)}): launches scaled to their device seconds per "
          "iteration (fastserve_iteration_phase_seconds_total{phase=\"device\"}), the policy's host time to their "
          "schedule phase, and a host overhead solved so the simulated fcfs mean ms per iteration equals the servers' "
          f"median ({1e3 * cal['fcfs_measured_iteration_seconds']:.3f} ms: fastserve_busy_seconds_total / "
          "fastserve_iterations_total). fcfs rows are in-sample (only phases of their ms per iteration are fitted), "
          "skip-join rows a held-out prediction")
    fid = print_fidelity(real, cal["sim"], medians, ", " + _fit_note(cal),
                         {"fcfs": "fcfs (fit)", "skip-join-mlfq": "sj (held out)"})
    print_held_out(fid)
    # What a calibration can hope for: the engine's own ms per iteration moves with the
    # machine's other jobs from run to run, and JCT moves with it.
    spread = {p: [1e3 * r[p]["iteration_seconds"] for r in runs] for p in POLICIES}
    print("noise floor: engine ms per iteration per run, " + "; ".join(
        f"{p} " + " ".join(f"{v:.2f}" for v in vs) + f" (max/min {max(vs) / min(vs):.2f})" for p, vs in spread.items()))
    res["calibrated"] = dict(cal, fidelity=fid, engine_ms_per_iteration_per_run=spread)
    # The client's clock also counts its send and the streamed answer's way back, outside the
    # handler the engine's figures start at: measured on the fcfs servers, added to each request.
    fe = front_end_offsets(real["fcfs"])
    if fe:
        sims, _ = simulate_median(shape, trace, swap, cal["iteration_overhead"], host_scale=cal["host_scale"],
                                  speed=cal["speed"], front_end=fe)
        print(f"\n== calibrated as above, plus the HTTP front end measured on the fcfs servers (client less server "
              f"figures, plus the server's hand-off to the engine, "
              f"{1e3 * real['fcfs'].get('server_handoff_mean', 0.0):.1f} ms): + {1e3 * fe[0]:.1f} ms to each TTFT, "
              f"+ {1e3 * fe[1]:.1f} ms to each JCT")
        fid = print_fidelity(real, sims, medians, ", " + _fit_note(cal) + ", + the front end",
                             {"fcfs": "fcfs (fit)", "skip-join-mlfq": "sj (held out)"})
        print_held_out(fid)
        res["calibrated_front_end"] = dict(ttft_offset=fe[0], e2e_offset=fe[1], sim=sims, fidelity=fid)
        if all("per_request" in r[p] for r in runs for p in POLICIES):
            res["calibrated_front_end"]["by_length"] = lengths = {p: by_length(runs, sims, p) for p in POLICIES}
            for p, rows in lengths.items():
                print_by_length(rows, p)
    return res
