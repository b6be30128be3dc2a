"""The simulator: literal schedules worked out by hand, invariants on random workloads, and
the `simulate` command line. No model, no jax."""

from __future__ import annotations

import dataclasses

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve_jax import AZURE_TRACE
from fastserve_jax.config import SchedulerConfig
from fastserve_jax.cost_model import CostModel
from fastserve_jax.scheduler import POLICIES
from fastserve_jax.sim import SimConfig, simulate
from fastserve_jax.workload import TraceRequest, capacity_rps, code_completion_trace, heavy_tailed_trace, load_trace, \
    lognormal_trace, save_trace, with_arrivals
from fastserve_jax.serve.cli import main

# 1 s per decode iteration at any batch; prefill 1 s up to 100 tokens, then 1 s per 100 tokens
UNIT = CostModel("unit", prefill_tokens=(1, 100, 400), prefill_seconds=(1.0, 1.0, 4.0),
                 decode_batch=(1,), decode_seconds=(1.0,), kv_capacity_tokens=10_000)
ONE_AT_A_TIME = SimConfig(max_num_seqs=1, max_num_batched_tokens=512, block_size=4,
                          scheduler_config=SchedulerConfig(base_quantum=1.0, quantum_ratio=2.0, num_queues=4,
                                                           starvation_threshold=0, protect_decodes=False))


def jcts(trace, policy, cfg=ONE_AT_A_TIME, cost=UNIT):
    res = simulate(trace, policy, cost, cfg)
    return [r.metrics.latency for r in res.requests]


def test_metrics_of_a_single_request():
    m = simulate([TraceRequest(0.0, 100, 3)], "fcfs", UNIT, ONE_AT_A_TIME).metrics()
    # prefill 0-1 s gives token 1, decodes 1-2 and 2-3 give tokens 2 and 3
    assert m["mean_jct"] == 3.0 and m["mean_ttft"] == 1.0 and m["mean_tpot"] == 1.0
    assert m["mean_latency_per_token"] == 1.0 and m["throughput_rps"] == pytest.approx(1 / 3)
    assert m["throughput_tps"] == 1.0 and m["iterations"] == 3


# The paper's argument for skip-join, on three jobs served one at a time (quanta 1, 2, 4, 8 s):
# J1 (t=0, prompt 100 = 1 s prefill, 8 tokens), J2 (t=0.5, prompt 400 = 4 s, 2 tokens),
# J3 (t=0.5, prompt 100 = 1 s, 2 tokens).
THREE = [TraceRequest(0.0, 100, 8), TraceRequest(0.5, 400, 2), TraceRequest(0.5, 100, 2)]


def test_three_job_example_fcfs():
    # J1 0-8, J2 8-13, J3 13-15
    assert jcts(THREE, "fcfs") == [8.0, 12.5, 14.5]


def test_three_job_example_plain_mlfq():
    # all join q0. J1: prefill 0-1, decode 1-2 (2 s > q0: to q1). J2 prefill 2-6 (to q1, behind J1):
    # its long prefill in the top queue blocks J3, which runs 6-8. J1 in q1 runs 8-11 (3 s > q1: to
    # q2), J2 finishes 11-12, J1 12-15.
    assert jcts(THREE, "mlfq") == [15.0, 11.5, 7.5]


def test_the_policy_charges_by_its_own_cost_model_while_the_clock_runs_on_another():
    """SimConfig.policy_cost (as the engine: the policy charges its own profile's time for a
    batch, Scheduler.service). On a clock twice as slow, MLFQ charged by its own model demotes
    after the same work, so every request finishes at exactly twice the unit clock's time
    (all arrive within the first iteration either way); charged by the clock it demotes twice
    as early, and the schedule changes."""
    slow = dataclasses.replace(UNIT, prefill_seconds=tuple(2 * t for t in UNIT.prefill_seconds),
                               decode_seconds=tuple(2 * t for t in UNIT.decode_seconds))

    def finishes(cfg, cost):
        return [j + t.arrival for j, t in zip(jcts(THREE, "mlfq", cfg, cost), THREE)]

    base = finishes(ONE_AT_A_TIME, UNIT)
    assert finishes(dataclasses.replace(ONE_AT_A_TIME, policy_cost=UNIT), slow) == [2 * f for f in base]
    assert finishes(ONE_AT_A_TIME, slow) != [2 * f for f in base]


