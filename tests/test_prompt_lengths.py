"""Output lengths predicted from prompt lengths (scheduler/prompt_lengths.py) and the
predictive policy ranking on them in the simulator. No model, no jax."""

from __future__ import annotations


import numpy as np
import pytest

from fastserve_jax.config import SchedulerConfig
from fastserve_jax.length_prediction import NUM_BINS, length_to_bin
from fastserve_jax.scheduler.prompt_lengths import MIN_ROWS, PromptLengthModel, _neighbours, kaplan_meier
from fastserve_jax.sim import simulate
from fastserve_jax.workload import TraceRequest, heavy_tailed_trace
from tests.test_predictive import OPT, PROMPTS, burst, sim_cfg


def templated(n: int, seed: int = 0) -> list[TraceRequest]:
    """Requests from four 'applications', each with its own prompt size and answer length
    (log-normal around it, sigma 0.3), as in the Azure trace's bands."""
    rng = np.random.default_rng(seed)
    apps = [(120, 400), (390, 90), (1050, 300), (700, 30)]             # (prompt tokens, median output)
    out = []
    for a in rng.integers(0, len(apps), n):
        p, m = apps[a]
        out.append(TraceRequest(0.0, int(p * rng.uniform(0.95, 1.05)), int(max(1, m * rng.lognormal(0, 0.3)))))
    return out


def test_neighbours_are_the_nearest_keys():
    rng = np.random.default_rng(0)
    keys = np.sort(np.round(rng.normal(0, 1, 300), 1))                  # many ties
    queries = rng.normal(0, 1.5, 50)
    near = _neighbours(keys, queries, 7)
    brute = np.sort(np.abs(keys[None, :] - queries[:, None]), axis=1)[:, :7]
    assert np.allclose(np.sort(np.abs(keys[near] - queries[:, None]), axis=1), brute)
    assert all(len(set(row)) == 7 for row in near.tolist())
    own = _neighbours(keys, keys, 5, skip_self=True)
    assert not np.any(own == np.arange(len(keys))[:, None])
    brute_own = np.array([np.sort(np.delete(np.abs(keys - k), i))[:5] for i, k in enumerate(keys)])
    assert np.allclose(np.sort(np.abs(keys[own] - keys[:, None]), axis=1), brute_own)


def test_kaplan_meier_by_hand():
    # no censoring: the empirical distribution
    km = kaplan_meier(np.array([[3, 3, 10, 40]]), np.ones((1, 4), bool))[0]
    assert km[length_to_bin(3)] == pytest.approx(0.5) and km[length_to_bin(40)] == pytest.approx(0.25)
    # 2 ends (1/3); 3 is censored; 5 ends, the last at risk: it takes all that is left (2/3)
    km = kaplan_meier(np.array([[5, 2, 3]]), np.array([[True, True, False]]))[0]
    assert km[length_to_bin(2)] == pytest.approx(1 / 3) and km[length_to_bin(5)] == pytest.approx(2 / 3)
    # the longest censored: what survives it goes to twice its length
    km = kaplan_meier(np.array([[2, 100]]), np.array([[True, False]]))[0]
    assert km[length_to_bin(2)] == pytest.approx(0.5) and km[length_to_bin(200)] == pytest.approx(0.5)
    assert km.shape == (NUM_BINS,) and km.sum() == pytest.approx(1.0)


def test_the_gate_opens_on_templated_traffic_only():
    signal, none = PromptLengthModel(2000), PromptLengthModel(2000)
    for t in templated(300):
        signal.observe(t.prompt_tokens, t.output_tokens)
    for t in heavy_tailed_trace(PROMPTS, 300, seed=0):
        none.observe(t.prompt_tokens, t.output_tokens)
    for m in (signal, none):
        m.refresh()
    assert signal.tau > 0.5 and signal.ranks(), signal.tau
    assert abs(none.tau) < 0.15 and not none.ranks(), none.tau
    few = PromptLengthModel(2000)
    for t in templated(MIN_ROWS - 1):
        few.observe(t.prompt_tokens, t.output_tokens)
    few.refresh()
    assert not few.ranks(), "judged on too few rows"


