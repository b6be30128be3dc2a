"""`fastserve-jax simulate`: policies on a trace in the discrete-event simulator.

    fastserve-jax simulate --trace T.csv --load 0.8 --policy fcfs --policy skip-join-mlfq --json out.json
    fastserve-jax simulate --trace T.csv --load 0.5 0.6 0.7 0.8 0.9 1.0 --policy fcfs ... \\
        --json sweep.json --plot sweep.png                    # a sweep: several rates or loads

It prints one line per policy and rate. With --json, one rate (or load, or the trace's own
timing) writes {policy: {metric: value}}; several
write {policy: [{rate, load, metric: value}, ...]} in rate order plus a top-level "summary":
{policy: {goodput_rps, slo_latency_per_token, unloaded_latency_per_token, max_offered_rps,
rate_at_95pct: [{ttft, tpot, rate}]}} (slo.sweep_summary: rates interpolated linearly
between the two that bracket the limit), and --plot draws one latency curve per policy
against the rate.
Every row has offered_rps (the arrival rate asked, or the trace's own: its requests over its arrival span),
throughput_rps (the rate served) and slo_attainment: [{ttft, tpot, attained}], one per
--slo pair (see fastserve_jax/slo.py for every definition).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import sys
from typing import Callable

from fastserve_jax import AZURE_TRACE
from fastserve_jax.serve.engine_args import int_at_least, named
from fastserve_jax.serve.sweep_report import print_summary, write_json, write_output
from fastserve_jax.slo import PAPER_SLOS, UNLOADED_SLO_FACTOR, parse_slo_pair

PLOT_METRICS = ("mean_latency_per_token", "mean_jct", "p99_jct", "mean_ttft", "p99_ttft", "mean_tpot")


def add_simulate_parser(sub) -> None:
    from fastserve_jax.config import SchedulerConfig
    from fastserve_jax.scheduler import DEFAULT_POLICY, POLICIES
    from fastserve_jax.sim_config import PREDICTION_AT

    p = sub.add_parser("simulate", help="run scheduling policies on a trace in the simulator (no model, no device)",
                       description="Simulate policies on a trace with a cost model: the real scheduler and KV "
                                   "manager, with step times from the cost model instead of a device.")
    p.add_argument("--trace", default=AZURE_TRACE, help="(default: the Azure conversation trace shipped in "
                   "fastserve_jax/traces) CSV with num_prefill_tokens,num_decode_tokens[,arrived_at] (seconds), or Azure's "
                   "published ContextTokens,GeneratedTokens[,TIMESTAMP]")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, nargs="+", action="extend",    # repeated: all (bench's --rate repeats)
                      help="arrival rate(s) in requests/s (several, or the flag repeated: a sweep)")
    rate.add_argument("--load", type=float, nargs="+", action="extend",
                      help="arrival rate(s) as a fraction of the capacity the cost model implies for this trace "
                           "(see fastserve_jax.workload.capacity_rps); several: a sweep")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson",
                   help="arrival process with --rate/--load (default poisson)")
    p.add_argument("--cv", type=float, default=None,
                   help="coefficient of variation of gamma inter-arrival gaps, in about [1e-154, 1e154] (the gamma "
                        "shape 1/cv**2 must be a finite number > 0; default 1 = Poisson); only with --arrival gamma")
    p.add_argument("--num-requests", type=int, default=None, help="the first N requests of the trace")
    p.add_argument("--policy", action="append", choices=sorted(POLICIES),
                   help=f"policy to simulate (repeatable; default {DEFAULT_POLICY})")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-capacity-tokens", type=int, default=0, help="KV slots on the device (default, or 0: the cost model's)")
    p.add_argument("--host-kv-capacity-tokens", type=int, default=0,
                   help="KV slots in the host pool for swapped-out requests (default 0: none, evictions recompute)")
    p.add_argument("--swap-policy", choices=["proactive", "reactive", "recompute"], default=None,
                   help="where evicted KV goes (default proactive; needs --host-kv-capacity-tokens)")
    p.add_argument("--cost-model", default="opt-13b-a100", type=named, help="shipped cost model name or JSON path")
    p.add_argument("--base-quantum", type=float, default=None, help="seconds (SchedulerConfig.base_quantum)")
    p.add_argument("--quantum-ratio", type=float, default=None)
    p.add_argument("--starvation-threshold", type=float, default=None, help="seconds; 0 disables promotion")
    p.add_argument("--no-protect-decodes", dest="protect_decodes", action="store_false",
                   help="skip-join-mlfq as the paper has it: demote decoding requests even where the learned "
                        "output lengths say they are worth more per token than a fresh one "
                        "(SchedulerConfig.protect_decodes)")
    p.add_argument("--tail-slowdown", type=float, default=None,
                   help="skip-join-mlfq's tail guard (SchedulerConfig.tail_slowdown; 0: off)")
    pred = p.add_mutually_exclusive_group()
    pred.add_argument("--prediction-sigma", type=_sigma, metavar="SIGMA",
                      help="simulate output-length predictions: log-normal noise of this sigma on the true length "
                           "(0 = exact), turned into calibrated distributions (fastserve_jax/sim_prediction.py); "
                           "without this or --prediction-tau, --policy predictive ranks by its own predictions from "
                           "prompt lengths where they pass its gate, and is skip-join-mlfq elsewhere")
    pred.add_argument("--prediction-tau", type=_tau, metavar="TAU",
                      help="simulate predictions whose Kendall's tau with the true lengths is TAU, in (0, 1] "
                           "(learned predictors report 0.5-0.6; 1 = exact)")
    p.add_argument("--prompt-neighbors", type=int, default=None,
                   help="output lengths predicted from prompt lengths (skip-join's joins, gittins' and predictive's "
                        "ranks, once they pass their gate): finished requests with the nearest prompt lengths each is "
                        f"predicted from (SchedulerConfig.prompt_neighbors, default {SchedulerConfig.prompt_neighbors}; "
                        "0: off)")
    p.add_argument("--prediction-at", choices=PREDICTION_AT, default="prefill",
                   help="when a request first gets its simulated prediction: when its prefill completes (as the "
                        "engine's predictor, which reads the prefill's hidden states; default) or when it arrives "
                        "(a predictor that reads only the prompt)")
    pc = p.add_argument_group("prefix caching (the engine's --enable-prefix-caching)")
    pc.add_argument("--enable-prefix-caching", action="store_true",
                    help="requests start past blocks of the same prefix already on the device")
    pc.add_argument("--shared-prefix-tokens", type=int, default=0, metavar="N",
                    help="each prompt's first N tokens (at most all but its last) are its group's, the rest its own")
    pc.add_argument("--prefix-groups", type=int, default=1, metavar="G",
                    help="trace request i shares its prefix with the others of group i %% G (default 1: all)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the arrival process and the prediction noise")
    p.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes")
    p.add_argument("--json", metavar="OUT", help="also write the results there (the table goes to stderr either way)")
    p.add_argument("--save-requests", metavar="OUT.csv",
                   help="also write every simulated request's record there, a CSV row per request per policy and "
                        "rate (arrival, first token and finish in seconds, prompt and output tokens), to check or "
                        "recompute the figures")
    p.add_argument("--plot", metavar="OUT.png", help="latency against request rate, one curve per policy, in the "
                                                     "format the extension names (.png, .pdf, .svg, ...)")
    p.add_argument("--plot-metric", choices=PLOT_METRICS, default="mean_latency_per_token")
    add_slo_args(p, f"default: {UNLOADED_SLO_FACTOR:g}x the unloaded value, each request of the trace alone by "
                    "the cost model")
    p.set_defaults(func=cmd_simulate)


def _slo_pair(text: str) -> tuple[float, float]:
    try:
        return parse_slo_pair(text)
    except ValueError as e:                  # argparse prints an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def number_arg(ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type: a float for which ok() holds, else an error that says `what` it must be."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v
    return parse


seed_arg = int_at_least(0)


_positive_seconds = number_arg(lambda v: math.isfinite(v) and v > 0, "a positive number of seconds")
_sigma = number_arg(lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = exact lengths)")
_tau = number_arg(lambda v: 0 < v <= 1, "a Kendall's tau in (0, 1] (1 = exact lengths)")


def check_output(path: str | None, flag: str) -> None:
    """A ValueError now if `flag`'s file could not be written when the run ends (a directory, a
    folder that cannot be made, a file that cannot be opened for writing: tried, and removed
    again if it was not there), so that the run's results are not lost to it."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot make its folder ({e.strerror})") from None
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: a directory; give a file name")
    existed = os.path.lexists(path)
    try:                            # os.access says yes to root on a read-only mount or in /proc
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be written ({e.strerror})") from None
    if not existed:
        os.remove(path)


