"""FastServe's experiments in the simulator: the paper's setup, every policy and swap policy,
steady load and finite overload bursts, at the cost model's device KV and at a tenth of it.

    python scripts/repro_fastserve.py --out out/repro --jobs 2          # the full run (5-7 min on 2 cores)
    python scripts/repro_fastserve.py --out out/repro --report-only      # tables and plots again from out/repro/results.json
    python scripts/repro_fastserve.py --out /tmp/r --quick               # a smoke run (seconds)
    python scripts/repro_fastserve.py --out out/seeds --jobs 2 --seeds 0 1 2   # three arrival draws (~20 min)

Setup (the paper's): OPT-13B on one A100 (the shipped opt-13b-a100 cost model), batch 16,
2,048 tokens per iteration, 16-token blocks, 400 requests per run with Poisson arrivals at
rates given as multiples of the capacity the cost model implies for each workload
(workload.capacity_rps): steady 0.5-0.95 and bursts of 1.5-8x. The host pool is 68,000
tokens (41,943 with a tenth of the device KV, so host plus device stay about the same).

Workloads (prompt + output <= 5,933 tokens everywhere, so that the tenth-memory runs serve the
same requests):
    azure   the shared Azure LLM conversation trace (2023), first 400 rows that fit
    heavy   Azure prompts with bounded-Pareto outputs of the same mean (workload.heavy_tailed_trace)
    chat    chat-like: prompts <= 1,024, log-normal outputs (mean ~410), prompt + output <= 2,048
    code    code completion: prompts of 1-2k tokens, outputs of a few dozen
  and, only when named with --workloads (not in the default run):
    lognormal  the azure rows' prompts with log-normal outputs of the same mean, sigma 0.9
               (workload.lognormal_trace; the longest output of the 400 is 1,791 tokens):
               its throughput checks show the drain at the end of a burst (docs/scheduling.md)

Configurations: fcfs with recompute (vLLM-like, the baseline of the latency ratios), and every
policy with every swap policy (predictive with no predictor given: it ranks on its own
prompt-length predictions where those pass its gate, and is skip-join MLFQ elsewhere). Throughput is compared with fcfs under the same swap policy
("the same setting"). The report checks the issue's targets and prints PASS/FAIL per target
with the figures; results.json keeps every run's metrics, the PNGs are latency per token
against rate, one curve per configuration (the paper's Figure 11).

Arrival seeds (`--seeds`, default 0): each seed draws other Poisson arrival times for the same
requests. Past capacity a 400-request run's figures depend on that draw, so a target met in one
draw may be missed in the next. With several seeds the report opens with each target's outcome
in every seed (those missed in any seed, with each seed's figures), then gives the full report
per seed; the PNGs are the first seed's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from dataclasses import replace


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastserve_jax import AZURE_TRACE  # noqa: E402
from fastserve_jax.cost_model import CostModel  # noqa: E402
from fastserve_jax.slo import (UNLOADED_SLO_FACTOR, request_latencies, slo_attainment, sweep_summary,  # noqa: E402
                                   unloaded_latency_per_token)
from fastserve_jax.serve.sweep_report import PAST_SERVED, past_served, rate_cell  # noqa: E402
from repro_checks import Checks  # noqa: E402
from fastserve_jax.sim import SimConfig, simulate  # noqa: E402
from fastserve_jax.workload import (TraceRequest, capacity_rps, chat_like_trace, code_completion_trace,  # noqa: E402
                                    heavy_tailed_trace, load_trace, lognormal_trace, with_arrivals)

AZURE = AZURE_TRACE        # shipped with the package (fastserve_jax/traces)
COST = "opt-13b-a100"
STEADY = (0.5, 0.75, 0.9, 0.95)
BURSTS = (1.5, 3.0, 8.0)
MEMORY = {"full": (0, 68_000), "tenth": (5_933, 41_943)}        # (device KV tokens (0: the cost model's), host)
POLICIES = ("fcfs", "mlfq", "skip-join-mlfq", "gittins", "predictive", "srpt")
SWAPS = ("proactive", "reactive", "recompute")
MAX_TOKENS = 5_933                                               # a tenth of the cost model's device KV
BLOCK = 16
WORKLOADS = ("azure", "heavy", "chat", "code", "lognormal")
DEFAULT_WORKLOADS = WORKLOADS[:4]


def workloads(n: int, seed: int = 0) -> dict[str, list[TraceRequest]]:
    azure, _ = load_trace(AZURE)
    fits = [r for r in azure if r.prompt_tokens + r.output_tokens <= MAX_TOKENS]
    heavy = [r for r in heavy_tailed_trace(fits, 4 * n, seed=seed) if r.prompt_tokens + r.output_tokens <= MAX_TOKENS]
    return {"azure": fits[:n], "heavy": heavy[:n], "chat": chat_like_trace(fits, n, seed=seed),
            "code": code_completion_trace(n, seed=seed),
            "lognormal": lognormal_trace(fits, n, max_tokens=MAX_TOKENS - BLOCK, seed=100 + seed)}


def _run(job: tuple) -> dict:
    wl, mem, policy, swap, x, trace, cfg, rate, seed = job
    cost = CostModel.load(COST)
    t0 = time.perf_counter()
    res = simulate(with_arrivals(trace, rate, seed=seed), policy, cost, cfg)
    _, ttft, tpot, _ = request_latencies(res.requests)
    return dict(workload=wl, memory=mem, policy=policy, swap=swap, x=x, seed=seed, offered_rps=rate,
                wall=time.perf_counter() - t0, slo_attainment=slo_attainment(ttft, tpot), **res.metrics())


def run_all(a: argparse.Namespace) -> list[dict]:
    cost = CostModel.load(COST)
    loads = a.loads or list(STEADY + BURSTS)
    jobs = []
    for wl, trace in workloads(a.requests).items():
        if wl not in (a.workloads or DEFAULT_WORKLOADS):
            continue
        for mem, (dev, host) in MEMORY.items():
            base = SimConfig(16, 2048, 16, dev, host_kv_capacity_tokens=host)
            cap = capacity_rps(trace, cost, 16, (base.num_blocks(cost) - 1) * 16)
            for policy in POLICIES:
                for swap in SWAPS:
                    for x in loads:
                        for seed in a.seeds:
                            jobs.append((wl, mem, policy, swap, x, trace, replace(base, swap_policy=swap), x * cap, seed))
    print(f"{len(jobs)} simulations on {a.jobs} processes", file=sys.stderr)
    out = []
    with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
        for i, r in enumerate(pool.map(_run, jobs, chunksize=1)):
            out.append(r)
            if i % 50 == 49:
                print(f"  {i + 1}/{len(jobs)}", file=sys.stderr, flush=True)
    return out


# -- the report ------------------------------------------------------------------------------
def _index(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["workload"], r["memory"], r["policy"], r["swap"], r["x"]): r for r in rows}


def _unloaded(a, wl_traces) -> dict[str, float]:
    cost = CostModel.load(COST)
    return {wl: unloaded_latency_per_token(t, cost, 2048) for wl, t in wl_traces.items()}


def report(rows: list[dict], unloaded: dict[str, float], out_dir: str | None) -> tuple[str, Checks]:
    """The report of one seed's rows, and its checks; plots into `out_dir` unless None."""
    idx = _index(rows)
    wls = sorted({r["workload"] for r in rows}, key=WORKLOADS.index)
    xs = sorted({r["x"] for r in rows})
    lines, c = [], Checks()
    for wl in wls:
        for mem in MEMORY:
            lines.append(f"\n### {wl}, device KV {mem} (rate as a multiple of capacity)\n")
            lines.append("| config | " + " | ".join(f"{x:g}x" for x in xs) + " |")
            lines.append("|---" * (len(xs) + 1) + "|")
            for policy in POLICIES:
                for swap in SWAPS:
                    cells = []
                    for x in xs:
                        r, f = idx.get((wl, mem, policy, swap, x)), idx.get((wl, mem, "fcfs", swap, x))
                        if r is None:
                            cells.append("")
                            continue
                        cells.append(f"{r['mean_latency_per_token'] * 1e3:.0f} ms, {r['throughput_rps'] / f['throughput_rps']:.2f}"
                                     f"{', stall ' + format(r['swap_stall_fraction'], '.0%') if r['swap_stall_fraction'] > 0.005 else ''}")
                    lines.append(f"| {policy}/{swap} | " + " | ".join(cells) + " |")
            # -- targets for this workload and memory --
            for policy in POLICIES:
                for swap in SWAPS:
                    for x in xs:
                        r, f = idx.get((wl, mem, policy, swap, x)), idx.get((wl, mem, "fcfs", swap, x))
                        if r is None or f is None:
                            continue
                        ratio = r["throughput_rps"] / f["throughput_rps"]
                        if ratio < 0.95 or r["swap_stall_fraction"] > 0.05:
                            c.check(False, f"{wl}/{mem}/{policy}/{swap} at {x:g}x: throughput {ratio:.3f} of fcfs, "
                                           f"stall {r['swap_stall_fraction']:.1%}", (wl, mem, policy, swap, x, "throughput"))
            slo = UNLOADED_SLO_FACTOR * unloaded[wl]
            good = {}
            for policy in POLICIES:
                for swap in SWAPS:
                    pts = [idx[(wl, mem, policy, swap, x)] for x in xs if (wl, mem, policy, swap, x) in idx]
                    if pts:
                        good[(policy, swap)] = sweep_summary(pts, slo)
            lowest = min(r["offered_rps"] for r in rows if r["workload"] == wl and r["memory"] == mem)
            none = dict(goodput_rps=None, max_offered_rps=lowest)
            fr = good.get(("fcfs", "recompute"), none)
            sj = good.get(("skip-join-mlfq", "proactive"), none)
            shown = {k: g for k, g in good.items() if k[1] != "reactive" or k[0] == "skip-join-mlfq"}
            lines.append(f"\ngoodput (mean latency per token <= {slo * 1e3:.0f} ms, 5x unloaded; >=: every rate "
                         "swept met it; *: above every rate served): " +
                         ", ".join(f"{p}/{s} {rate_cell(g['goodput_rps'], g['max_offered_rps'])}"
                                   f"{'*' if past_served(g) else ''}" for (p, s), g in shown.items()))
            if any(past_served(g) for g in shown.values()):
                lines.append(f"(*: {PAST_SERVED})")
            base = ("fcfs", "recompute")
            for x in xs:
                f, s = idx.get((wl, mem) + base + (x,)), idx.get((wl, mem, "skip-join-mlfq", "proactive", x))
                if f is None or s is None:
                    continue
                lpt = f["mean_latency_per_token"] / s["mean_latency_per_token"]
                p99 = s["p99_jct"] / f["p99_jct"]
                if wl in ("azure", "heavy") and mem == "full" and x >= 1.5:
                    c.check(lpt >= 2.0, f"{wl}/{mem} {x:g}x burst: skip-join latency per token {lpt:.2f}x better than "
                                        "fcfs/recompute (target >= 2x)", (wl, mem, x, "burst gain"))
                if wl in ("azure", "heavy") and mem == "full":
                    c.check(p99 <= 2.0, f"{wl}/{mem} {x:g}x: skip-join p99 JCT {p99:.2f}x fcfs's (target <= 2x)",
                            (wl, mem, x, "p99"))
                if mem == "tenth" or wl in ("code", "chat", "lognormal"):
                    c.check(lpt >= 1.0, f"{wl}/{mem} {x:g}x: skip-join latency per token {lpt:.2f}x fcfs/recompute's "
                                        "(target: no worse)", (wl, mem, x, "no worse"))
                g = idx.get((wl, mem, "gittins", "proactive", x))
                if g is not None:
                    best = min(f["mean_jct"], s["mean_jct"])
                    c.check(g["mean_jct"] <= 1.05 * best, f"{wl}/{mem} {x:g}x: gittins mean JCT {g['mean_jct']:.1f} s, "
                                                          f"{g['mean_jct'] / best:.2f}x the better of fcfs and skip-join",
                            (wl, mem, x, "gittins"))
            if wl in ("azure", "heavy"):
                c.goodput(sj, fr, 1.5, f"{wl}/{mem}: skip-join/proactive goodput {sj['goodput_rps'] or 0:.3f} req/s vs "
                                       f"fcfs/recompute {fr['goodput_rps'] or 0:.3f}", (wl, mem, "goodput"), lowest)
            if mem == "tenth":
                for other in ("recompute", "reactive"):
                    o = good.get(("skip-join-mlfq", other), none)
                    c.goodput(sj, o, 1.3, f"{wl}/{mem}: skip-join goodput proactive {sj['goodput_rps'] or 0:.3f} vs "
                                          f"{other} {o['goodput_rps'] or 0:.3f} req/s", (wl, mem, "goodput", other), lowest)
            if out_dir is not None:
                _plot(idx, wl, mem, xs, os.path.join(out_dir, f"{wl}_{mem}.png"))
    text = ("## headline\n" + headline(rows) + "\n\n## every configuration\n\ncells: mean latency per token, "
            "throughput / fcfs's under the same swap policy, swap stall share of busy time when over 0.5%\n" +
            "\n".join(lines) + "\n\n## targets\n\n" + "\n".join(c.lines) +
            f"\n\n{c.failed} of {c.checked} checks failed\n")
    return text, c