def test_three_job_example_skip_join_beats_fcfs_and_mlfq():
    # J2's 4 s prefill skip-joins q2 directly, so J3 (q0) runs first: J1 0-2, J3 2-4, J1 4-7
    # (to q2, behind J2), J2 7-12, J1 12-15.
    sj = jcts(THREE, "skip-join-mlfq")
    assert sj == [15.0, 11.5, 3.5]
    mean = lambda xs: sum(xs) / len(xs)
    assert mean(sj) < mean(jcts(THREE, "mlfq")) < mean(jcts(THREE, "fcfs"))
    assert jcts(THREE, "gittins") == sj                     # no history yet: skip-join
    assert mean(jcts(THREE, "srpt")) <= mean(sj)            # the oracle is the lower bound
    # The default protects decodes, and before any request has finished it protects them all:
    # J1, once started, keeps its place in q0 (0-8), then J3 (8-10) and J2 (10-15). Still
    # better than fcfs, behind the paper's policy on this example (mean 10.7 s against 10).
    protect = dataclasses.replace(ONE_AT_A_TIME, scheduler_config=dataclasses.replace(
        ONE_AT_A_TIME.scheduler_config, protect_decodes=True))
    assert jcts(THREE, "skip-join-mlfq", protect) == [8.0, 14.5, 9.5]


def test_async_scheduling_from_idle_reads_the_first_batch_when_its_launch_ends():
    """LLMEngine.step under async scheduling: the step that starts a busy period dispatches its
    batch and returns (nothing in flight to collect); the next step plans and dispatches batch 2
    while batch 1 runs, then reads batch 1's tokens once its launch ends. Launches of 1 s, 0.25 s
    of host work before each dispatch: batch k runs [0.25 + (k - 1), 0.25 + k], its tokens are
    read at its end, so a lone 3-token request has its tokens at 1.25, 2.25 and 3.25 s (the
    simulator once charged the first step a whole launch: first token at 2.25 s, a launch late)."""
    cost = dataclasses.replace(UNIT, iteration_overhead=0.25)
    cfg = dataclasses.replace(ONE_AT_A_TIME, async_scheduling=True)
    for trace in ([TraceRequest(0.0, 100, 3)], [TraceRequest(0.0, 100, 3), TraceRequest(10.0, 100, 3)]):
        for r in simulate(trace, "fcfs", cost, cfg).requests:    # the second starts a busy period of its own
            assert r.metrics.ttft == pytest.approx(1.25) and r.metrics.latency == pytest.approx(3.25)
    # two requests in one batch, the short one done by batch 2 (read at 2.25 s), the long one by batch 4
    short, long = simulate([TraceRequest(0.0, 50, 2), TraceRequest(0.0, 50, 4)], "fcfs", cost,
                           dataclasses.replace(cfg, max_num_seqs=2)).requests
    assert short.metrics.ttft == long.metrics.ttft == pytest.approx(1.25)
    assert short.metrics.latency == pytest.approx(2.25) and long.metrics.latency == pytest.approx(4.25)


