"""The pieces of scripts/bench_preemption.py (and its scripts/sim_fidelity.py) and `bench
--output-dist chat` that need no server: the chat-like output lengths, the burst's KV pool
sizing, and the simulator-vs-engine comparison."""

import os
import pathlib
import sys
import time

import numpy as np
import pytest

from fastserve_jax.stats import PHASES
from fastserve_jax.workload import TraceRequest, burst_pool_blocks, chat_output_lengths, kv_blocks
from fastserve_jax.models import demo_task
from fastserve_jax.serve import bench_client
from fastserve_jax.serve.bench_answers import answer_problems
from fastserve_jax.serve.bench_cmd import TRACE, build_workload

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))   # as when the script runs
import bench_preemption as bp  # noqa: E402
import sim_fidelity as sf  # noqa: E402
import sim_fidelity_in_process as sfi  # noqa: E402


# ----------------------------------------------------------------------------- chat-like lengths

def test_chat_lengths_span_the_demo_range_skewed_short_with_a_long_tail():
    x = chat_output_lengths(100_000, seed=1)
    assert x.dtype.kind == "i" and x.min() == 2 and x.max() == 257
    s = np.sort(x)[::-1]
    assert 14 <= np.median(x) <= 18 and 42 <= x.mean() <= 47          # the docstring's median 16, mean 44
    assert 0.40 <= s[:len(s) // 10].sum() / s.sum() <= 0.46           # the longest 10% carry 43%
    assert (x <= 32).mean() > 0.6 and (x >= 128).mean() > 0.08        # mostly short, yet a real tail


def test_chat_lengths_are_deterministic_by_seed():
    assert np.array_equal(chat_output_lengths(50, seed=3), chat_output_lengths(50, seed=3))
    assert not np.array_equal(chat_output_lengths(50, seed=3), chat_output_lengths(50, seed=4))


def test_chat_lengths_reject_bad_bounds():
    with pytest.raises(ValueError, match="lo <= hi"):
        chat_output_lengths(5, lo=10, hi=3)
    with pytest.raises(ValueError, match="alpha"):
        chat_output_lengths(5, alpha=0.0)


@pytest.mark.skipif(not os.path.isfile(TRACE), reason="the Azure trace is not checked out next to the repository")
def test_bench_chat_workload_asks_for_the_sampled_lengths_and_trace_stays_the_default():
    work, arrivals = build_workload(TRACE, 40, 1.0, False, 2.0, 7, "chat")
    assert [w[0]["max_tokens"] for w in work] == list(chat_output_lengths(40, 2, 257, seed=7))
    assert all(w[0]["max_tokens"] == demo_task.answer_num_tokens(*ab) for w, ab in ((w, w[1]) for w in work))
    trace_work, trace_arrivals = build_workload(TRACE, 40, 0.5, False, 2.0, 7)
    assert trace_arrivals == arrivals                    # the lengths change, the arrivals do not
    assert [w[0]["max_tokens"] for w in trace_work] != [w[0]["max_tokens"] for w in work]
    with pytest.raises(ValueError, match="output_dist"):
        build_workload(TRACE, 4, 1.0, False, 1.0, 0, "zipf")


# ----------------------------------------------------------------------------- pool sizing

def test_kv_blocks_round_up_prompt_plus_output():
    reqs = [TraceRequest(0, 7, 9), TraceRequest(0, 7, 10), TraceRequest(0, 7, 257)]
    assert kv_blocks(reqs, 16) == [1, 2, 17]


def test_pool_is_below_half_the_live_kv_and_holds_the_largest_request():
    reqs = [TraceRequest(0, 7, 25)] * 30 + [TraceRequest(0, 7, 257)]       # 30 x 2 blocks + 17 = 77 live
    assert burst_pool_blocks(reqs, 16) == 34                                # int(0.45 * 77)
    assert burst_pool_blocks(reqs, 16, fraction=0.25) == 19
    with pytest.raises(ValueError, match="largest request needs \\(17\\)"):
        burst_pool_blocks(reqs, 16, fraction=0.2)                           # 15 blocks < 17
    with pytest.raises(ValueError, match="below half"):
        burst_pool_blocks(reqs, 16, fraction=0.5)


# ----------------------------------------------------------------------------- comparison helpers

def test_relative_error_on_literal_numbers():
    assert sf.relative_error(11.5, 10.0) == pytest.approx(0.15)
    assert sf.relative_error(0.5, 2.0) == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="measured"):
        sf.relative_error(1.0, 0.0)