RATES = (1e-6, 1e9)     # requests/s: past these, arrival times lose the precision of a step
MAX_SPAN_S = 1e9        # seconds a timed trace's arrivals may span (float64: about 1e-7 s left at 1e9 s)


def check_rates(rates: list[float], flag: str) -> None:
    """A ValueError for an arrival rate outside RATES: at 1e-15 requests/s the arrival times
    (1e15 s and more) have no digits left for a step's 20 ms, and a benchmark never sends."""
    bad = [r for r in rates if not RATES[0] <= r <= RATES[1]]
    if bad:
        raise ValueError(f"{flag}: an arrival rate of {bad[0]:g} requests/s is outside {RATES[0]:g}-{RATES[1]:g}")


def check_plot(path: str | None) -> None:
    """A ValueError now if --plot's file could not be written when the run ends: a name whose
    extension (savefig's choice of format, any case) is no format matplotlib writes, or that has
    none (savefig would add .png to it); then check_output's checks (a directory among them)."""
    if path is not None and not os.path.isdir(path):
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        ext = os.path.splitext(path)[1][1:]
        if ext.lower() not in formats:
            raise ValueError(f"--plot {path}: " + (f"matplotlib writes no .{ext} files" if ext else "no extension")
                             + "; end the name with the format to write, one of "
                             + ", ".join("." + f for f in sorted(formats)) + " (as sweep.png)")
    check_output(path, "--plot")