# -- invariants on random workloads ---------------------------------------------------------------
requests = st.lists(st.tuples(st.floats(0, 3), st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=25)


@settings(max_examples=25, deadline=None)
@given(reqs=requests, policy=st.sampled_from(sorted(POLICIES)), seqs=st.integers(1, 4),
       budget=st.integers(1, 40), kv_tokens=st.integers(96, 200))
def test_every_policy_finishes_everything_within_limits(reqs, policy, seqs, budget, kv_tokens):
    """Tight KV (evictions happen), tiny budgets (chunked prefill): all requests finish with
    exactly their lengths, and every iteration respects the limits (checked in simulate)."""
    trace = [TraceRequest(t, p, o) for t, p, o in reqs]
    budget = max(budget, seqs)                      # a budget below the batch is refused, as in vLLM
    cfg = SimConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=4, kv_capacity_tokens=kv_tokens,
                    scheduler_config=SchedulerConfig(base_quantum=0.5, num_queues=4, starvation_threshold=3.0,
                                                     gittins_min_samples=3, predictive_min_samples=3, gittins_refresh=2), max_iterations=100_000,
                    prediction_sigma=0.5)          # predictive leaves skip-join (the others ignore predictions)
    res = simulate(trace, policy, UNIT, cfg)
    by_id = {r.request_id: r for r in res.requests}
    for i, t in enumerate(trace):
        r = by_id[f"r{i}"]
        assert len(r.output_token_ids) == t.output_tokens and r.finished
        assert r.arrival_time <= r.metrics.first_token_time <= r.metrics.finish_time
    assert res.max_batch <= seqs and res.max_tokens <= budget


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_partial_prefills_do_not_rotate_forever(policy):
    """Found by hypothesis: three prompts of 13-14 blocks in a 25-block pool with an 18-token
    budget. When a request could start on its first chunk alone, MLFQ rotated partial
    prefills that evicted each other, and nothing ever finished."""
    trace = [TraceRequest(1.956, 50, 28), TraceRequest(1.720, 54, 10), TraceRequest(1.956, 50, 28),
             TraceRequest(2.629, 14, 6)]
    cfg = SimConfig(max_num_seqs=2, max_num_batched_tokens=18, block_size=4, kv_capacity_tokens=102,
                    scheduler_config=SchedulerConfig(base_quantum=0.5, num_queues=4, starvation_threshold=3.0,
                                                     gittins_min_samples=3, predictive_min_samples=3, gittins_refresh=2), max_iterations=2000,
                    prediction_sigma=0.5)
    res = simulate(trace, policy, UNIT, cfg)
    assert all(r.finished for r in res.requests)


def test_kv_capacity_is_enforced_and_evictions_are_counted():
    trace = [TraceRequest(0.0, 40, 30) for _ in range(6)]
    cfg = SimConfig(max_num_seqs=6, max_num_batched_tokens=64, block_size=4, kv_capacity_tokens=160,
                    scheduler_config=SchedulerConfig(base_quantum=1.0, num_queues=3, starvation_threshold=0))
    res = simulate(trace, "mlfq", UNIT, cfg)
    assert res.preemptions > 0 and res.max_kv_blocks <= 40
    with pytest.raises(ValueError, match="kv-capacity-tokens"):
        simulate([TraceRequest(0.0, 400, 10)], "fcfs", UNIT, cfg)


# -- workloads ------------------------------------------------------------------------------------
def test_arrival_processes_have_the_asked_rate():
    base = [TraceRequest(0.0, 10, 10)] * 20_000
    for proc, cv in (("poisson", 1.0), ("gamma", 3.0)):
        tr = with_arrivals(base, 4.0, proc, cv, seed=1)
        assert tr[0].arrival == 0.0
        assert (len(tr) - 1) / tr[-1].arrival == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="poisson"):
        with_arrivals(base, 1.0, "uniform")


def test_capacity_follows_the_cost_model():
    tr = [TraceRequest(0.0, 100, 11)] * 10
    # batch 2 (KV holds 2 x (100 + 5.5) tokens): per request 1 s prefill + 11 x 1/2 s of decode
    assert capacity_rps(tr, UNIT, 16, 211) == pytest.approx(1 / 6.5)
    assert capacity_rps(tr, UNIT, 1, 10_000) == pytest.approx(1 / 12)