def test_fidelity_rows_compare_sim_to_engine_and_flag_misses():
    real = dict(e2e_mean=2.0, mean_latency_per_token=0.040, iterations=500, ttft_mean=0.0)
    sim = dict(mean_jct=2.2, mean_latency_per_token=0.030, iterations=500, mean_ttft=0.1)
    rows = {r["figure"]: r for r in sf.fidelity_rows(real, sim)}
    assert set(rows) == {"JCT mean s", "ms per token", "iterations"}        # ttft: nothing measured to hold to
    assert rows["JCT mean s"]["rel_err"] == pytest.approx(0.10) and rows["JCT mean s"]["within"]
    assert rows["ms per token"]["rel_err"] == pytest.approx(-0.25) and not rows["ms per token"]["within"]
    assert rows["iterations"]["rel_err"] == 0.0
    assert not sf.fidelity_rows(real, sim, tolerance=0.05)[0]["within"]


def test_phase_stretch_sets_each_policys_server_phases_beside_in_process(capsys):
    phases = [f"{p}_seconds_per_iteration" for p in PHASES] + ["iteration_seconds"]

    def figs(scale):
        return {k: scale * (i + 1) * 1e-3 for i, k in enumerate(phases)}
    runs = [{p: figs(s) for p in sf.POLICIES} for s in (1.0, 3.0, 2.0)]
    inproc = {p: figs(0.5) for p in sf.POLICIES}
    table = bp.print_phase_stretch(runs, inproc)
    assert table["fcfs"]["schedule_seconds_per_iteration"] == pytest.approx(dict(servers=2e-3, in_process=0.5e-3))
    assert table["skip-join-mlfq"]["iteration_seconds"]["servers"] == pytest.approx(2 * (len(phases)) * 1e-3)
    assert "schedule 2.000 / 0.500" in capsys.readouterr().out


def test_paired_medians_take_the_median_of_per_pair_ratios():
    runs = [{"fcfs": {"x": 10.0}, "skip-join-mlfq": {"x": 5.0}},
            {"fcfs": {"x": 20.0}, "skip-join-mlfq": {"x": 16.0}},
            {"fcfs": {"x": 30.0}, "skip-join-mlfq": {"x": 3.0}}]
    m = bp.paired_medians(runs, "x")
    assert m == {"fcfs": 20.0, "skip-join-mlfq": 5.0, "ratio": 0.5, "inverse": 2.0}   # ratios 0.5, 0.8, 0.1
    # two pairs, 2x and 10x better: the median improvement is 6x, not 1 / median(0.5, 0.1) = 3.33x
    assert bp.paired_medians(runs[::2], "x")["inverse"] == 6.0


def test_parse_counters_reads_the_servers_counters():
    text = "\n".join(f"{series} {i}.0" for i, series in enumerate(bp.COUNTERS.values())) + "\nother 1\n"
    assert bp.parse_counters(text) == {k: float(i) for i, k in enumerate(bp.COUNTERS)}
    with pytest.raises(ValueError, match="fastserve_iterations_total"):
        bp.parse_counters(text.replace("fastserve_iterations_total", "renamed"))


def test_answer_problems_catch_wrong_short_and_failed_answers():
    work = [({}, (3, 5)), ({}, (3, 5)), ({}, (3, 5)), ({}, (3, 5))]

    def res(text, tokens, status=200):
        return bench_client.Result(status=status, text=text, completion_tokens=tokens, done=True)
    results = [res(" 3 4 5", 4), res(" 3 4 6", 4), res(" 3 4 5", 3), res("", None, status=503)]
    problems = answer_problems(results, work)
    assert [p.split(" ")[1] for p in problems] == ["1", "2", "3"]
    assert "failed: status 503" in problems[2]


