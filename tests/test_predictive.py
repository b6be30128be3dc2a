"""The predictive policy (scheduler/predictive.py) in literal scenarios and in the simulator
with predictions of a chosen quality, plus its knobs at the boundary. No model, no jax."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from fastserve_jax.config import SchedulerConfig
from fastserve_jax.cost_model import CostModel
from fastserve_jax.length_prediction import LengthPrediction
from fastserve_jax.scheduler.predictive import PredictiveScheduler
from fastserve_jax.serve.cli import main
from fastserve_jax.sim import SimConfig, simulate
from fastserve_jax.workload import TraceRequest, capacity_rps, chat_like_trace, heavy_tailed_trace, save_trace, \
    with_arrivals
from tests.test_scheduler import make, req, run

OPT = CostModel.load("opt-13b-a100")
PROMPTS = [TraceRequest(0.0, int(p), 1) for p in np.random.default_rng(1).integers(50, 1000, 500)]
QUICK = SchedulerConfig(predictive_min_samples=10, gittins_starvation_threshold=0)


def burst(trace, load, cfg):
    cap = capacity_rps(trace, OPT, cfg.max_num_seqs, (cfg.num_blocks(OPT) - 1) * cfg.block_size)
    return with_arrivals(trace, load * cap, seed=0)


def sim_cfg(sched=QUICK, **kw) -> SimConfig:
    return SimConfig(16, 2048, 16, host_kv_capacity_tokens=68_000, scheduler_config=sched, **kw)


# -- literal scenarios ----------------------------------------------------------------------------
def test_skip_join_until_a_prediction_is_seen_then_live_requests_keep_their_kv():
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, predictive_min_samples=3)
    sched, kv = make("predictive", seqs=2, cfg=cfg)
    for i in range(4):
        sched.add(req(f"done{i}", 5, 0.0, 2))
    while len(sched):
        run(sched, kv)
    live = [req("a", 5, 1.0, 40), req("b", 5, 1.0, 40)]
    for r in live:
        sched.add(r)
    run(sched, kv)
    run(sched, kv)
    assert sched.warmup is not None, "4 finished but no prediction seen: still skip-join"
    blocks = [list(kv.block_table(r)) for r in live]
    live[0].length_prediction = LengthPrediction.point(40, 1)       # set before on_iteration
    sched.on_iteration(sched.schedule(2.0), 0.0, 2.0)
    run(sched, kv)
    assert sched.warmup is None and len(sched) == 2
    assert [kv.block_table(r)[:len(b)] for r, b in zip(live, blocks)] == blocks


def decoding(rid: str, total: int, generated: int) -> object:
    r = req(rid, 4, 0.0, total)
    r.output_token_ids = [0] * generated
    r.num_computed_tokens = r.num_tokens - 1
    r.length_prediction = LengthPrediction.point(total, 1)
    return r


@pytest.mark.parametrize("objective,first", [("jct", "long_nearly_done"), ("latency_per_token", "short")])
def test_sharp_predictions_rank_by_the_objective(objective, first):
    """jct: shortest remaining first (SRPT). latency per token: a request's cost rate is
    1 / its length, so a short job with a little more left beats a long one nearly done."""
    sched, _ = make("predictive", cfg=SchedulerConfig(predictive_objective=objective))
    long_nearly_done, short = decoding("long_nearly_done", 100, 90), decoding("short", 12, 1)
    keys = {r.request_id: sched.key(r) for r in (long_nearly_done, short)}
    assert min(keys, key=keys.get) == first


# -- the simulator with predictions -------------------------------------------------------------
def test_exact_predictions_come_close_to_the_srpt_oracle():
    """sigma = 0, mean-JCT objective: SRPT once a request's prefill reveals its length."""
    trace = burst(chat_like_trace(PROMPTS, 150, seed=0), 2.0, sim_cfg())
    cfg = sim_cfg(replace(QUICK, predictive_objective="jct"))
    jct = {p: simulate(trace, p, OPT, cfg).metrics()["mean_jct"] for p in ("srpt", "skip-join-mlfq")}
    m = simulate(trace, "predictive", OPT, replace(cfg, prediction_sigma=0.0)).metrics()
    assert m["mean_jct"] <= 1.06 * jct["srpt"], (m["mean_jct"], jct)      # measured 1.04x; skip-join 1.77x
    assert m["prediction_kendall_tau"] == 1.0


def test_predictions_at_arrival_rank_requests_before_their_prefill():
    """prediction_at="arrival" (a prompt-only predictor): exact predictions pick the short
    requests among those not started yet too, as srpt does; at "prefill" a request must start
    before its length is known. 6x burst: 1.10x srpt's mean JCT against 1.16x (skip-join 1.69x)."""
    trace = burst(chat_like_trace(PROMPTS, 150, seed=0), 6.0, sim_cfg())
    cfg = sim_cfg(replace(QUICK, predictive_objective="jct"), prediction_sigma=0.0)
    srpt = simulate(trace, "srpt", OPT, cfg).metrics()["mean_jct"]
    jct = {at: simulate(trace, "predictive", OPT, replace(cfg, prediction_at=at)).metrics()["mean_jct"]
           for at in ("prefill", "arrival")}
    assert jct["arrival"] <= 1.12 * srpt and jct["arrival"] < 0.97 * jct["prefill"], (jct, srpt)