def add_slo_args(p: argparse.ArgumentParser, latency_default: str) -> None:
    """--slo and --slo-latency-per-token (simulate and bench alike)."""
    g = p.add_argument_group("service levels")
    g.add_argument("--slo", action="append", type=_slo_pair, metavar="TTFT,TPOT",
                   help="an SLO pair in seconds (vLLM's --goodput takes ms): a request attains it when its time "
                        "to first token is <= TTFT "
                        "and its time per output token after the first is <= TPOT (repeatable; default the "
                        "FastServe paper's " +
                        " ".join(f"{t},{o}" for t, o in PAPER_SLOS) + ")")
    g.add_argument("--slo-latency-per-token", type=_positive_seconds, metavar="SECONDS",
                   help=f"the goodput's SLO on mean latency per output token ({latency_default})")


def _run_one(job: tuple) -> dict:
    from fastserve_jax.slo import request_latencies, slo_attainment
    from fastserve_jax.sim import simulate

    trace, policy, cost, cfg, rate, load, offered, slos, keep = job
    res = simulate(trace, policy, cost, cfg)
    _, ttft, tpot, _ = request_latencies(res.requests)
    records = {"records": [(r.arrival_time, r.metrics.first_token_time, r.metrics.finish_time, r.num_prompt_tokens,
                            len(r.output_token_ids)) for r in res.requests]} if keep else {}
    return dict(rate=rate, load=load, offered_rps=offered, **res.metrics(),
                slo_attainment=slo_attainment(ttft, tpot, slos), **records)


def _save_requests(path: str, runs: list[tuple[str, dict]]) -> None:
    """--save-requests' CSV (each run's records leave its row: --json stays small)."""
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "rate", "load", "request", "arrival_s", "first_token_s", "finish_s", "prompt_tokens",
                    "output_tokens"])
        for policy, m in runs:
            for i, rec in enumerate(m.pop("records")):
                w.writerow([policy, m["rate"], m["load"], i, *rec])