def test_calibrate_overhead_solves_for_the_measured_iteration_time():
    # a linear simulator: 1.6 ms of launches, and batches that grow by 5% of the overhead
    calls = []

    def sim_mean(x):
        calls.append(x)
        return x + 0.0016 + 0.05 * x
    x = sf.calibrate_overhead(0.006, sim_mean)
    assert x == pytest.approx(0.0044 / 1.05, abs=2e-6)             # 4.19 ms, not the naive 6.0 - 1.6 = 4.4
    assert calls[0] == 0.0 and len(calls) <= 6                       # secant steps: a few simulations
    calls.clear()                    # a steeper simulator (slope 20): the secant finds it as quickly
    x = sf.calibrate_overhead(0.006, lambda x: calls.append(x) or 0.0016 + 20 * x)
    assert x == pytest.approx(0.0044 / 20, abs=1e-7) and len(calls) <= 6


def test_calibrate_overhead_brackets_a_jumping_simulator_and_never_goes_negative():
    # a schedule that jumps: 2 ms of launches below 2 ms of overhead, 3 ms from there (no x gives 4.5 ms)
    x = sf.calibrate_overhead(0.0045, lambda x: x + (0.002 if x < 0.002 else 0.003))
    assert x == pytest.approx(0.002, abs=2e-6)                        # the jump the measured value falls in
    assert sf.calibrate_overhead(0.001, lambda x: x + 0.0016) == 0.0  # the profile alone is already slower
    with pytest.raises(ValueError, match="> 0"):
        sf.calibrate_overhead(0.0, lambda x: x)
    with pytest.raises(RuntimeError, match="no overhead"):
        sf.calibrate_overhead(0.006, lambda x: 0.001, max_rounds=5)   # a simulator deaf to the overhead


def test_screen_pairs_replaces_the_models_misses_by_pairs_of_the_same_span():
    from types import SimpleNamespace

    from fastserve_jax.serve.bench_answers import screen_pairs

    class Llm:                          # misses every count that starts at 95, like the demo model's ' 95' stop
        calls = 0

        def generate(self, prompts, params):
            self.calls += 1
            out = []
            for p in prompts:
                a, b = demo_task.parse_prompt(p)
                out.append(SimpleNamespace(text=" 95" if a == 95 else demo_task.expected_answer(a, b)))
            return out

    works = [[({"prompt": demo_task.make_prompt(95, 99), "max_tokens": 6}, (95, 99)),
              ({"prompt": demo_task.make_prompt(3, 12), "max_tokens": 11}, (3, 12))],
             [({"prompt": demo_task.make_prompt(95, 97), "max_tokens": 4}, (95, 97))]]
    llm = Llm()
    (first, second), replaced = screen_pairs(llm, works, seed=0)
    assert replaced == 2 and llm.calls == 2
    assert first[1] == works[0][1] and first[0][1] != (95, 99) and second[0][1] != (95, 97)
    for (payload, (a, b)), (old, (a0, b0)) in zip(first + second, works[0] + works[1]):
        assert b - a == b0 - a0 and payload["prompt"] == demo_task.make_prompt(a, b)
        assert payload["max_tokens"] == old["max_tokens"]