def test_without_predictions_it_is_skip_join_mlfq():
    trace = burst(heavy_tailed_trace(PROMPTS, 100, seed=0), 2.0, sim_cfg())
    finish = {p: [r.metrics.finish_time for r in simulate(trace, p, OPT, sim_cfg()).requests]
              for p in ("predictive", "skip-join-mlfq")}
    assert finish["predictive"] == finish["skip-join-mlfq"]


class Recorder:
    """Wraps PredictiveScheduler.on_iteration: per iteration of the ranked phase, the started
    requests left out of the batch and whether the plan started a request; and each request's
    longest wait between runs in the ranked phase (from arrival, or from the switch)."""

    def __init__(self, monkeypatch) -> None:
        self.paused: list[tuple[int, bool]] = []
        self.last_run: dict[str, float] = {}
        self.longest_wait: dict[str, float] = {}
        self.switched: float | None = None
        orig = PredictiveScheduler.on_iteration
        rec = self

        def on_iteration(sched, plan, duration, now):
            live = list(sched.priority_order())             # before on_iteration: still holds this plan's
            ids = {s.request.request_id for s in plan.scheduled}
            t0 = now - duration
            started = any(s.request.request_id not in rec.last_run for s in plan.scheduled)
            if sched.warmup is None and rec.switched is None:
                rec.switched = t0
            for s in plan.scheduled:
                r = s.request
                since = max(rec.last_run.get(r.request_id, r.arrival_time), rec.switched or np.inf)
                rec.longest_wait[r.request_id] = max(rec.longest_wait.get(r.request_id, 0.0), t0 - since)
                rec.last_run[r.request_id] = now
            if sched.warmup is None:
                rec.paused.append((sum(1 for r in live if r.request_id in rec.last_run and r.request_id not in ids),
                                   started))
            orig(sched, plan, duration, now)

        monkeypatch.setattr(PredictiveScheduler, "on_iteration", on_iteration)


@pytest.mark.parametrize("max_paused", [2, 256])
def test_preemption_limit_holds_in_overload(monkeypatch, max_paused):
    trace = burst(heavy_tailed_trace(PROMPTS, 160, seed=0), 4.0, sim_cfg())
    rec = Recorder(monkeypatch)
    cfg = sim_cfg(replace(QUICK, predictive_max_paused=max_paused), prediction_tau=0.55)
    assert simulate(trace, "predictive", OPT, cfg).metrics()["num_requests"] == 160
    assert rec.paused, "never left skip-join"
    if max_paused == 256:              # the control: unbounded, pausing goes well past 2
        assert max(n for n, _ in rec.paused) > 8
        return
    # a plan that starts a request leaves at most M started requests paused; once the
    # requests started under skip-join drained, the count stays within M
    assert all(n <= max_paused for n, started in rec.paused if started)
    first = next(i for i, (n, _) in enumerate(rec.paused) if n <= max_paused)
    assert max(n for n, _ in rec.paused[first:]) <= max_paused


# 1 s per decode iteration at any batch; prefill 1 s up to 100 tokens
UNIT = CostModel("unit", prefill_tokens=(1, 100, 400), prefill_seconds=(1.0, 1.0, 4.0),
                 decode_batch=(1,), decode_seconds=(1.0,), kv_capacity_tokens=10_000)


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_starvation_bound_lets_a_request_predicted_long_finish(monkeypatch, threshold):
    """One slot; a long request (30 tokens) is overtaken by a stream of 2-token requests that
    keeps about two live. Promoted after idling 2 s x (live / 1 slot), it then runs to the
    end; without the bound it waits for the whole stream."""
    trace = [TraceRequest(0.0, 10, 30)] + [TraceRequest(1.0 + 2.0 * i, 10, 2) for i in range(40)]
    rec = Recorder(monkeypatch)
    cfg = SimConfig(1, 512, 4, scheduler_config=SchedulerConfig(
        predictive_min_samples=1, gittins_starvation_threshold=threshold,
        protect_decodes=False), prediction_sigma=0.0)      # the warm-up's skip-join must not protect the long one
    res = simulate(trace, "predictive", UNIT, cfg)
    long = res.requests[0]
    if threshold == 0:                 # the control
        assert long.metrics.finish_time > 75.0, long.metrics.finish_time
    else:                              # at most 3 live: promoted within 6 s of idling, then 30 tokens
        assert rec.longest_wait["r0"] <= threshold * 3 + 1.0, rec.longest_wait["r0"]
        assert long.metrics.finish_time < 45.0, long.metrics.finish_time


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_gittins_starvation_bound_lets_the_long_request_finish(threshold):
    """The same stream under gittins: once it has learned that requests answer in 2 tokens,
    the long one's index falls below every fresh request's, and without the bound it waits
    for the whole stream. With it, it is promoted and runs to the end (measured: done at
    50 s with the bound, at 110 s, after the whole stream, without)."""
    trace = [TraceRequest(0.0, 10, 30)] + [TraceRequest(1.0 + 2.0 * i, 10, 2) for i in range(40)]
    cfg = SimConfig(1, 512, 4, scheduler_config=SchedulerConfig(
        gittins_min_samples=1, gittins_starvation_threshold=threshold, protect_decodes=False))
    long = simulate(trace, "gittins", UNIT, cfg).requests[0]
    if threshold == 0:
        assert long.metrics.finish_time > 75.0, long.metrics.finish_time
    else:
        assert long.metrics.finish_time < 60.0, long.metrics.finish_time


