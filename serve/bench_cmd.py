"""`fastserve-jax bench` (and scripts/bench_serving.py): HTTP load against the server.

Requests come from the Azure conversation trace: each becomes a counting prompt for the
demo model whose answer has the trace's output length (times --output-scale, clipped to
the 257 tokens the demo model answers reliably), so every answer is checkable: a wrong one
counts as `wrong` unless it comes back the same when sent alone, the demo model's own miss
(about 0.6% of pairs; bench_answers.own_misses), named in a note (the JSON's `model_misses`);
each row's failed and wrong requests are listed on stderr with their reasons. With
--output-dist chat the output lengths are drawn instead over the demo model's whole range,
2 to 257 tokens, skewed short with a long tail like chat answers (workload.chat_output_lengths:
median 16, mean 44, the longest 10% carry 43% of the tokens). Arrivals are Poisson at each
--rate, or the trace's own timestamps (a contiguous window) scaled to that mean rate. Every
request streams; latencies are measured by the client. Another model gets `--dataset random`
(the default for a --model, or a --url server that does not serve "demo"): prompts of random
token ids with the trace's prompt lengths, answers of exactly its output lengths
(`ignore_eos`), checked by their length (bench_random.py).

Either bench a running server (--url; its policy comes from /health, and the engine options,
--scheduler and --engine-process, which configure a started server, are ignored with a
warning), or let the command start `fastserve-jax serve` once per --scheduler, on a free port
with the engine options given here (and --warmup full unless --warmup is given, so nothing
loads or compiles while the load runs), and stop it after its rates. The trace, the
workload and the engine options (as `generate` checks them) are checked before any server
starts; a server that exits before it is ready ends the command with its log's last error line.

Every row has the offered rate and the served throughput, mean latency per output token and
the attainment of each --slo pair (fastserve_jax/slo.py; a failed request misses every
pair, and a rate with one has no goodput; a rate where none completes is a row of failures,
and the sweep goes on). With several rates the command also reports, per scheduler, the goodput (highest rate
whose mean latency per token is within --slo-latency-per-token, by default 5x the value of
--unloaded-probe requests sent one at a time to the first server) and the highest rate at
which 95% of requests attain each pair; the JSON has them under "summary".
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np

from fastserve_jax.slo import PAPER_SLOS, UNLOADED_SLO_FACTOR, mean_latency_per_token, slo_attainment, \
    sweep_summary
from fastserve_jax.scheduler import POLICIES
from fastserve_jax import AZURE_TRACE
from fastserve_jax.workload import TraceRequest, chat_output_lengths, load_trace, with_arrivals

# fastserve_jax.models (demo_task) is imported in the functions that use it: it imports flax
# and jax, which `fastserve-jax --help`, `simulate` and `serve`'s own start do without
from fastserve_jax.serve import bench_client
from fastserve_jax.serve.bench_report import print_table, write_json
from fastserve_jax.serve.bench_answers import answer_problem, answer_problems, own_misses, report_problems
from fastserve_jax.serve.bench_random import random_workload, served_models, server_vocabulary
from fastserve_jax.serve.bench_server import LaunchedServer, ServerNotReady, server_health
from fastserve_jax.serve.engine_args import add_engine_args, check_engine_args, engine_argv, parse_engine_args
from fastserve_jax.serve.simulate_cmd import add_slo_args, check_output, check_rates, seed_arg
from fastserve_jax.serve.sweep_report import print_summary

DEMO_MAX_TOKENS = 257   # the shipped demo model answers spans B - A <= 255: 256 numbers + EOS
TRACE = AZURE_TRACE      # shipped with the package (fastserve_jax/traces); it was ../shared's, not in an install


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure TTFT, TPOT, inter-token and end-to-end latency over HTTP at several arrival rates",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve",
        epilog="examples:\n"
               "  fastserve-jax bench --scheduler fcfs --scheduler skip-join-mlfq --rate 4 --rate 8\n"
               "  fastserve-jax bench --url http://127.0.0.1:8000 --rate 5 --arrivals trace")
    add_engine_args(p)            # for started servers; --scheduler below replaces the engine's own
    g = p.add_argument_group("load")
    g.add_argument("--url", default=None,
                   help="a running server, http://HOST:PORT (default: start one per --scheduler); the engine "
                        "options, --scheduler and --engine-process only configure a started server, so with --url "
                        "they are ignored with a warning")
    g.add_argument("--scheduler", action="append", choices=sorted(POLICIES),
                   help="policy of a started server (repeatable; default: fcfs and skip-join-mlfq; ignored with "
                        "--url, whose server reports its own)")
    g.add_argument("--engine-process", action="store_true",
                   help="started servers run their engine in a process of their own (serve --engine-process; "
                        "ignored with --url)")
    g.add_argument("--rate", action="append", type=float, help="mean arrivals per second (repeatable; default 4)")
    g.add_argument("--arrivals", default="poisson", choices=["poisson", "trace"],
                   help="poisson gaps, or the trace's own timestamps scaled to the rate")
    g.add_argument("--num-requests", type=int, default=80, help="requests per rate")
    g.add_argument("--dataset", default="auto", choices=["auto", "counting", "random"],
                   help="counting prompts with checked answers (the demo model), or random token-id prompts "
                        "of the trace's prompt lengths answered with exactly its output lengths (any model; "
                        "vLLM's random dataset); auto: counting for the demo model, else random")
    g.add_argument("--output-dist", default="trace", choices=["trace", "chat"],
                   help="output lengths: the trace's (times --output-scale), or chat-like over 2..257 tokens (random: "
                        "to half the context), skewed short with a long tail (workload.chat_output_lengths)")
    g.add_argument("--output-scale", type=float, default=None,
                   help="trace output lengths are multiplied by this (--output-dist trace; default 0.5 for "
                        "counting, whose answers stop at 257 tokens, 1 for random)")
    g.add_argument("--trace", default=TRACE, help="CSV with num_decode_tokens (and arrived_at for --arrivals trace), or Azure's "
                   "published GeneratedTokens (and TIMESTAMP)")
    g.add_argument("--api-key", default=None, help="bearer token for the server")
    g.add_argument("--workload-seed", type=seed_arg, default=0, help="seed of the sampled requests and arrivals")
    g.add_argument("--json", default=None, help="also write the figures to this file")
    g.add_argument("--unloaded-probe", type=int, default=4, metavar="N",
                   help="with several rates: N of the workload's requests sent one at a time to the first server, "
                        "to measure the unloaded latency per token (default 4; not sent with "
                        "--slo-latency-per-token)")
    add_slo_args(p, f"default: {UNLOADED_SLO_FACTOR:g}x the unloaded value --unloaded-probe measures")
    p.set_defaults(func=cmd_bench)


def pick_requests(trace: str, n: int, timed: bool, rate: float, seed: int):
    """n rows of the trace, their arrival offsets (seconds) and the generator that picked them
    (build_workload draws on from it): with `timed`, a contiguous window of the trace's own
    times scaled to a mean of `rate` per second; else n distinct rows, Poisson at `rate`. numpy
    only, so cmd_bench checks the workload with it before it starts a server: a trace without
    arrived_at (timed) or with fewer than n rows raises a ValueError."""
    rows, has_times = load_trace(trace)
    if timed and not has_times:
        raise ValueError(f"{trace} has no arrival times (arrived_at or TIMESTAMP); use --arrivals poisson")
    if len(rows) < n:
        raise ValueError(f"{trace} has {len(rows)} requests, fewer than the {n} asked; lower --num-requests")
    rng = np.random.default_rng(seed)
    if timed:
        start = int(rng.integers(0, max(1, len(rows) - n)))
        picked = rows[start:start + n]
        t = np.array([r.arrival for r in picked]) - picked[0].arrival
        arrivals = list(t * (len(picked) - 1) / (rate * t[-1])) if t[-1] > 0 else [0.0] * len(picked)
    else:
        picked = [rows[i] for i in rng.choice(len(rows), n, replace=False)]
        arrivals = [r.arrival for r in with_arrivals([TraceRequest(0, 1, 1)] * n, rate, seed=seed)]
    return picked, arrivals, rng


def build_workload(trace: str, n: int, scale: float, timed: bool, rate: float, seed: int,
                   output_dist: str = "trace"):
    """[(payload, (A, B))] and arrival offsets (seconds) for n requests (pick_requests); output
    lengths from the picked trace rows (times `scale`), or with output_dist="chat" from
    chat_output_lengths."""
    from fastserve_jax.models import demo_task
    if output_dist not in ("trace", "chat"):
        raise ValueError(f"output_dist must be 'trace' or 'chat', got {output_dist!r}")
    picked, arrivals, rng = pick_requests(trace, n, timed, rate, seed)
    lengths = ([max(2, round(min(r.output_tokens * scale, DEMO_MAX_TOKENS))) for r in picked]
               if output_dist == "trace" else chat_output_lengths(len(picked), 2, DEMO_MAX_TOKENS, seed=seed))
    work = []
    for length in lengths:
        a, b = demo_task.pair_for_output_len(length, rng)
        work.append((dict(prompt=demo_task.make_prompt(a, b), max_tokens=demo_task.answer_num_tokens(a, b),
                          temperature=0, stream=True, stream_options={"include_usage": True}), (a, b)))
    return work, arrivals


def slo_figures(results: list[bench_client.Result], slos) -> dict:
    """Mean latency per token (over completed requests; inf where none did) and SLO attainment
    (over all sent: a failed request misses every pair), from the client's timings
    (bench_client's definitions)."""
    done = [r.ok and bool(r.chunk_times) and (r.completion_tokens or 0) >= 1 for r in results]
    ttft = np.array([r.chunk_times[0] - r.sent if d else np.inf for r, d in zip(results, done)])
    tpot = np.array([np.inf if not d else np.nan if r.completion_tokens == 1 else
                     (r.chunk_times[-1] - r.chunk_times[0]) / (r.completion_tokens - 1) for r, d in zip(results, done)])
    fin = [r for r, d in zip(results, done) if d]
    return dict(mean_latency_per_token=mean_latency_per_token([r.end - r.sent for r in fin],
                                                              [r.completion_tokens for r in fin]) if fin else np.inf,
                slo_attainment=slo_attainment(ttft, tpot, slos) if slos else [])


# The demo model misses about 0.6% of counts on its own; where more of a row's answers than this
# share (or one) come back wrong alike when sent alone, they count as wrong: an engine that
# answers wrongly whatever the load would pass for the model's misses.
MODEL_MISS_SHARE = 0.03


def run_rate(url: str, work, arrivals, api_key: str | None, slos) -> dict:
    """One row's figures; `problems`: its failed and wrong requests in words (answer_problems),
    less the demo model's own misses (own_misses), which `model_misses` counts."""
    results = asyncio.run(bench_client.run_load(url, [w[0] for w in work], arrivals, api_key=api_key))
    m = bench_client.summarize(results)
    m.update(slo_figures(results, slos))
    wrong = [i for i, (r, (_, want)) in enumerate(zip(results, work)) if r.ok and answer_problem(r, want)]
    misses = own_misses(url, work, results, wrong, api_key)
    if len(misses) > max(1, MODEL_MISS_SHARE * len(work)):     # far more than the model misses: the engine's
        misses = set()
    m["model_misses"] = len(misses)
    m["wrong"] = len(wrong) - len(misses)
    m["problems"] = [p for i, p in answer_problems(results, work, numbered=True) if i not in misses]
    return m


def probe_unloaded(url: str, work, api_key: str | None) -> float:
    """Mean latency per token of these requests, each sent after the one before has finished."""
    results = [asyncio.run(bench_client.run_load(url, [w[0]], [0.0], api_key=api_key))[0] for w in work]
    failed = [r.error or f"status {r.status}" for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of the {len(work)} unloaded probe requests failed: {failed[0]}")
    return slo_figures(results, ())["mean_latency_per_token"]


def workload_builder(a: argparse.Namespace, url: str):
    """(n, timed, rate, seed) -> (work, arrivals) for the server at `url`: counting requests
    (build_workload) or, with --dataset random (auto: unless it serves "demo"), random ones."""
    dataset = a.dataset
    if dataset == "auto":
        served = served_models(url, a.api_key)
        dataset = "counting" if "demo" in served else "random"
        print(f"  --dataset auto: {dataset} (the server serves {served or 'no model it lists'})", file=sys.stderr)
    a.dataset = dataset                 # for the JSON
    if a.output_scale is None:
        a.output_scale = 0.5 if dataset == "counting" else 1.0
    if dataset == "counting":
        return lambda n, timed, rate, seed: build_workload(a.trace, n, a.output_scale, timed, rate, seed,
                                                           a.output_dist)
    ids, limit = server_vocabulary(url, a.api_key)

    def make(n: int, timed: bool, rate: float, seed: int):
        picked, arrivals, _ = pick_requests(a.trace, n, timed, rate, seed)
        return random_workload(picked, ids, limit, a.output_scale, a.output_dist, seed), arrivals
    return make


def launch_only_flags(a: argparse.Namespace) -> list[str]:
    """The options given (at other than their defaults) that only configure a server bench
    starts: the engine options, --scheduler and --engine-process. With --url nothing reads them."""
    defaults = vars(parse_engine_args([]))
    flags = ["--no-protect-decodes" if k == "protect_decodes" else "--" + k.replace("_", "-")
             for k, v in defaults.items() if k != "scheduler" and getattr(a, k) != v]
    return flags + ["--scheduler"] * bool(a.scheduler) + ["--engine-process"] * a.engine_process


def cmd_bench(a: argparse.Namespace) -> int:
    rates = sorted(a.rate or [4.0])
    for bad, msg in ((a.unloaded_probe < 1, f"--unloaded-probe must be >= 1, got {a.unloaded_probe}"),
                     (a.num_requests < 1, f"--num-requests must be >= 1, got {a.num_requests}"),
                     (a.output_scale is not None and not (np.isfinite(a.output_scale) and a.output_scale > 0),
                      # NaN failed once a server ran
                      f"--output-scale must be a finite number > 0, got {a.output_scale}"),
                     (not all(np.isfinite(r) and r > 0 for r in rates),
                      f"every --rate must be a finite number > 0 requests/s, got {rates} (for vLLM's --request-rate "
                      "inf, every request at once, give a rate far past capacity, as 1e6)"),
                     (len(set(rates)) < len(rates), f"--rate {max(rates, key=rates.count)} is given twice"),
                     (len(set(a.scheduler or ())) < len(a.scheduler or ()),     # the JSON kept only the last's rows
                      f"--scheduler {max(a.scheduler or [''], key=(a.scheduler or []).count)} is given twice")):
        if bad:
            print(f"error: {msg}", file=sys.stderr)
            return 2
    try:
        check_rates(rates, "--rate")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ignored = launch_only_flags(a) if a.url is not None else []
    if ignored:
        print(f"warning: {' '.join(ignored)} configure a server that bench starts; with --url they are "
              f"ignored, and the table names the policy the server at {a.url} reports", file=sys.stderr)
    targets = [None] if a.url is not None else (a.scheduler or ["fcfs", "skip-join-mlfq"])
    try:            # bad input fails here, before a server starts and warms up
        pick_requests(a.trace, a.num_requests, a.arrivals == "trace", rates[0], a.workload_seed)
        check_output(a.json, "--json")                      # not after the servers ran
        health = server_health(a.url) if a.url is not None else {}   # "" too (an unset $URL: a traceback)
        if a.url is None:
            check_engine_args(a, targets[0])                # as `generate` says them, not in a server's log
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slos, slo_lpt, unloaded = a.slo or PAPER_SLOS, a.slo_latency_per_token, None
    sweep = len(rates) > 1
    rows, out = [], {}
    for sched in targets:
        server = None
        if a.url is None:
            # a benchmark measures the steady state: with serve's background warm-up the server
            # loads or compiles the rest of its shapes while the load runs, padding launches to
            # what is ready (skip-join, 400 requests at 250 req/s: 39.7 req/s, TTFT 1.5 s; full: 65.7, 69 ms)
            server = LaunchedServer(sched, engine_argv(a) + (["--warmup", "full"] if a.warmup is None else []) +
                                    (["--engine-process"] if a.engine_process else []))
            print(f"starting a server with scheduler {sched} (log: {server.log.name}) ...", file=sys.stderr)
        try:
            url = a.url or server.url
            if server is not None:
                server.wait_ready()
                health = server_health(url)
            sched = health.get("scheduler", sched or "?")
            make = workload_builder(a, url)
            warm, _ = make(min(2, a.num_requests), False, 1.0, a.workload_seed + 1)
            warmed = asyncio.run(bench_client.run_load(url, [w[0] for w in warm], [0.0] * len(warm),
                                                       api_key=a.api_key))   # touch every code path once
            failed = [r for r in warmed if not r.ok]
            if failed:      # a wrong key, a dead server: say so, not a table of failures
                raise ValueError(f"the first request failed: {failed[0].error or f'status {failed[0].status}'}"
                                 + ("; give the server's key with --api-key" if failed[0].status == 401 else ""))
            if sweep and slo_lpt is None:
                # one request at a time is served alike by every policy: the first server's probe sets the
                # SLO that every scheduler's goodput is held to
                work, _ = make(a.num_requests, a.arrivals == "trace", rates[0], a.workload_seed)
                unloaded = probe_unloaded(url, work[:a.unloaded_probe], a.api_key)
                slo_lpt = UNLOADED_SLO_FACTOR * unloaded
                print(f"  unloaded: {1e3 * unloaded:.1f} ms per output token over {min(a.unloaded_probe, len(work))} "
                      f"requests sent one at a time; latency/token SLO {1e3 * slo_lpt:.1f} ms", file=sys.stderr)
            for rate in rates:
                work, arrivals = make(a.num_requests, a.arrivals == "trace", rate, a.workload_seed)
                m = dict(offered_rps=rate, **run_rate(url, work, arrivals, a.api_key, slos))
                rows.append((sched, rate, m))
                out.setdefault(sched, {})[str(rate)] = m
                print(f"  {sched} at {rate} req/s: {int(m['completed'])} done, {int(m['failed'])} failed, "
                      f"e2e mean {m['e2e_mean']:.2f} s", file=sys.stderr)
                report_problems(m)
        except (ServerNotReady, ValueError, RuntimeError) as e:   # stopped below, its log kept (probe_unloaded's)
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            if server is not None:
                server.stop()
        if server is not None:
            server.discard_log()
    print()
    print_table(rows)
    summary = {}
    if sweep:
        summary = {s: dict(sweep_summary(list(ms.values()), slo_lpt), unloaded_latency_per_token=unloaded)
                   for s, ms in out.items()}
        print()
        print_summary(summary, sys.stdout)
    wrote = write_json(a.json, a, out, summary) if a.json else True
    wrong, failed, misses = (sum(int(m[k]) for _, _, m in rows) for k in ("wrong", "failed", "model_misses"))
    if misses:
        print(f"note: {misses} answer(s) the demo model gives wrong on its own (the same text again when sent "
              "alone) are not counted as wrong", file=sys.stderr)
    if wrong or failed:
        hint = ("; --dataset counting checks the demo model's counts: for another model use --dataset random"
                if wrong and a.dataset == "counting" else "")
        print(f"error: {wrong} wrong answer(s) and {failed} failed request(s) over the rows above{hint}",
              file=sys.stderr)
    return 1 if wrong or failed or not wrote else 0