def test_engine_in_process_serves_the_burst_at_its_arrival_times_and_checks_every_answer():
    from fastserve_jax import LLM

    build = lambda policy: LLM(None, max_num_seqs=4, max_num_batched_tokens=64, scheduler=policy)  # noqa: E731
    pairs = [(3, 9), (40, 41), (100, 120), (7, 7), (250, 262), (11, 30)]
    work = [({"prompt": demo_task.make_prompt(a, b), "max_tokens": demo_task.answer_num_tokens(a, b)}, (a, b))
            for a, b in pairs]
    arrivals = [0.0, 0.0, 0.01, 0.02, 0.05, 0.3]
    t0 = time.monotonic()
    m = sfi.engine_in_process(build, work, arrivals, "skip-join-mlfq")
    phases = {f"{k}_seconds_per_iteration" for k in PHASES}
    assert set(m) == {"e2e_mean", "e2e_p99", "mean_latency_per_token", "ttft_mean", "throughput_rps", "iterations",
                      "iteration_seconds", "busy_seconds", *sfi.KV_WORK} | phases
    # the run's own KV work: no host pool, so nothing swaps; every token was computed once at least
    assert m["swap_out_blocks"] == m["swap_in_blocks"] == 0 and m["swap_stall"] == 0
    assert m["prefill_tokens"] >= len(pairs) and m["decode_tokens"] > 0
    assert 0 < m["ttft_mean"] <= m["e2e_mean"] <= m["e2e_p99"] and m["iterations"] >= 20
    assert 0 < m["device_seconds_per_iteration"] < m["iteration_seconds"]       # busy covers the phases
    assert all(m[k] > 0 for k in phases)
    assert m["throughput_rps"] <= len(pairs) / 0.3           # the last request arrives at 0.3 s, not at once
    assert time.monotonic() - t0 > 0.3
    # the simulator reads what it needs of a real engine through engine_shape, without the engine
    eng = build("fcfs").engine
    eng.cost_model = _cost()
    shape = sf.engine_shape(eng)
    del eng
    trace = [TraceRequest(a_t, 7, 4 + i) for i, a_t in enumerate(arrivals)]
    sims, cost = sf.simulate_policies(shape, trace, (1e-4, 1e9, 5e-5))
    assert cost.swap_issue_seconds == 5e-5 and all(m["iterations"] > 0 for m in sims.values())
    wrong = [({**work[0][0]}, (3, 10))]                         # asks for 3..9, checked against 3..10
    with pytest.raises(RuntimeError, match="fcfs in process: 1 wrong answer"):
        sfi.engine_in_process(build, wrong, [0.0], "fcfs")


def test_in_process_fidelity_takes_medians_of_alternating_runs_and_reports_their_range(monkeypatch, capsys):
    figures = lambda jct, rps: dict(e2e_mean=jct, e2e_p99=2 * jct, mean_latency_per_token=jct / 10,  # noqa: E731
                                    ttft_mean=jct / 4, throughput_rps=rps, iterations=100, iteration_seconds=0.004,
                                    **{f"{k}_seconds_per_iteration": 0.001 for k in PHASES})
    served = {"fcfs": iter([figures(2.0, 80), figures(3.0, 60), figures(2.5, 70)]),
              "skip-join-mlfq": iter([figures(1.0, 90), figures(0.9, 100), figures(2.0, 50)])}
    order = []

    def fake(build, work, arrivals, policy):
        order.append(policy)
        return next(served[policy])

    monkeypatch.setattr(sfi, "engine_in_process", fake)
    sims = {p: dict(mean_jct=1.0, mean_latency_per_token=0.1, p99_jct=2.0, mean_ttft=0.25, throughput_rps=90,
                    iterations=100, iteration_seconds=0.004) for p in sf.POLICIES}
    res = sfi.in_process_fidelity(None, [], [], sims, rounds=3)
    assert order == ["fcfs", "skip-join-mlfq"] * 3                       # alternating, one fresh run each
    assert res["engine"]["fcfs"]["e2e_mean"] == 2.5 and res["engine"]["skip-join-mlfq"]["e2e_mean"] == 1.0
    assert res["spread"]["fcfs"]["throughput_rps"] == (60, 80)
    assert res["spread"]["skip-join-mlfq"]["e2e_mean"] == (0.9, 2.0)
    # the ratio is the median of each round's own ratio (0.5, 0.3, 0.8), not a ratio of medians
    assert res["ratios"][0]["real"] == pytest.approx(0.5)
    jct = {r["figure"]: r for r in res["rows"]["skip-join-mlfq"]}["JCT mean s"]
    assert jct["real"] == 1.0 and jct["within"]
    out = capsys.readouterr().out
    assert "median of 3 alternating runs" in out and "max/min 2.22" in out
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        sfi.in_process_fidelity(None, [], [], sims, rounds=0)