def across_seeds(checks: dict[int, Checks]) -> str:
    """Each target's outcome over the seeds: a count, then every target missed or not measured
    in some seed with each seed's line (a seed where it was not checked, e.g. a throughput
    target met there, is listed as passed)."""
    seeds = sorted(checks)
    met = (True, "PASS  (not listed: met)")          # a seed that did not list the target
    keys = list(dict.fromkeys(k for s in seeds for k in checks[s].outcomes))
    every = some = unmeasured = 0
    lines = []
    for k in keys:
        got = [checks[s].outcomes.get(k, met)[0] for s in seeds]
        missed = got.count(False)
        if missed == len(seeds):
            every += 1
        elif missed:
            some += 1
        elif None in got:
            unmeasured += 1
        else:
            continue
        unknown = f"not measured in {got.count(None)}" if None in got else ""
        lines.append((f"FAIL in {missed} of {len(seeds)} seeds" + (f", {unknown}" if unknown else "") if missed
                      else f"{unknown.capitalize()} of {len(seeds)} seeds, met in the others") + ":")
        for s in seeds:
            line = checks[s].outcomes.get(k, met)[1]
            lines.append(f"    seed {s}: {line}")
    head = (f"## targets across arrival seeds {', '.join(map(str, seeds))}\n\n"
            f"{len(keys)} targets (the throughput ones only where missed); missed in every seed: {every}; "
            f"in some seeds: {some}; met where measured, not measured in some seeds: {unmeasured}; "
            f"met in every seed: {len(keys) - every - some - unmeasured}\n")
    return head + "\n" + "\n".join(lines) + "\n"


