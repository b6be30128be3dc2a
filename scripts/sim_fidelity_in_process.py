"""Simulator fidelity without HTTP (part of scripts/bench_preemption.py, beside
scripts/sim_fidelity.py): the burst on in-process engines, each request added between steps
at its arrival time as the simulator adds it, held against the same simulations.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import numpy as np

from fastserve_jax.stats import PHASES
from sim_fidelity import FIDELITY, POLICIES, SPREAD, _fit_note, print_fidelity, print_held_out

# the KV work of a run (EngineStats' counters): what preemption cost beside the model's steps
KV_WORK = ("swap_out_blocks", "swap_in_blocks", "swap_stall", "recomputed_tokens", "prefill_tokens", "decode_tokens")


# ----------------------------------------------------------------------------- the engine without HTTP

def engine_in_process(build, work: list, arrivals: list[float], policy: str, per_request: bool = False) -> dict:
    """The burst on an in-process engine of `policy` (build(policy) -> LLM), each request added
    between steps once its arrival time has passed, as the simulator adds them: the engine's
    scheduling and device work without the HTTP server and client sharing its cores. Every
    answer is checked; one wrong answer raises. The engine's counters (iterations, busy time,
    phases) are taken over this run alone, so an engine may serve several runs. With
    `per_request`, also each request's [TTFT, JCT, output tokens] in `work`'s order."""
    from fastserve_jax.config import SamplingParams
    from fastserve_jax.models import demo_task

    eng = build(policy).engine
    counters = ("iterations", "busy", *PHASES, *KV_WORK)
    before = {k: getattr(eng.stats, k) for k in counters}      # an engine reused across runs counts on
    reqs, i, t0 = [], 0, time.monotonic()
    while i < len(work) or eng.has_unfinished():
        now = time.monotonic() - t0
        while i < len(work) and arrivals[i] <= now:
            body = work[i][0]
            reqs.append(eng.add_request(body["prompt"], SamplingParams(max_tokens=body["max_tokens"], temperature=0),
                                        arrival_time=t0 + arrivals[i]))
            i += 1
        if eng.has_unfinished():
            eng.step()
        else:
            time.sleep(max(0.0, min(0.005, arrivals[i] - now)))
    wall = time.monotonic() - t0
    bad = [(a, b) for r, (_, (a, b)) in zip(reqs, work)
           if not demo_task.check_answer(a, b, eng.tokenizer.decode(r.output_token_ids, skip_special_tokens=True))]
    if bad:
        raise RuntimeError(f"{policy} in process: {len(bad)} wrong answer(s), e.g. count from {bad[0][0]} to {bad[0][1]}")
    m = [r.metrics for r in reqs]
    st = SimpleNamespace(**{k: getattr(eng.stats, k) - before[k] for k in counters})
    jct = [x.finish_time - x.arrival_time for x in m]
    extra = dict(per_request=[[x.first_token_time - x.arrival_time, j, len(r.output_token_ids)]
                              for x, j, r in zip(m, jct, reqs)]) if per_request else {}
    return dict(**extra, e2e_mean=statistics.mean(jct), e2e_p99=float(np.percentile(jct, 99)),      # as slo.py, the sim's
                mean_latency_per_token=statistics.mean(j / len(r.output_token_ids) for j, r in zip(jct, reqs)),
                ttft_mean=statistics.mean(x.first_token_time - x.arrival_time for x in m),
                throughput_rps=len(reqs) / wall, iterations=st.iterations,
                # where an iteration's time goes (EngineStats' phases): what the simulator's launches,
                # its policy host time and the calibrated overhead have to account for
                iteration_seconds=st.busy / st.iterations,
                **{f"{k}_seconds_per_iteration": getattr(st, k) / st.iterations for k in PHASES},
                **{k: getattr(st, k) for k in KV_WORK}, busy_seconds=st.busy)


def median_runs(runs: list[dict]) -> dict:
    """Per numeric figure the median over `runs` (dicts of the same figures)."""
    return {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}


def in_process_fidelity(build, work: list, arrivals: list[float], sims: dict, rounds: int = 3,
                        calibrate=None) -> dict:
    """The in-process engine per policy, `rounds` alternating runs each (fcfs, skip-join, fcfs,
    ...; a fresh engine per run), their medians against the simulation `sims` of the same
    burst (the model alone), then against calibrate(fcfs medians) (`calibrated`'s result, fcfs
    fitted, skip-join held out) if given. One run says little: on the 2-core VM a policy's
    served rate moved by up to 1.6x between runs minutes apart (2026-12-02), so the spread is
    printed beside it."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs = [{p: engine_in_process(build, work, arrivals, p) for p in POLICIES} for _ in range(rounds)]
    real = {p: median_runs([r[p] for r in runs]) for p in POLICIES}
    print(f"\n== the same burst on an in-process engine (no HTTP server or client on its cores), median of {rounds} "
          "alternating runs per policy, against the model alone (above)")
    ratios = {rk: dict(ratio=statistics.median(r["skip-join-mlfq"][rk] / r["fcfs"][rk] for r in runs))
              for rk, _, _, _ in FIDELITY[:2]}
    fid = print_fidelity(real, sims, ratios, "", engine=f"median of {rounds} in-process runs per policy")
    spread = {p: {k: (min(r[p][k] for r in runs), max(r[p][k] for r in runs)) for k in SPREAD} for p in POLICIES}
    for p in POLICIES:
        print(f"run to run, {p}: " + "; ".join(f"{k} {lo:.4g}-{hi:.4g} (max/min {hi / lo:.2f})"
                                                 for k, (lo, hi) in spread[p].items()))
        print(f"  ms per iteration {1e3 * real[p]['iteration_seconds']:.3f} (simulated "
              f"{1e3 * sims[p]['iteration_seconds']:.3f}) = " + " + ".join(
                  f"{k} {1e3 * real[p][f'{k}_seconds_per_iteration']:.3f}" for k in PHASES) + " (medians)")
    res = dict(engine=real, runs=runs, spread=spread, **fid)
    if calibrate is not None:
        cal = calibrate(real["fcfs"])
        print(f"\n== calibrated on the in-process fcfs runs as on the servers above ({_fit_note(cal)}; skip-join "
              "held out)")
        fid = print_fidelity(real, cal["sim"], ratios, ", " + _fit_note(cal),
                             {"fcfs": "fcfs (fit)", "skip-join-mlfq": "sj (held out)"},
                             engine=f"median of {rounds} in-process runs per policy")
        print_held_out(fid)
        res["calibrated"] = dict(cal, fidelity=fid)
    return res