def test_predictions_follow_the_prompt_and_count_running_requests():
    m = PromptLengthModel(2000)
    for t in templated(300):
        m.observe(t.prompt_tokens, t.output_tokens)
    m.refresh()
    short, long_ = m.predict_many([390, 120], [0, 0])
    assert short.mean() < 0.5 * long_.mean(), (short.mean(), long_.mean())
    # a prompt size seen only in requests still running, each past 500 tokens: predicted long
    m.refresh([(7000, 500 + i) for i in range(20)])
    (fresh,) = m.predict_many([7000], [0])
    assert fresh.mean() > 500, fresh.mean()


def test_predictive_ranks_templated_traffic_by_prompt_length_without_a_predictor():
    """No length predictor at all (no oracle, no head): the prompt lengths pass the gate and
    predictive leaves skip-join MLFQ. Before prompt-length predictions it stayed skip-join
    (1.00x) here; measured 2.04x lower latency per token than skip-join-mlfq (199 against 405 ms),
    3.0x fcfs's."""
    trace = burst(templated(300), 3.0, sim_cfg())
    off = sim_cfg(SchedulerConfig(prompt_neighbors=0))
    m = {p: simulate(trace, p, OPT, sim_cfg(SchedulerConfig())).metrics() for p in ("predictive", "fcfs")}
    m["skip-join-mlfq"] = simulate(trace, "skip-join-mlfq", OPT, off).metrics()     # on prefill time alone
    lpt = {p: v["mean_latency_per_token"] for p, v in m.items()}
    assert lpt["skip-join-mlfq"] >= 1.3 * lpt["predictive"], lpt
    assert m["predictive"]["throughput_rps"] >= 0.95 * m["fcfs"]["throughput_rps"]
    none = simulate(trace, "predictive", OPT, off).metrics()
    assert none["mean_latency_per_token"] == lpt["skip-join-mlfq"], "turned off: skip-join MLFQ"


def test_skip_join_joins_on_predicted_service_where_prompt_lengths_rank():
    """Templated traffic: once the gate opens, a request predicted to answer at length joins
    the queue that covers its prefill and that answer, not its prefill alone, and the short
    ones run first. Measured on this burst: latency per token 405 ms with joins on prefill
    time (prompt_neighbors=0, as before), 227 ms with predicted joins, fcfs 597 ms; mean JCT
    48.0 s, 35.6 s and 43.3 s. Where prompt lengths
    say nothing (heavy-tailed outputs behind random prompts) the gate stays shut and every
    decision is the paper's join on prefill time."""
    trace = burst(templated(300), 3.0, sim_cfg())
    on, off = (simulate(trace, "skip-join-mlfq", OPT, sim_cfg(SchedulerConfig(prompt_neighbors=k))).metrics()
               for k in (16, 0))
    fcfs = simulate(trace, "fcfs", OPT, sim_cfg()).metrics()
    assert off["mean_latency_per_token"] >= 1.3 * on["mean_latency_per_token"], (on, off)
    assert on["mean_jct"] <= off["mean_jct"] and on["throughput_rps"] >= 0.95 * fcfs["throughput_rps"]
    plain = burst(heavy_tailed_trace(PROMPTS, 300, seed=0), 3.0, sim_cfg())
    on, off = (simulate(plain, "skip-join-mlfq", OPT, sim_cfg(SchedulerConfig(prompt_neighbors=k))).metrics()
               for k in (16, 0))
    assert on["mean_latency_per_token"] == off["mean_latency_per_token"] and on["mean_jct"] == off["mean_jct"]


def test_gittins_ranks_each_request_by_its_prompt_lengths_prediction():
    """Measured on this burst: mean JCT 39.5 s ranking every request by the one learned
    distribution (prompt_neighbors=0, as before), 32.3 s by its own prediction from prompt
    lengths."""
    trace = burst(templated(300), 3.0, sim_cfg())
    on, off = (simulate(trace, "gittins", OPT, sim_cfg(SchedulerConfig(prompt_neighbors=k))).metrics() for k in (16, 0))
    assert on["mean_jct"] <= 0.9 * off["mean_jct"], (on["mean_jct"], off["mean_jct"])