HEADLINE = (("fcfs", "recompute"), ("skip-join-mlfq", "proactive"), ("skip-join-mlfq", "recompute"),
            ("gittins", "proactive"), ("predictive", "proactive"), ("srpt", "proactive"))


def headline(rows: list[dict]) -> str:
    """Per workload and memory: mean latency per token of the main configurations, skip-join's
    and predictive's (its own prompt-length predictions, no predictor given) gain over
    fcfs/recompute, and the lowest throughput of any configuration against fcfs's
    under the same swap policy."""
    idx = _index(rows)
    out = []
    for wl in sorted({r["workload"] for r in rows}, key=WORKLOADS.index):
        for mem in MEMORY:
            xs = sorted({r["x"] for r in rows if r["workload"] == wl and r["memory"] == mem})
            out += [f"\n{wl}, device KV {mem}: mean latency per token (ms)\n",
                    "| rate | " + " | ".join(f"{p}/{s}" for p, s in HEADLINE) +
                    " | skip-join gain | predictive gain | lowest throughput vs fcfs |", "|---" * (len(HEADLINE) + 4) + "|"]
            for x in xs:
                cells = [f"{idx[(wl, mem, p, s, x)]['mean_latency_per_token'] * 1e3:.0f}" for p, s in HEADLINE]
                f, sj = idx[(wl, mem, "fcfs", "recompute", x)], idx[(wl, mem, "skip-join-mlfq", "proactive", x)]
                pr = idx[(wl, mem, "predictive", "proactive", x)]
                low = min((idx[(wl, mem, p, s, x)]["throughput_rps"] / idx[(wl, mem, "fcfs", s, x)]["throughput_rps"], p, s)
                          for p in POLICIES for s in SWAPS)
                out.append(f"| {x:g}x ({f['offered_rps']:.2f}/s) | " + " | ".join(cells) +
                           f" | {f['mean_latency_per_token'] / sj['mean_latency_per_token']:.2f}x"
                           f" | {f['mean_latency_per_token'] / pr['mean_latency_per_token']:.2f}x"
                           f" | {low[0]:.2f} ({low[1]}/{low[2]}) |")
    return "\n".join(out)