def cmd_simulate(a: argparse.Namespace) -> int:
    import dataclasses

    from fastserve_jax.config import SchedulerConfig
    from fastserve_jax.cost_model import CostModel
    from fastserve_jax.slo import sweep_summary, unloaded_latency_per_token
    from fastserve_jax.scheduler import DEFAULT_POLICY
    from fastserve_jax.sim import SimConfig
    from fastserve_jax.workload import capacity_rps, gamma_shape, load_trace, with_arrivals

    try:
        if a.num_requests is not None and a.num_requests < 1:
            raise ValueError(f"--num-requests must be >= 1 (or left out: the whole trace), got {a.num_requests}")
        if a.jobs < 1:
            raise ValueError(f"--jobs must be >= 1 (simulations at a time), got {a.jobs}")
        if not a.enable_prefix_caching and (a.shared_prefix_tokens or a.prefix_groups != 1):
            print("warning: --shared-prefix-tokens and --prefix-groups shape the prompts' shared tokens, which "
                  "only --enable-prefix-caching reads; without it they change nothing", file=sys.stderr)
        if a.swap_policy not in (None, "recompute") and not a.host_kv_capacity_tokens:    # it changed nothing
            print(f"warning: --swap-policy {a.swap_policy} moves KV to the host pool, and there is none "
                  "(--host-kv-capacity-tokens 0): evictions recompute, as with recompute", file=sys.stderr)
        a.swap_policy = a.swap_policy or "proactive"
        if a.swap_policy == "recompute" and a.host_kv_capacity_tokens:     # the same results, without a word
            print("warning: --swap-policy recompute recomputes evicted KV and never uses the host pool: "
                  "--host-kv-capacity-tokens changes nothing", file=sys.stderr)
        elif 0 < (a.host_kv_capacity_tokens or 0) < a.block_size:
            print(f"warning: --host-kv-capacity-tokens {a.host_kv_capacity_tokens} holds no block of "
                  f"{a.block_size} tokens: there is no host pool, and evictions recompute", file=sys.stderr)
        for flag, given in (("--rate", a.rate), ("--load", a.load), ("--policy", a.policy), ("--slo", a.slo)):
            if given and len(set(given)) < len(given):
                raise ValueError(f"{flag} {max(given, key=given.count)} is given twice")
        if a.cv is not None and a.arrival != "gamma":       # it changed nothing, without a word
            raise ValueError(f"--cv {a.cv:g} shapes gamma arrivals; add --arrival gamma (Poisson's cv is 1)")
        cv = 1.0 if a.cv is None else a.cv
        if a.arrival == "gamma" and (a.rate or a.load):
            gamma_shape(cv)                   # with_arrivals' check, before the trace and cost model load
        check_output(a.json, "--json")
        check_output(a.save_requests, "--save-requests")
        check_plot(a.plot)
        cost = CostModel.load(a.cost_model)
        trace, timed = load_trace(a.trace, a.num_requests)
        if a.num_requests is not None and len(trace) < a.num_requests:     # as bench refuses it
            raise ValueError(f"{a.trace} has {len(trace)} requests, fewer than the {a.num_requests} asked; lower "
                             "--num-requests, or leave it out for the whole trace")
        knobs = {k: v for k, v in (("base_quantum", a.base_quantum), ("quantum_ratio", a.quantum_ratio),
                                   ("starvation_threshold", a.starvation_threshold),
                                   ("tail_slowdown", a.tail_slowdown),
                                   ("prompt_neighbors", a.prompt_neighbors)) if v is not None}
        knobs["protect_decodes"] = a.protect_decodes
        cfg = SimConfig(a.max_num_seqs, a.max_num_batched_tokens, a.block_size, a.kv_capacity_tokens,
                        dataclasses.replace(SchedulerConfig(), **knobs), a.host_kv_capacity_tokens, a.swap_policy,
                        prediction_sigma=a.prediction_sigma, prediction_tau=a.prediction_tau, prediction_seed=a.seed,
                        prediction_at=a.prediction_at, enable_prefix_caching=a.enable_prefix_caching,
                        shared_prefix_tokens=a.shared_prefix_tokens, prefix_groups=a.prefix_groups)
        if a.host_kv_capacity_tokens and a.swap_policy != "recompute":
            cost.swap_time(1)                    # the transfer-time model must be there
        blocks = cfg.num_blocks(cost)
        capacity = capacity_rps(trace, cost, a.max_num_seqs, (blocks - 1) * a.block_size, a.max_num_batched_tokens)
        # (rate asked or None for the trace's own timing, load, offered rate)
        if a.rate:
            points = [(r, r / capacity, r) for r in sorted(a.rate)]
        elif a.load:
            points = [(l * capacity, l, l * capacity) for l in sorted(a.load)]
        elif timed:
            # n over the span, as served is n over first arrival to last finish, so served <= offered
            # ((n - 1) / span had two requests served at twice the rate offered)
            span = trace[-1].arrival - trace[0].arrival
            if span > MAX_SPAN_S:       # as check_rates: times that far out have no digits left for a step
                raise ValueError(f"{a.trace}: its arrivals span {span:g} s, more than {MAX_SPAN_S:g} s; at such times "
                                 "a step's milliseconds are lost to rounding (a request finished the instant it came)")
            r = len(trace) / span if span > 0 else 0.0
            points = [(None, r / capacity if r else None, r or None)]
        else:
            raise ValueError(f"trace {a.trace} has no arrival times (arrived_at or TIMESTAMP); give --rate or --load")
        if any(r is not None and not (math.isfinite(r) and r > 0) for r, _, _ in points):
            raise ValueError(f"--rate and --load must be finite numbers > 0, got {a.rate or a.load}")
        check_rates([r for r, _, _ in points if r is not None], "--rate" if a.rate else "--load")
        policies, slos = a.policy or [DEFAULT_POLICY], a.slo or PAPER_SLOS
        jobs = []
        for rate, load, offered in points:
            # the same N requests (--num-requests) at every rate: a finite burst per rate
            tr = trace if rate is None else with_arrivals(trace, rate, a.arrival, cv, a.seed)
            jobs += [(tr, p, cost, cfg, rate, load, offered, slos, bool(a.save_requests)) for p in policies]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unloaded = unloaded_latency_per_token(trace, cost, a.max_num_batched_tokens)
    slo_lpt = a.slo_latency_per_token or UNLOADED_SLO_FACTOR * unloaded
    print(f"capacity {capacity:.3f} req/s by {cost.name}; {len(trace)} requests, {len(points)} rate(s) x "
          f"{len(policies)} policies; latency/token alone {unloaded * 1e3:.1f} ms; slo: % of requests "
          "within TTFT,TPOT " + " / ".join(f"{t:g},{o:g} s" for t, o in slos), file=sys.stderr)
    try:            # the simulator rejects what the trace and pool cannot serve (a request larger than the pool)
        if a.jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
                results = list(pool.map(_run_one, jobs))
        else:
            results = [_run_one(j) for j in jobs]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out: dict = {}
    for job, m in zip(jobs, results):
        swaps = (f" swapped out {m['swap_blocks_out']} blocks, stall {m['swap_stall_seconds']:.1f}s"
                 if m['swap_blocks_out'] else "")
        slo = "/".join(f"{100 * s['attained']:.0f}" for s in m["slo_attainment"])
        pred = f"  prediction tau {m['prediction_kendall_tau']:.2f}" if "prediction_kendall_tau" in m else ""
        pred += f"  prefix cache hits {m['prefix_cache_hit_rate']:.2f}" if "prefix_cache_hit_rate" in m else ""
        offered = "all at once," if m['offered_rps'] is None else f"{m['offered_rps']:.3f}"     # a trace of one instant
        if m["rate"] is not None:        # random arrivals: the rate they came at (a gamma of a huge cv: at once)
            offered += " (arrived all at once)" if m["arrival_rps"] is None else f" (arrived {m['arrival_rps']:.3f})"
        load = "-" if m['load'] is None else f"{m['load']:.2f}"
        print(f"{job[1]:>15} offered {offered} served {m['throughput_rps']:.3f} req/s "
              f"load {load}  jct {m['mean_jct']:.2f}s p99 {m['p99_jct']:.2f}s  "
              f"latency/token {m['mean_latency_per_token'] * 1e3:.1f}ms  ttft {m['mean_ttft']:.2f}s  slo {slo}%  "
              f"recomputed {m['preemptions']}{swaps}{pred}", file=sys.stderr)
        out.setdefault(job[1], []).append(m)
    if a.save_requests:
        _save_requests(a.save_requests, [(job[1], m) for job, m in zip(jobs, results)])
    if len(points) == 1:
        out = {p: ms[0] for p, ms in out.items()}
    else:
        summary = {p: dict(sweep_summary(ms, slo_lpt), unloaded_latency_per_token=unloaded) for p, ms in out.items()}
        print_summary(summary)
        out["summary"] = summary
    wrote = True
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        wrote = write_output(a.json, lambda path: write_json(path, out))
    if a.plot:
        curves = {p: ms if isinstance(ms, list) else [ms] for p, ms in out.items() if p != "summary"}
        title = f"{os.path.basename(a.trace)}, {cost.name}, batch {a.max_num_seqs}, budget {a.max_num_batched_tokens}"
        wrote &= write_output(a.plot, lambda path: plot_sweep(curves, a.plot_metric, path, title), "--plot")
    return 0 if wrote else 1


def plot_sweep(curves: dict[str, list[dict]], metric: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy, ms in curves.items():
        ms = sorted(ms, key=lambda m: m["rate"] or 0)
        ax.plot([m["rate"] or m["throughput_rps"] for m in ms], [m[metric] for m in ms], marker="o", label=policy)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(f"{metric} (s)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