def test_a_predicted_join_places_the_request_and_a_rejoin_moves_only_unstarted_unpromoted_ones():
    from tests.test_scheduler import make
    sched, _ = make("skip-join-mlfq", seqs=2, cfg=SchedulerConfig())
    pairs = [[t.prompt_tokens, t.output_tokens] for t in templated(200)]
    sched.restore_lengths({"pooled": [n for _, n in pairs], "prompts": pairs})
    assert sched.joins.ranks()
    from fastserve_jax.request import Request
    from fastserve_jax.sampling_params import SamplingParams
    short, long_ = (Request(rid, range(p), SamplingParams(max_tokens=500), 0.0) for rid, p in (("s", 390), ("l", 120)))
    for r in (short, long_):
        sched.add(r)
    prefill_only = make("skip-join-mlfq", seqs=2, cfg=SchedulerConfig(prompt_neighbors=0))[0]
    assert prefill_only.entry_level(long_) <= prefill_only.entry_level(short), "the longer prompt, by prefill"
    assert long_.queue_level > short.queue_level, "the long answer (120-token prompts answer in ~400) joins lower"
    assert sched.entry_level(long_) == long_.queue_level
    promoted = Request("p", range(120), SamplingParams(max_tokens=500), 0.0)
    sched.add(promoted)
    sched._move(promoted, 0)                                # as starvation promotion does
    sched.joins.finishes = sched.config.gittins_refresh
    sched.schedule(0.0)                                     # refreshes the joins (nothing else to do: no KV)
    assert promoted.queue_level == 0 and long_.queue_level == sched.entry_level(long_)
    with pytest.raises(ValueError, match="prompt lengths"):
        make("skip-join-mlfq", cfg=SchedulerConfig())[0].restore_lengths({"pooled": [3], "prompts": [[0, 1]]})


def test_a_restart_keeps_the_pairs_as_a_prior():
    from tests.test_scheduler import make
    pairs = [[t.prompt_tokens, t.output_tokens] for t in templated(200)]
    state = {"edges": [], "history": [[n for _, n in pairs]], "pooled": [n for _, n in pairs], "prompts": pairs}
    sched, _ = make("predictive", seqs=2, cfg=SchedulerConfig())
    sched.restore_lengths(state)
    assert sched.prompts.ranks() and sched.ready(), "the gate is judged on the prior at once"
    assert sched.learned_lengths()["prompts"] == pairs
    for policy in ("gittins", "skip-join-mlfq"):                     # the other learners read it too
        make(policy)[0].restore_lengths(state)
    for bad in ([[1, 2, 3]], [[0, 5]], "x", [[True, 5]]):
        with pytest.raises(ValueError, match="prompt lengths"):
            make("predictive")[0].restore_lengths(dict(state, prompts=bad))
    m = PromptLengthModel(2000)
    m.restore(pairs)
    for t in templated(MIN_ROWS - 1, seed=1):
        m.observe(t.prompt_tokens, t.output_tokens)
    m.refresh()
    assert len(m) == 200 + MIN_ROWS - 1
    m.observe(100, 5)
    m.refresh()
    assert len(m) == MIN_ROWS and m.prior == 0, "dropped once this run has MIN_ROWS of its own"


def test_the_engine_opens_the_gate_from_its_own_finishes(tmp_path, monkeypatch):
    """The real engine (demo model): requests whose prompt sizes tell their lengths (ignore_eos,
    max_tokens by prompt size) pass the gate as they finish; predictive then leaves skip-join
    MLFQ and ranks new arrivals by prompt-length predictions; every output has its length."""
    from engine_grids import DEMO_KW
    from fastserve_jax import LLM, SamplingParams

    monkeypatch.setenv("FASTSERVE_JAX_LENGTHS_DIR", str(tmp_path / "lengths"))
    monkeypatch.setenv("FASTSERVE_JAX_PREDICTOR_DIR", str(tmp_path / "predictor"))
    llm = LLM(**DEMO_KW, scheduler="predictive")
    sched = llm.engine.scheduler
    rng = np.random.default_rng(0)
    apps = [(5, 24), (20, 3), (48, 10)]                     # (prompt tokens, output tokens)

    def batch(n):
        picks = [apps[i] for i in rng.integers(0, len(apps), n)]
        prompts = [[int(t) for t in rng.integers(3, 20, p)] for p, _ in picks]
        params = [SamplingParams(max_tokens=o + int(rng.integers(0, 2)), ignore_eos=True, temperature=0)
                  for _, o in picks]
        outs = llm.generate(prompts, params)
        assert [len(o.outputs[0].token_ids) for o in outs] == [sp.max_tokens for sp in params]

    batch(80)                 # the gate is judged as they finish (early on, on the short ones first)
    batch(8)                  # and the last of them are removed from the policy while these run
    assert sched.prompts.ranks() and sched.prompts.tau > 0.5, sched.prompts.tau
    ranked_by = {}                                          # id -> ranked by its prompt-length prediction
    key = type(sched).key
    monkeypatch.setattr(type(sched), "key", lambda s, req: (
        ranked_by.setdefault(req.request_id, req.request_id in s.by_prompt), key(s, req))[1])
    batch(16)
    assert sched.warmup is None, "ranked, not skip-join MLFQ"
    assert len(ranked_by) == 16 and all(ranked_by.values()), ranked_by
    llm.engine.close()