def _plot(idx, wl, mem, xs, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for policy, swap in [("fcfs", "recompute"), ("skip-join-mlfq", "proactive"), ("skip-join-mlfq", "reactive"),
                         ("skip-join-mlfq", "recompute"), ("gittins", "proactive"), ("predictive", "proactive"),
                         ("srpt", "proactive")]:
        pts = [(idx[k]["offered_rps"], idx[k]["mean_latency_per_token"]) for x in xs
               if (k := (wl, mem, policy, swap, x)) in idx]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{policy} / {swap}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("mean latency per output token (s)")
    ax.set_yscale("log")
    ax.set_title(f"{wl}, device KV {mem}: opt-13b-a100, batch 16, 2,048 tokens, 400 requests", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json, report.md and the PNGs")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--loads", type=float, nargs="+", help="rates as multiples of capacity (default: steady and bursts)")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS,
                    help=f"default: {' '.join(DEFAULT_WORKLOADS)} (lognormal only when named)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="arrival seeds (default: 0); with several, the report compares the targets across them")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="40 requests, 3 rates: a smoke run")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from OUT/results.json")
    a = ap.parse_args()
    if len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0:
        ap.error(f"--seeds must be distinct integers >= 0, got {' '.join(map(str, a.seeds))}")
    if a.quick:
        a.requests, a.loads = 40, a.loads or [0.5, 1.5, 8.0]
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    t0 = time.perf_counter()
    if a.report_only:
        with open(path) as f:
            rows = json.load(f)
    else:
        rows = run_all(a)
        with open(path, "w") as f:
            json.dump(rows, f)
    for r in rows:
        r.setdefault("seed", 0)                # results.json written before seeds were recorded
    # the unloaded figure (the SLO's base) over the requests the rows ran: --report-only read
    # --requests' default (400) for a --quick run's 40 until 2026-12-07
    n = max(r["num_requests"] for r in rows) if a.report_only else a.requests
    traces = {wl: t for wl, t in workloads(n).items() if wl in {r["workload"] for r in rows}}
    unloaded = _unloaded(a, traces)
    seeds = sorted({r["seed"] for r in rows})
    texts, checks = [], {}
    for seed in seeds:
        text, checks[seed] = report([r for r in rows if r["seed"] == seed], unloaded,
                                    a.out if seed == seeds[0] else None)
        texts.append(text)
    if len(seeds) == 1:
        text = texts[0]
    else:
        text = across_seeds(checks) + "".join(f"\n# arrival seed {s}\n\n{t}" for s, t in zip(seeds, texts))
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"[{time.perf_counter() - t0:.0f} s; report in {a.out}/report.md]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