# -- knobs at the boundary ----------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(predictive_max_paused=-1), "predictive_max_paused"),
    (dict(predictive_max_paused=2.5), "predictive_max_paused"),
    (dict(predictive_min_samples=0), "predictive_min_samples"),
    (dict(predictive_objective="p99"), "predictive_objective"),
    (dict(prompt_neighbors=-1), "prompt_neighbors"),
    (dict(prompt_neighbors=True), "prompt_neighbors"),
    (dict(gittins_starvation_threshold=-1.0), "gittins_starvation_threshold"),
    (dict(gittins_starvation_threshold=float("inf")), "gittins_starvation_threshold"),
])
def test_scheduler_config_rejects_bad_predictive_knobs(kw, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(prediction_sigma=-0.1), "prediction_sigma"),
    (dict(prediction_tau=0.0), "prediction_tau"),
    (dict(prediction_tau=1.2), "prediction_tau"),
    (dict(prediction_sigma=0.5, prediction_tau=0.5), "not both"),
    (dict(prediction_at="first_token"), "prediction_at"),
])
def test_sim_config_rejects_bad_prediction_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        SimConfig(**kw)


@pytest.fixture
def small_trace(tmp_path):
    tr = [TraceRequest(0.0, 50 + 37 * i % 300, 5 + 13 * i % 40) for i in range(60)]
    path = tmp_path / "t.csv"
    save_trace(str(path), tr)
    return str(path)


def test_simulate_cli_prediction_flags(small_trace, tmp_path, capsys):
    out = tmp_path / "o.json"
    assert main(["simulate", "--trace", small_trace, "--load", "3", "--policy", "predictive", "--policy", "fcfs",
                 "--prediction-tau", "0.6", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert 0.3 < res["predictive"]["prediction_kendall_tau"] <= 1.0
    assert main(["simulate", "--trace", small_trace, "--load", "3", "--policy", "predictive",
                 "--prediction-sigma", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["predictive"]["prediction_kendall_tau"] == 1.0
    # noise past a float's range (exp(sigma z) > 1e308) was an OverflowError traceback
    assert main(["simulate", "--trace", small_trace, "--load", "3", "--policy", "predictive",
                 "--prediction-sigma", "1e6", "--json", str(out)]) == 0
    assert abs(json.loads(out.read_text())["predictive"]["prediction_kendall_tau"]) < 0.5
    assert main(["simulate", "--trace", small_trace, "--load", "3", "--policy", "predictive",
                 "--prediction-sigma", "0", "--prediction-at", "arrival", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["predictive"]["prediction_kendall_tau"] == 1.0
    assert main(["simulate", "--trace", small_trace, "--load", "3", "--policy", "predictive",
                 "--prompt-neighbors", "8", "--json", str(out)]) == 0      # no predictor: its own, from prompts
    assert "prediction_kendall_tau" not in json.loads(out.read_text())["predictive"]
    assert main(["simulate", "--trace", small_trace, "--load", "3", "--policy", "predictive",
                 "--prompt-neighbors", "-1", "--json", str(out)]) == 2
    assert "prompt_neighbors" in capsys.readouterr().err
    for bad in (["--prediction-sigma", "-1"], ["--prediction-sigma", "nan"], ["--prediction-tau", "0"],
                ["--prediction-tau", "1.5"], ["--prediction-tau", "0.5", "--prediction-sigma", "1"],
                ["--prediction-tau", "0.5", "--prediction-at", "decode"]):
        with pytest.raises(SystemExit) as e:
            main(["simulate", "--trace", small_trace, "--load", "3", "--json", str(out)] + bad)
        assert e.value.code == 2
        assert "prediction" in capsys.readouterr().err


@pytest.mark.slow   # 3 s of simulation; the default suite runs the script's --help (test_scripts_smoke.py)
def test_sweep_script_quick_mode(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "traces" / "azure_conv_2023.csv").is_file():
        pytest.skip("../shared/traces is not beside this checkout")
    r = subprocess.run([sys.executable, str(root / "scripts" / "sweep_prediction.py"), "--out", str(tmp_path),
                        "--quick", "--jobs", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| predictive 0.55 |" in r.stdout and "| predictive 0.55 at arrival |" in r.stdout
    assert "## targets" in r.stdout
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((tmp_path / "results.json").read_text())) == 8      # 4 baselines, 3 qualities, at arrival