def test_the_gate_counts_running_requests():
    """A burst's first finishes are short whatever the prompt; the long answers are still
    running. Judged on finishes alone the prompt lengths rank nothing, counting the running
    requests as lengths of at least their age they do."""
    rng = np.random.default_rng(0)
    finished = [(int(p), int(rng.integers(5, 16))) for p in [100] * 50 + [1000] * 10]
    running = [(1000 + int(rng.integers(0, 20)), int(rng.integers(150, 250))) for _ in range(20)]
    alone, counted = PromptLengthModel(2000), PromptLengthModel(2000)
    for m in (alone, counted):
        for p, n in finished:
            m.observe(p, n)
    alone.refresh()
    counted.refresh(running)
    assert not alone.ranks() and alone.tau < 0.2, alone.tau
    assert counted.ranks(), counted.tau


def test_the_gate_counts_the_pairs_predictions_separate():
    """Two applications, a quarter of the finishes from one with long prompts and short
    answers, the rest answering long with a wide spread (sigma 0.8). Within the majority the
    predictions are alike and their order is noise; counted as coin flips those pairs held
    tau under the gate in 12 of 16 draws although every pair across the applications ranks
    right (4 of 16 open). Counting only the pairs whose predictions differ, it opens in most."""
    opened = 0
    for seed in range(16):
        rng = np.random.default_rng(seed)
        m = PromptLengthModel(2000)
        for app, (prompt, answer, sigma) in enumerate([(2800, 41, 0.3), (1800, 406, 0.8)]):
            for _ in range(14 if app == 0 else 46):
                m.observe(int(prompt * rng.uniform(0.9, 1.1)), max(1, int(answer * rng.lognormal(0, sigma))))
        m.refresh()
        opened += m.ranks()
    assert opened >= 10, opened


def test_the_gate_opens_at_min_tau_and_shuts_under_close_tau(monkeypatch):
    """Judged tau 0.2 on a shut gate keeps it shut; 0.35 opens it; 0.2 and 0.16 keep it
    open; 0.1 shuts it; nan (too few rows) keeps it shut."""
    from fastserve_jax.scheduler import prompt_lengths
    taus = iter([0.2, 0.35, 0.2, 0.16, 0.1, 0.2, float("nan")])
    monkeypatch.setattr(prompt_lengths.PromptLengthModel, "_loo_concordance", lambda self: next(taus))
    m = PromptLengthModel(2000)
    seen = []
    for i in range(7):
        for _ in range(MIN_ROWS):                        # enough new finishes that each refresh judges
            m.observe(100 + i, 10)
        m.refresh()
        seen.append(m.ranks())
    assert seen == [False, True, True, True, False, False, False], seen


def two_applications(seed, apps, sigma, n, device_tokens, load, arrival_seed, policies) -> dict[str, float]:
    """Mean latency per token of each policy on `n` requests drawn from two applications
    ((prompt, median answer) each; prompts within 10%, answers log-normal with `sigma`), 32
    sequences, `device_tokens` of device KV, recompute, Poisson at `load` x capacity
    (sim_templated.py's shape)."""
    from fastserve_jax.sim import SimConfig
    from fastserve_jax.workload import capacity_rps, with_arrivals
    rng = np.random.default_rng(seed)
    trace = []
    for a in rng.integers(0, 2, n):
        p, m = apps[a]
        prompt = int(p * rng.uniform(0.9, 1.1))
        trace.append(TraceRequest(0.0, prompt, max(1, min(4000 - prompt, int(m * rng.lognormal(0, sigma))))))
    cfg = SimConfig(32, 2048, 16, device_tokens, host_kv_capacity_tokens=20_000, swap_policy="recompute")
    rate = load * capacity_rps(trace, OPT, 32, (cfg.num_blocks(OPT) - 1) * 16)
    arrivals = with_arrivals(trace, rate, seed=arrival_seed)
    return {p: simulate(arrivals, p, OPT, cfg).metrics()["mean_latency_per_token"] for p in policies}