def _shape(cost, usable_blocks: int):
    """What simulate_policies reads of an engine (sim_fidelity.engine_shape), for a made-up one."""
    from types import SimpleNamespace

    from fastserve_jax.config import EngineConfig
    from fastserve_jax.scheduler.engine_defaults import engine_policy_config

    return SimpleNamespace(cfg=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4),
                           model_cfg=SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=8), cost_model=cost,
                           policy_config=lambda: engine_policy_config(cost, 8),
                           kv=SimpleNamespace(num_usable_blocks=usable_blocks, num_host_blocks=400))


def _cost():
    from fastserve_jax.cost_model import CostModel

    return CostModel("made-up", prefill_tokens=(1, 64, 512), prefill_seconds=(0.002, 0.004, 0.03),
                     decode_batch=(1, 8), decode_seconds=(0.002, 0.004), decode_context=1e-6)


def test_simulate_median_keeps_each_policys_median_simulation_whole(monkeypatch):
    """The simulator's host time is measured as it runs, so simulations of one run differ; the
    prediction is each policy's median simulation by mean JCT, taken whole."""
    results = iter([({"fcfs": {"mean_jct": 3.0, "x": "a"}, "sj": {"mean_jct": 1.0, "x": "a"}}, "cost"),
                    ({"fcfs": {"mean_jct": 1.0, "x": "b"}, "sj": {"mean_jct": 2.0, "x": "b"}}, "cost"),
                    ({"fcfs": {"mean_jct": 2.0, "x": "c"}, "sj": {"mean_jct": 9.0, "x": "c"}}, "cost")])
    monkeypatch.setattr(sf, "simulate_policies", lambda *a, **k: next(results))
    sims, cost = sf.simulate_median("shape", repeats=3)
    assert cost == "cost" and sims == {"fcfs": {"mean_jct": 2.0, "x": "c"}, "sj": {"mean_jct": 2.0, "x": "b"}}


def test_scaled_launches_scale_every_launch_and_nothing_else():
    import dataclasses

    cost = dataclasses.replace(_cost(), swap_latency=0.1, iteration_overhead=0.2, prefill_context=1e-7)
    fast = sf.scaled_launches(cost, 0.5)
    assert fast.prefill_time(100, 50) == pytest.approx(0.5 * cost.prefill_time(100, 50))
    assert fast.decode_time(4, 300) == pytest.approx(0.5 * cost.decode_time(4, 300))
    assert (fast.swap_latency, fast.iteration_overhead) == (0.1, 0.2)
    with pytest.raises(ValueError, match="speed must be > 0"):
        sf.scaled_launches(cost, 0.0)


def test_calibrated_recovers_the_engines_speed_and_host_overhead_from_fcfs_alone(monkeypatch):
    import itertools

    import fastserve_jax.sim

    # a clock that ticks 10 us per reading: every timed policy call "takes" 10 us, so the host
    # time each simulation measures is the same in every run and on any machine
    ticks = itertools.count()
    monkeypatch.setattr(fastserve_jax.sim.time, "perf_counter", lambda: 1e-5 * next(ticks))
    shape = _shape(_cost(), usable_blocks=400)            # room for every request: fcfs never swaps
    trace = [TraceRequest(0.0, 10 + 3 * (i % 5), 5 + 7 * (i % 6)) for i in range(60)]
    swap = (1e-4, 1e9, 5e-5)
    # the "engine": the same simulation with launches 1.4x slower and 1 ms of other host work per
    # iteration; all requests arrive at once, so the batches do not depend on the speed
    engine, _ = sf.simulate_policies(shape, trace, swap, 0.001, ("fcfs",), host_scale=0.0, speed=1.4)
    e = engine["fcfs"]
    host = e["policy_host_seconds"] / e["iterations"]
    assert host == pytest.approx(4e-5)      # scheduling, applying the plan, planning moves, the updates
    # its schedule phase: the policy's calls 3x slower than the simulator runs them
    fcfs = dict(e, device_seconds_per_iteration=e["launch_seconds_per_iteration"],
                schedule_seconds_per_iteration=3 * host)
    cal = sf.calibrated(shape, trace, swap, fcfs)
    assert cal["speed"] == pytest.approx(1.4, rel=1e-9) and cal["host_scale"] == pytest.approx(3.0, rel=1e-9)
    # the rest of the engine's 1 ms is the overhead
    assert cal["iteration_overhead"] == pytest.approx(0.001 - 3 * host, rel=1e-4)
    assert cal["sim"]["fcfs"]["iteration_seconds"] == pytest.approx(fcfs["iteration_seconds"], rel=1e-6)
    assert set(cal["sim"]) == set(sf.POLICIES)
    # without the phases (a server older than their counters) only the overhead is fitted, and
    # it absorbs the slower launches too
    old = sf.calibrated(shape, trace, swap, {k: v for k, v in fcfs.items() if not k.endswith("_per_iteration")
                                             or k == "launch_seconds_per_iteration"})
    assert old["speed"] == old["host_scale"] == 1.0 and old["iteration_overhead"] > 0.001 + 0.3 * (
        e["launch_seconds_per_iteration"] / 1.4)