def test_capacity_charges_a_profiled_engines_launch_padding():
    """With the engine's padding in the table (rows to buckets, every row's reads to the block
    bucket of the longest), a decode costs what the padded launch costs: here 3 rows run as 4
    and each reads 4 blocks of 16 (the longest half-way context, estimated at 40 tokens, needs
    3 blocks, padded to the bucket of 4)."""
    tr = [TraceRequest(0.0, 20, 20), TraceRequest(0.0, 20, 20), TraceRequest(0.0, 40, 20)]
    flat = CostModel("flat", (1, 64), (1.0, 1.0), (1, 4), (1.0, 4.0), decode_context=0.01)
    padded = dataclasses.replace(flat, decode_row_buckets=(1, 4), block_size=16, block_buckets=(1, 4))
    held = [30, 30, 50]                                  # prompt + output / 2
    unpadded = 1 / (1.0 + 20 * (3.0 + 0.01 * sum(held)) / 3)
    assert capacity_rps(tr, flat, 3, 0) == pytest.approx(unpadded)
    assert capacity_rps(tr, padded, 3, 0) == pytest.approx(1 / (1.0 + 20 * (4.0 + 0.01 * 4 * (4 - 1) * 16) / 3))
    assert capacity_rps(tr, padded, 3, 0) < capacity_rps(tr, flat, 3, 0)