def test_skip_join_starts_a_minority_of_long_prompts_with_short_answers():
    """Two applications: 2,800-token prompts answering in ~41 tokens, 1,800 in ~406 (sigma
    0.8), 20,000 tokens of device KV, 32 sequences, recompute, a 1.5x burst. Joining on
    prefill, skip-join starts the long prompts last, few of them finish, and a gate that
    counted the majority's unseparated pairs stayed shut until the starvation limit let them
    through: 0.90x fcfs's latency per token here (sim_templated.py seed 29: 0.54x). With the
    gate on separated pairs, measured 1.80x."""
    lpt = two_applications(2, [(2800, 41), (1800, 406)], 0.8, 300, 20_000, 1.5, 2, ("fcfs", "skip-join-mlfq"))
    assert lpt["fcfs"] >= 1.3 * lpt["skip-join-mlfq"], lpt


def test_where_the_pool_holds_few_requests_waiting_is_not_starving():
    """Two applications (1,510-token prompts answering in ~724 tokens, 662 in ~63), 8,000
    tokens of device KV (three of the long requests), 32 sequences, recompute, 0.9x of
    capacity. Stretched by 32 slots, the 20 s starvation limit promoted the long requests as
    they waited their turn, and first-until-done they made predictive fcfs (1.00x fcfs's
    latency per token, skip-join 2.73x; sim_templated.py seed 46). Stretched by the typical
    requests the pool holds, measured 3.10x here (1.02x before; skip-join 1.62x)."""
    lpt = two_applications(46, [(1510, 724), (662, 63)], 0.3, 200, 8000, 0.9, 0, ("fcfs", "predictive"))
    assert lpt["fcfs"] >= 2.0 * lpt["predictive"], lpt


def test_equal_requests_share_a_prediction_and_its_indices():
    """Requests with the same prompt length and tokens share one prediction object, equal to
    what each would get alone; a prediction's remembered Gittins index equals a fresh one."""
    from fastserve_jax.length_prediction import LengthPrediction
    m = PromptLengthModel(2000)
    for t in templated(300):
        m.observe(t.prompt_tokens, t.output_tokens)
    m.refresh([(120, 50), (390, 7)])
    preds = m.predict_many([390, 120, 390, 390, 700], [0, 0, 0, 3, 0])
    assert preds[0] is preds[2] and preds[0] is not preds[3] and preds[0] is not preds[1]
    for p, (prompt, g) in zip(preds, [(390, 0), (120, 0), (390, 0), (390, 3), (700, 0)]):
        alone = m.predict_many([prompt], [g])[0]
        assert np.array_equal(p.probs, alone.probs) and p.at_tokens == alone.at_tokens == g
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = LengthPrediction(rng.dirichlet(np.ones(NUM_BINS) * 0.3))
        for g, slots, per_token in [(int(rng.integers(0, 300)), float(rng.uniform(0, 40)), bool(rng.integers(0, 2)))
                                    for _ in range(5)]:
            first = p.gittins_index(g, slots, per_token)
            assert p.gittins_index(g, slots, per_token) == first == p._gittins_index(g, slots, per_token)


@pytest.mark.parametrize("max_paused", [4, 64])
def test_ranks_for_the_swap_policy_are_the_places_in_the_full_order(monkeypatch, max_paused):
    """PredictiveScheduler.ranks finds the KV holders' places without ordering every live
    request; at every call of a templated burst with tight device KV and proactive swapping
    they are their places in priority_order() (the start allowance cut short or not, requests
    promoted for waiting among them)."""
    from fastserve_jax.scheduler.learned import LearnedLengthPolicy
    from fastserve_jax.scheduler.predictive import PredictiveScheduler
    compared = []
    fast = PredictiveScheduler.ranks

    def both(self, only=None):
        got = fast(self, only)
        if self.warmup is None and only is not None:
            want = LearnedLengthPolicy.ranks(self, only)
            assert got == want
            compared.append((len(got), len(self._promoted)))
        return got

    monkeypatch.setattr(PredictiveScheduler, "ranks", both)
    cfg = sim_cfg(SchedulerConfig(predictive_max_paused=max_paused, gittins_starvation_threshold=2.0),
                  kv_capacity_tokens=20_000, swap_policy="proactive")
    simulate(burst(templated(250), 3.0, cfg), "predictive", OPT, cfg)
    assert len(compared) > 50 and any(n for n, _ in compared) and any(p for _, p in compared), compared[:5]