def test_calibrated_with_async_scheduling_solves_the_launches_speed_beside_the_host_work(monkeypatch):
    """An engine that schedules asynchronously: its assemble and postprocess phases are the host
    work beside each launch, and the launches' speed is solved to fit its ms per iteration."""
    import dataclasses
    import itertools

    import fastserve_jax.sim

    ticks = itertools.count()
    monkeypatch.setattr(fastserve_jax.sim.time, "perf_counter", lambda: 1e-5 * next(ticks))
    shape = _shape(_cost(), usable_blocks=400)
    shape.cfg = dataclasses.replace(shape.cfg, async_scheduling=True)
    trace = [TraceRequest(0.0, 10 + 3 * (i % 5), 5 + 7 * (i % 6)) for i in range(60)]
    swap = (1e-4, 1e9, 5e-5)
    engine, _ = sf.simulate_policies(shape, trace, swap, 0.001, ("fcfs",), host_scale=3.0, speed=1.4)
    e = engine["fcfs"]
    host = e["policy_host_seconds"] / e["iterations"]
    fcfs = dict(e, device_seconds_per_iteration=0.5 * e["launch_seconds_per_iteration"],   # a wait, not the launch
                schedule_seconds_per_iteration=3 * host, assemble_seconds_per_iteration=0.0006,
                postprocess_seconds_per_iteration=0.0004)
    cal = sf.calibrated(shape, trace, swap, fcfs)
    assert cal["async_scheduling"] and cal["iteration_overhead"] == pytest.approx(0.001)
    assert cal["host_scale"] == pytest.approx(3.0, rel=1e-9) and cal["speed"] == pytest.approx(1.4, rel=2e-3)
    assert cal["sim"]["fcfs"]["iteration_seconds"] == pytest.approx(fcfs["iteration_seconds"], rel=1e-3)
    assert "beside each launch" in sf._fit_note(cal)


def test_front_end_offsets_come_from_fcfs_and_shift_each_request_not_the_mean():
    fcfs = dict(ttft_mean=0.50, server_ttft_mean=0.48, e2e_mean=2.0, server_e2e_mean=1.97)
    assert sf.front_end_offsets(fcfs) == pytest.approx((0.02, 0.03))
    assert sf.front_end_offsets(dict(fcfs, server_e2e_mean=2.5))[1] == 0.0     # never negative
    assert sf.front_end_offsets({k: v for k, v in fcfs.items() if k != "server_ttft_mean"}) is None
    # the server's hand-off to the engine is inside its handler's figures, outside the engine's
    assert sf.front_end_offsets(dict(fcfs, server_handoff_mean=0.005)) == pytest.approx((0.025, 0.035))
    shape = _shape(_cost(), usable_blocks=400)
    trace = [TraceRequest(0.0, 10, out) for out in (2, 4, 40)]
    # host_scale 0: no measured host time, so both simulations schedule alike
    plain, _ = sf.simulate_policies(shape, trace, (1e-4, 1e9, 5e-5), policies=("fcfs",), host_scale=0.0)
    seen, _ = sf.simulate_policies(shape, trace, (1e-4, 1e9, 5e-5), policies=("fcfs",), host_scale=0.0,
                                   front_end=(0.02, 0.03))
    p, s = plain["fcfs"], seen["fcfs"]
    assert s["mean_jct"] == pytest.approx(p["mean_jct"] + 0.03) and s["p99_jct"] == pytest.approx(p["p99_jct"] + 0.03)
    assert s["mean_ttft"] == pytest.approx(p["mean_ttft"] + 0.02)
    # a short answer's latency per token gains more of the offset than a long one's
    assert s["mean_latency_per_token"] == pytest.approx(p["mean_latency_per_token"] + 0.03 * (1 / 2 + 1 / 4 + 1 / 40) / 3)
    assert s["throughput_rps"] == p["throughput_rps"] and s["iterations"] == p["iterations"]
    zero, _ = sf.simulate_policies(shape, trace, (1e-4, 1e9, 5e-5), policies=("fcfs",), host_scale=0.0,
                                   front_end=(0.0, 0.0))
    assert [o for _, _, o in s["per_request"]] == [2, 4, 40]                     # the trace's order
    assert s["per_request"] == [[pytest.approx(t + 0.02, abs=2e-5), pytest.approx(j + 0.03, abs=2e-5), o]
                                for t, j, o in zero["fcfs"]["per_request"]]