def test_heavy_tailed_trace_matches_azure_mean_with_a_heavier_tail():
    tr = heavy_tailed_trace([TraceRequest(0.0, 500, 1)], 50_000, seed=0)
    out = sorted(r.output_tokens for r in tr)
    assert 22 <= out[0] and out[-1] <= 2048 and all(r.prompt_tokens == 500 for r in tr)
    assert 195 < sum(out) / len(out) < 225
    top10 = sum(out[-len(out) // 10:]) / sum(out)
    assert top10 > 0.45                                    # an exponential with that mean: 0.33


def test_lognormal_trace_keeps_the_prompts_and_draws_outputs_of_the_given_mean():
    rows = [TraceRequest(0.0, 100 + i % 900, 1) for i in range(50_000)]
    tr = lognormal_trace(rows, 40_000, sigma=0.9, mean=260.0, seed=1)
    out = np.array([r.output_tokens for r in tr])
    assert [r.prompt_tokens for r in tr] == [r.prompt_tokens for r in rows[:40_000]]
    assert 250 < out.mean() < 270 and 160 < np.median(out) < 200 and out.min() >= 2
    capped = lognormal_trace(rows, 1_000, sigma=2.0, max_tokens=1_200, seed=1)
    assert max(r.prompt_tokens + r.output_tokens for r in capped) == 1_200
    with pytest.raises(ValueError, match="sigma > 0"):
        lognormal_trace(rows, 10, sigma=0.0)


# -- the command line -----------------------------------------------------------------------------
@pytest.fixture
def small_trace(tmp_path):
    tr = [TraceRequest(0.5 * i, 50 + 37 * i % 300, 5 + 13 * i % 40) for i in range(40)]
    path = tmp_path / "t.csv"
    save_trace(str(path), tr)
    return str(path)


def test_simulate_cli_writes_the_contract_metrics(small_trace, tmp_path):
    out = tmp_path / "o.json"
    assert main(["simulate", "--trace", small_trace, "--load", "0.7", "--policy", "fcfs", "--policy", "gittins",
                 "--num-requests", "30", "--seed", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    keys = {"mean_jct", "p50_jct", "p95_jct", "p99_jct", "mean_ttft", "p99_ttft", "mean_tpot",
            "mean_latency_per_token", "throughput_rps", "throughput_tps"}
    assert set(res) == {"fcfs", "gittins"} and keys <= set(res["fcfs"])
    assert res["fcfs"]["num_requests"] == 30 and res["fcfs"]["load"] == 0.7


def test_simulate_cli_keeps_trace_timing_and_sweeps_with_a_plot(small_trace, tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["simulate", "--trace", small_trace, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["skip-join-mlfq"]["rate"] is None
    capsys.readouterr()
    assert main(["simulate", "--trace", small_trace, "--policy", "fcfs"]) == 0      # no --json: the table only
    assert "fcfs offered" in capsys.readouterr().err
    png = tmp_path / "s.png"
    assert main(["simulate", "--trace", small_trace, "--rate", "0.5", "1.0", "--policy", "fcfs",
                 "--policy", "srpt", "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert [m["rate"] for m in res["srpt"]] == [0.5, 1.0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_cli_runs_the_papers_skip_join_on_request(tmp_path):
    """--no-protect-decodes: skip-join as published, which demotes started requests below new
    ones even where lengths are alike (code completion near capacity: about 1.25x the latency
    per token)."""
    path = tmp_path / "code.csv"
    save_trace(str(path), code_completion_trace(400))
    lpt = {}
    for flags in ((), ("--no-protect-decodes",)):
        out = tmp_path / "o.json"
        assert main(["simulate", "--trace", str(path), "--load", "0.95", "--policy", "skip-join-mlfq",
                     "--host-kv-capacity-tokens", "68000", "--json", str(out), *flags]) == 0
        lpt[bool(flags)] = json.loads(out.read_text())["skip-join-mlfq"]["mean_latency_per_token"]
    assert lpt[True] > 1.15 * lpt[False], lpt


def test_simulate_cli_says_how_to_fix_a_bad_trace(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,output\n1,2\n")
    assert main(["simulate", "--trace", str(bad), "--rate", "1", "--json", str(tmp_path / "o.json")]) == 2
    assert "num_prefill_tokens" in capsys.readouterr().err
    untimed = tmp_path / "u.csv"
    untimed.write_text("num_prefill_tokens,num_decode_tokens\n10,2\n")
    assert main(["simulate", "--trace", str(untimed), "--json", str(tmp_path / "o.json")]) == 2
    assert "--rate or --load" in capsys.readouterr().err


def test_shipped_trace_loads_if_present():
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces", "azure_conv_2023.csv")
    if not os.path.isfile(path):
        pytest.skip("../shared/traces is not beside this checkout")
    tr, timed = load_trace(path, 100)
    assert timed and len(tr) == 100 and tr[0].arrival == 0.0


@pytest.mark.parametrize("kwargs, says", [
    (dict(max_num_seqs=0), "max_num_seqs must be a positive integer"),
    (dict(block_size=0), "block_size must be a positive integer"),
    (dict(host_kv_capacity_tokens=-3), "host_kv_capacity_tokens must be an integer >= 0"),
    (dict(swap_policy="sometimes"), "unknown swap_policy"),
])
def test_sim_config_refuses_bad_settings_by_name(kwargs, says):
    with pytest.raises(ValueError, match=says):
        SimConfig(**kwargs)


@pytest.mark.parametrize("flags, says", [
    (["--kv-capacity-tokens", "5"], "error: a device KV of 5 tokens holds no block of 16 tokens"),
    (["--max-num-seqs", "0"], "error: max_num_seqs must be a positive integer"),
])
def test_simulate_refuses_bad_settings_before_the_run(flags, says, small_trace, capsys):
    """They used to fail inside the run: a traceback from the KV manager, a ZeroDivisionError."""
    assert main(["simulate", "--trace", small_trace, "--load", "0.5", "--json", os.devnull, *flags]) == 2
    assert says in capsys.readouterr().err


def test_a_restarts_prior_from_other_traffic_costs_little_once_the_run_has_lengths_of_its_own():
    """The engine restores the lengths its previous run learned (policy_state.py). Lengths of
    light-tailed traffic (mean 250), restored before a heavy-tailed 3x burst of 200 requests:
    kept whole they made skip-join's latency per token 1.68x and gittins' 2.39x the cold
    start's; as a prior dropped at the cold start's threshold (scheduler/length_window.py)
    0.96x and 1.04x."""
    from fastserve_jax.workload import light_tailed_lengths
    rng = np.random.default_rng(0)
    trace = heavy_tailed_trace([TraceRequest(0.0, int(p), 250) for p in rng.integers(50, 1000, 200)], 200, seed=0)
    prior = tuple(int(x) for x in light_tailed_lengths(np.random.default_rng(1), 2000, 250.0, 2, 2000))
    cost = CostModel.load("opt-13b-a100")
    cfg = SimConfig(16, 2048, 16, 0, host_kv_capacity_tokens=68_000)
    trace = with_arrivals(trace, 3 * capacity_rps(trace, cost, 16, (cfg.num_blocks(cost) - 1) * 16), seed=0)
    for policy in ("skip-join-mlfq", "gittins"):
        cold = simulate(trace, policy, cost, cfg).metrics()["mean_latency_per_token"]
        warm = simulate(trace, policy, cost, dataclasses.replace(cfg, prior_lengths=prior)).metrics()
        assert warm["mean_latency_per_token"] <= 1.1 * cold, policy


def test_a_prior_of_longer_traffic_does_not_end_the_cold_starts_protection_where_memory_binds():
    """A device pool of 23 blocks of 16 for 16 sequences, a 400-request burst of 7-token
    prompts with 9-25-token answers (the demo model's, engine-sized), and a restored prior of
    longer lengths (mean 100): the prior said memory binds and decodes cannot be protected,
    so until the run's own 16 finishes replaced it skip-join rotated requests and dropped
    their host KV: 7,160 tokens recomputed, latency per token 0.68x fcfs's, throughput
    0.92x. The same run found on the real engine: 0.60-0.88x fcfs's throughput. Now as a
    cold start."""
    import dataclasses as dc
    from fastserve_jax.workload import light_tailed_lengths
    cost = dc.replace(CostModel.load("demo-cpu"), kv_bytes_per_token=1024, swap_bandwidth=3.44e9, swap_latency=2.6e-4)
    rng = np.random.default_rng(0)
    trace = [TraceRequest(0.0, 7, int(rng.integers(9, 26))) for _ in range(400)]
    prior = tuple(int(x) for x in light_tailed_lengths(np.random.default_rng(1), 2000, 100, 4, 250))
    cfg = SimConfig(16, 512, 16, 23 * 16, host_kv_capacity_tokens=23 * 16, swap_policy="proactive")
    base = simulate(trace, "fcfs", cost, cfg).metrics()
    cold = simulate(trace, "skip-join-mlfq", cost, cfg).metrics()
    warm = simulate(trace, "skip-join-mlfq", cost, dc.replace(cfg, prior_lengths=prior)).metrics()
    assert warm["swap_recomputed_tokens"] == cold["swap_recomputed_tokens"] == 0
    assert warm["throughput_rps"] >= 0.95 * base["throughput_rps"]
    assert warm["mean_latency_per_token"] <= 1.05 * cold["mean_latency_per_token"]


def test_the_short_prompt_light_tail_script_prints_its_ratios(capsys):
    """scripts/sim_light_short_prompts.py (the documented weak spot) on a small sample."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "sim_light_short_prompts.py"
    spec = importlib.util.spec_from_file_location("sim_light_short_prompts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--num-requests", "60"])
    assert [(r["seed"], r["load"]) for r in rows] == [(s, x) for s in (0, 1) for x in (0.9, 1.0, 1.2)]
    assert all(r[k] > 0 for r in rows for k in ("p99", "jct", "latency_per_token"))
    assert capsys.readouterr().out.count("skip-join p99 JCT") == 6


# -- prefix caching (SimConfig.enable_prefix_caching: the engine's ledger, prefix_cache.py) --------
def _azure(n=150, load=1.5, seed=0):
    cost = CostModel.load("opt-13b-a100")
    trace, _ = load_trace(AZURE_TRACE, n)        # the packaged copy: a clone has no ../shared (it failed there)
    return with_arrivals(trace, load * capacity_rps(trace, cost, 16, cost.kv_capacity_tokens, 2048), seed=seed), cost


@pytest.mark.parametrize("policy", ["fcfs", "skip-join-mlfq"])
def test_sim_prefix_caching_finds_nothing_and_changes_nothing_where_nothing_is_shared(policy):
    trace, cost = _azure()
    cfg = SimConfig(host_kv_capacity_tokens=68_000)
    off = simulate(trace, policy, cost, cfg).metrics()
    on = simulate(trace, policy, cost, dataclasses.replace(cfg, enable_prefix_caching=True)).metrics()
    assert on["prefix_cache_hit_rate"] == 0 and on["prefix_cached_tokens"] == 0 and "prefix_cache_hit_rate" not in off
    for k in ("mean_jct", "p99_jct", "mean_ttft", "throughput_rps", "iterations", "swap_blocks_out"):
        assert on[k] == off[k], k


def test_sim_prefix_caching_shares_a_groups_prefix_and_cuts_the_prefill():
    trace, cost = _azure()
    cfg = SimConfig(host_kv_capacity_tokens=68_000, shared_prefix_tokens=500, prefix_groups=3)
    off = simulate(trace, "skip-join-mlfq", cost, cfg)
    on = simulate(trace, "skip-join-mlfq", cost, dataclasses.replace(cfg, enable_prefix_caching=True))
    m_off, m = off.metrics(), on.metrics()
    assert m["mean_ttft"] < 0.8 * m_off["mean_ttft"] and m["throughput_rps"] >= m_off["throughput_rps"]
    # a prompt finds whole blocks of its group's first 500 tokens (of all but its last token, for a short
    # prompt), never its own tokens (no two requests share them)
    for r in on.requests:
        assert r.num_cached_tokens % 16 == 0 and r.num_cached_tokens <= min(500, r.num_prompt_tokens - 1)
    assert sum(r.num_cached_tokens > 0 for r in on.requests) > 0.8 * len(trace)
    alone = simulate(trace, "skip-join-mlfq", cost, dataclasses.replace(cfg, enable_prefix_caching=True,
                                                                         prefix_groups=len(trace))).metrics()
    assert alone["prefix_cached_tokens"] == 0          # a group per request: nothing shared


def test_sim_prefix_caching_settings_are_checked_and_reach_the_cli(small_trace, tmp_path, capsys):
    for bad in (dict(prefix_groups=0), dict(shared_prefix_tokens=-1), dict(enable_prefix_caching=1)):
        with pytest.raises(ValueError):
            SimConfig(**bad)
    out = tmp_path / "o.json"
    assert main(["simulate", "--trace", small_trace, "--load", "1.2", "--num-requests", "30", "--json", str(out),
                 "--enable-prefix-caching", "--shared-prefix-tokens", "64", "--prefix-groups", "2"]) == 0
    res = json.loads(out.read_text())
    assert next(iter(res.values()))["prefix_cache_hit_rate"] > 0 and "prefix cache hits" in capsys.readouterr().err
    assert main(["simulate", "--trace", small_trace, "--load", "1", "--prefix-groups", "0"]) == 2


def test_a_starvation_threshold_of_0_promotes_nothing_and_guards_no_tail():
    """0 is "never starving" (SchedulerConfig): the tail guard took it as every request past the
    limit and ran them all from the top queue, uncharged, so skip-join at 3x capacity served as
    fcfs (latency per token 514 ms against 225 ms with no promotion; a probe, 2026-12-07)."""

    cost = CostModel.load("opt-13b-a100")
    trace = load_trace(AZURE_TRACE, 120)[0]
    trace = with_arrivals(trace, 3 * capacity_rps(trace, cost, 16, cost.kv_capacity_tokens, 2048), seed=0)
    runs = [simulate(trace, "skip-join-mlfq", cost, SimConfig(max_num_seqs=16, max_num_batched_tokens=2048,
                                                                scheduler_config=SchedulerConfig(starvation_threshold=t)))
            for t in (0.0, 1e9)]
    assert [r.metrics.latency for r in runs[0].requests] == [r.metrics.latency for r in runs[1].requests]


def test_simulate_says_when_random_arrivals_came_all_at_once(small_trace, capsys):
    """A gamma process of a huge cv draws every arrival at t=0: the row read "load 1.00" with no
    note of the rate they came at, which it prints for every other random draw (a probe, 2026-12-07)."""
    assert main(["simulate", "--trace", small_trace, "--load", "1", "--arrival", "gamma", "--cv", "1e150",
                 "--policy", "fcfs", "--num-requests", "20"]) == 0
    assert "(arrived all at once)" in capsys.readouterr().err