def test_by_length_buckets_each_requests_figures_averaged_over_the_runs():
    n = [3, 3, 30]
    # two runs; per request [send lag, TTFT, JCT, tokens]
    runs = [{"fcfs": {"per_request": [[0.0, 0.1, 0.3, 3], [0.0, 0.2, 0.4, 3], [0.0, 0.1, 3.0, 30]]}},
            {"fcfs": {"per_request": [[0.0, 0.3, 0.5, 3], [0.0, 0.2, 0.4, 3], [0.0, 0.1, 0.1 + 29 * 0.2, 30]]}}]
    sims = {"fcfs": {"per_request": [[0.1, 0.2, 3], [0.1, 0.2, 3], [0.1, 1.55, 30]]}}
    rows = sf.by_length(runs, sims, "fcfs")
    assert [r["tokens"] for r in rows] == [(1, 8), (20, 50)] and [r["requests"] for r in rows] == [2, 1]
    short, long = rows
    assert short["engine"]["ttft"] == pytest.approx(0.2) and short["engine"]["tpot"] == pytest.approx(0.1)
    assert short["engine"]["latency_per_token"] == pytest.approx(0.4 / 3) and short["sim"]["tpot"] == pytest.approx(0.05)
    assert long["engine"]["tpot"] == pytest.approx(0.15) and long["sim"]["tpot"] == pytest.approx(0.05)
    sims["fcfs"]["per_request"][2][2] = 31
    with pytest.raises(ValueError, match="differ in their output lengths"):
        sf.by_length(runs, sims, "fcfs")
    assert n == [3, 3, 30]


def test_service_charge_bench_buckets_time_per_token_by_output_length():
    import bench_service_charge as bsc

    rows = [[0.1, 0.1, 1], [0.1, 0.4, 4], [0.2, 0.8, 4], [0.1, 2.1, 21]]      # [TTFT, JCT, tokens]
    t = bsc.tpot_by_length(rows)
    assert set(t) == {"tpot 1-7", "tpot 20-49"}                              # 1-token requests have none
    assert t["tpot 1-7"] == pytest.approx((0.1 + 0.2) / 2) and t["tpot 20-49"] == pytest.approx(0.1)


def test_bench_tail_guard_workload_is_light_tailed_and_exact_counts():
    import bench_tail_guard as btg

    outs = btg.light_tailed_outputs(2000, 100.0, 0)
    assert outs.min() >= 4 and outs.max() <= 250 and 0.5 < outs.std() / outs.mean() < 0.7
    assert abs(outs.mean() - 100) < 6
    work = btg.workload(50, 100.0, 0)
    assert [p["max_tokens"] for p, _ in work] == [demo_task.answer_num_tokens(a, b) for _, (a, b) in work]
    assert [p["max_tokens"] for p, _ in work] == list(btg.light_tailed_outputs(50, 100.0, 0))
    assert all(p["prompt"] == demo_task.make_prompt(a, b) for p, (a, b) in work)
