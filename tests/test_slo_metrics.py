"""FastServe's service-level figures (fastserve_jax/slo.py): SLO attainment on literal
requests, the highest rate within a limit over a sweep (goodput, rate at 95%), the unloaded
latency per token by hand and against the simulator, and what `simulate` and `bench` report.
No model, no jax, no server."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from fastserve_jax.config import SamplingParams
from fastserve_jax.cost_model import CostModel
from fastserve_jax.slo import PAPER_SLOS, highest_rate_within, parse_slo_pair, request_latencies, \
    slo_attainment, summarize, sweep_summary, unloaded_latency_per_token
from fastserve_jax.request import Request, RequestStatus
from fastserve_jax.sim import SimConfig, simulate
from fastserve_jax.workload import TraceRequest, load_trace, save_trace, with_arrivals
from fastserve_jax.serve import bench_client
from fastserve_jax.serve.bench_cmd import slo_figures
from fastserve_jax.serve.cli import main

AZURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces", "azure_conv_2023.csv")


def finished(arrival: float, first: float, finish: float, tokens: int) -> Request:
    """A request as sim.advance leaves it: `tokens` outputs, first token and finish stamped."""
    r = Request(f"r{arrival}-{first}", list(range(4)), SamplingParams(max_tokens=tokens, ignore_eos=True), arrival)
    r.output_token_ids = [0] * tokens
    r.status, r.finish_reason = RequestStatus.FINISHED, "length"
    r.metrics.first_token_time, r.metrics.finish_time = first, finish
    return r


# ttft, tpot (s): 1.0, 0.125 | 2.0, none (1 token) | 0.5, 0.25 | 7.0, 0.125   (binary-exact values)
REQS = [finished(0.0, 1.0, 1.0 + 9 * 0.125, 10), finished(0.0, 2.0, 2.0, 1), finished(1.0, 1.5, 2.5, 5),
        finished(0.0, 7.0, 7.25, 3)]


def test_latencies_of_literal_requests():
    jct, ttft, tpot, out = request_latencies(REQS)
    assert list(ttft) == [1.0, 2.0, 0.5, 7.0] and list(out) == [10, 1, 5, 3]
    assert tpot[0] == 0.125 and math.isnan(tpot[1]) and tpot[2] == 0.25 and tpot[3] == 0.125
    assert list(jct) == [2.125, 2.0, 1.5, 7.25]
    m = summarize(REQS)
    assert m["mean_tpot"] == pytest.approx((0.125 + 0.25 + 0.125) / 3)
    assert m["mean_latency_per_token"] == pytest.approx((2.125 / 10 + 2.0 + 1.5 / 5 + 7.25 / 3) / 4)
    assert m["throughput_rps"] == 4 / 7.25
    assert m["arrival_rps"] == 4 / 1.0      # arrivals at 0, 0, 1, 0: what a rate's random draw came at
    assert summarize(REQS[:2])["arrival_rps"] is None       # all at one instant


def test_mean_tpot_of_one_token_requests_is_undefined_not_zero():
    # no request has a second token, so there is no time per output token: a 0.0 would read as
    # perfect (and meet any TPOT target); bench_client reports nan for the same case
    m = summarize([REQS[1], finished(0.0, 3.0, 3.0, 1)])
    assert math.isnan(m["mean_tpot"]) and m["mean_ttft"] == 2.5


def test_slo_attainment_of_literal_requests():
    _, ttft, tpot, _ = request_latencies(REQS)
    got = slo_attainment(ttft, tpot)
    assert [(s["ttft"], s["tpot"]) for s in got] == list(PAPER_SLOS)
    # (1.55, 0.15): only the first; (3.1, 0.3) and (6.2, 0.6): all but the 7 s one (the 1-token
    # request needs only its TTFT)
    assert [s["attained"] for s in got] == [0.25, 0.75, 0.75]
    # both bounds are inclusive; a 1-token request ignores the TPOT bound
    assert [s["attained"] for s in slo_attainment(ttft, tpot, [(1.0, 0.125), (2.0, 0.01), (0.5, 1.0)])] == \
        [0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="equally long"):
        slo_attainment(ttft, tpot[:2])


def test_bench_slo_figures_from_client_timings():
    def res(sent, chunks, tokens, status=200):
        return bench_client.Result(status=status, done=status == 200, sent=sent, chunk_times=chunks,
                                   end=chunks[-1] if chunks else sent, completion_tokens=tokens)

    results = [res(0.0, [1.0, 1.5, 2.0], 3),            # ttft 1, tpot 0.5
               res(0.0, [0.5], 1),                      # 1 token: ttft only
               res(1.0, [1.25, 1.5, 1.75, 2.0, 2.25], 5),   # ttft 0.25, tpot 0.25
               res(0.0, [], None, status=500)]          # failed: misses every pair
    m = slo_figures(results, [(1.0, 0.5), (0.3, 0.3)])
    assert [s["attained"] for s in m["slo_attainment"]] == [0.75, 0.25]
    assert m["mean_latency_per_token"] == pytest.approx((2.0 / 3 + 0.5 + 1.25 / 5) / 3)
    # nothing completed: a row that says so (it ended the whole sweep, its rows unprinted, until 2026-12-07)
    none = slo_figures(results[3:], PAPER_SLOS)
    assert none["mean_latency_per_token"] == math.inf and [s["attained"] for s in none["slo_attainment"]] == [0.0] * 3
    late = res(0.5, [], None, status=500)
    late.end = 4.0                                      # fails after the last completion, at 4 s
    m = bench_client.summarize(results + [late])
    # vLLM's duration: first send to the last response's end, failed ones too (it was 2.25 s)
    assert (m["completed"], m["failed"], m["throughput_rps"]) == (3, 2, 3 / 4.0)
    m = bench_client.summarize(results[3:])
    assert (m["completed"], m["failed"], m["throughput_rps"]) == (0, 1, 0.0) and math.isnan(m["ttft_mean"])


def test_a_rate_with_failed_requests_is_no_goodput():
    """bench's rows carry `failed`: its mean latency per token is over the completed ones only,
    so at 1,000 req/s with 26 of 30 refused, goodput read 1,000 until 2026-12-07."""
    rows = [dict(offered_rps=r, mean_latency_per_token=0.01, failed=f, slo_attainment=[])
            for r, f in ((2.0, 0), (1000.0, 26))]
    assert sweep_summary(rows, 0.05)["goodput_rps"] == 2.0
    assert sweep_summary([dict(r, failed=0) for r in rows], 0.05)["goodput_rps"] == 1000.0


# -- the highest rate within a limit ----------------------------------------------------------------
def test_rate_at_95pct_interpolates_between_the_bracketing_rates():
    # 0.97 at 2 req/s, 0.91 at 3: 95% is a third of the way
    assert highest_rate_within([1, 2, 3], [1.0, 0.97, 0.91], 0.95, True) == pytest.approx(2 + 1 / 3)
    assert highest_rate_within([3, 1, 2], [0.91, 1.0, 0.97], 0.95, True) == pytest.approx(2 + 1 / 3)
    assert highest_rate_within([1, 2, 3], [1.0, 0.95, 0.5], 0.95, True) == 2.0       # meeting it exactly counts
    # noisy: misses at 2, meets again at 3: the first crossing
    assert highest_rate_within([1, 2, 3], [1.0, 0.9, 0.99], 0.95, True) == pytest.approx(1.5)


def test_rate_at_95pct_none_and_all_pass():
    assert highest_rate_within([1, 2], [0.94, 0.5], 0.95, True) is None
    assert highest_rate_within([1], [0.9], 0.95, True) is None
    assert highest_rate_within([1, 2, 4], [1.0, 0.99, 0.96], 0.95, True) == 4.0
    with pytest.raises(ValueError, match="one value per rate"):
        highest_rate_within([1, 2], [1.0], 0.95, True)


def test_goodput_on_latency_per_token():
    # 50 ms at 2 req/s, 200 ms at 4: a 100 ms SLO is crossed a third of the way
    assert highest_rate_within([1, 2, 4], [0.02, 0.05, 0.2], 0.1, False) == pytest.approx(2 + 2 / 3)
    assert highest_rate_within([1, 2], [0.02, math.inf], 0.1, False) == 1.0
    assert highest_rate_within([1, 2], [0.2, 0.3], 0.1, False) is None
    assert highest_rate_within([1, 2], [0.02, 0.03], 0.1, False) == 2.0


def test_sweep_summary_of_literal_rows():
    def row(rate, lpt, *attained):
        return dict(offered_rps=rate, mean_latency_per_token=lpt,
                    slo_attainment=[dict(ttft=t, tpot=p, attained=x) for (t, p), x in zip(PAPER_SLOS, attained)])

    s = sweep_summary([row(2, 0.05, 0.97, 1.0, 1.0), row(1, 0.02, 1.0, 1.0, 1.0), row(3, 0.2, 0.91, 0.5, 0.96)],
                      0.1)
    assert s["goodput_rps"] == pytest.approx(2 + 1 / 3) and s["slo_latency_per_token"] == 0.1
    assert s["max_offered_rps"] == 3
    assert [x["rate"] for x in s["rate_at_95pct"]] == [pytest.approx(2 + 1 / 3), pytest.approx(2.1), 3.0]
    assert [(x["ttft"], x["tpot"]) for x in s["rate_at_95pct"]] == list(PAPER_SLOS)


# -- the unloaded latency per token ----------------------------------------------------------------
# prefill 1 s at 10 tokens to 2 s at 110; 1 ms per (chunk token x context token);
# decode 0.5 s + 10 ms per context token
TINY = CostModel("tiny", prefill_tokens=(10, 110), prefill_seconds=(1.0, 2.0), decode_batch=(1,),
                 decode_seconds=(0.5,), decode_context=0.01, prefill_context=0.001, kv_capacity_tokens=1000)


def test_unloaded_latency_per_token_by_hand():
    trace = [TraceRequest(0.0, 60, 3), TraceRequest(0.0, 10, 1)]
    # 60-token prompt in one launch: 1.5 + 0.001 * 60 * 30 (its own attention) = 3.3; then tokens 2
    # and 3 read 61 and 62 tokens: 1.11 + 1.12. The 10-token prompt: 1.0 + 0.001 * 10 * 5.
    a, b = (3.3 + 1.11 + 1.12) / 3, 1.05 / 1
    assert unloaded_latency_per_token(trace, TINY) == pytest.approx((a + b) / 2)
    # in 40-token chunks: (40 after 0) 1.3 + 0.001*40*20 = 2.1, (20 after 40) 1.1 + 0.001*20*50 = 2.1
    a = (2.1 + 2.1 + 1.11 + 1.12) / 3
    assert unloaded_latency_per_token(trace, TINY, 40) == pytest.approx((a + b) / 2)
    with pytest.raises(ValueError, match="at least one"):
        unloaded_latency_per_token([], TINY)


@pytest.mark.parametrize("padded", [None, "blocks", "rows"])
def test_unloaded_latency_per_token_is_what_the_simulator_charges_a_lone_request(padded):
    trace = [TraceRequest(1000.0 * i, p, o) for i, (p, o) in enumerate([(60, 3), (10, 1), (100, 20), (7, 9)])]
    cfg = SimConfig(max_num_seqs=4, max_num_batched_tokens=40, block_size=4)
    # blocks: a profile of the reference attention, whose decode rows read up to a block bucket;
    # rows: a paged kernel's profile whose smallest decode bucket is 4 rows (a lone decode pays for
    # 4: 1.0 s here, not the 1-row 0.5 s, which the SLO's base once charged)
    cost = {None: TINY, "blocks": dataclasses.replace(TINY, block_size=4, block_buckets=(1, 2, 4, 8, 16, 32)),
            "rows": dataclasses.replace(TINY, decode_batch=(1, 4), decode_seconds=(0.5, 1.0),
                                        decode_row_buckets=(4, 8))}[padded]
    m = simulate(trace, "fcfs", cost, cfg).metrics()
    assert m["mean_latency_per_token"] == pytest.approx(unloaded_latency_per_token(trace, cost, 40))


# -- the command lines ----------------------------------------------------------------------------------
def test_parse_slo_pair():
    assert parse_slo_pair("1.55,0.15") == (1.55, 0.15)
    for bad in ("1.5", "1,2,3", "a,b", "0,0.1", "1,-0.1", "1,nan", "inf,1", ""):
        with pytest.raises(ValueError, match="TTFT,TPOT"):
            parse_slo_pair(bad)


def test_bench_starts_its_servers_fully_warmed_unless_told(monkeypatch, tmp_path):
    """A server still loading shapes in the background serves at about half its rate, so the
    servers `bench` starts warm up fully first; an explicit --warmup is passed through."""
    from fastserve_jax.serve import bench_cmd

    trace = tmp_path / "t.csv"        # bench reads its trace before it starts a server; not ../shared's
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" +
                     "".join(f"{i}.0,{20 + i},{5 + i % 7}\n" for i in range(100)))
    monkeypatch.setattr(bench_cmd, "TRACE", str(trace))

    class Started(Exception):
        pass
    started = []

    def launch(scheduler, argv):
        started.append(argv)
        raise Started
    monkeypatch.setattr(bench_cmd, "LaunchedServer", launch)
    for extra, want in (([], "full"), (["--warmup", "lazy"], "lazy")):
        with pytest.raises(Started):
            main(["bench", "--scheduler", "fcfs", *extra])
        argv = started[-1]
        assert argv.count("--warmup") == 1 and argv[argv.index("--warmup") + 1] == want
        assert "--engine-process" not in argv
    with pytest.raises(Started):
        main(["bench", "--scheduler", "fcfs", "--engine-process"])
    assert started[-1][-1] == "--engine-process"      # passed on to the servers it starts


@pytest.mark.parametrize("argv,msg", [(["--slo", "1.5"], "TTFT,TPOT"), (["--slo", "2,0"], "positive"),
                                      (["--slo", "1,x"], "TTFT,TPOT"),
                                      (["--slo-latency-per-token", "0"], "positive number of seconds")])
def test_cli_rejects_bad_slo_options(argv, msg, tmp_path, capsys):
    for cmd in (["simulate", "--trace", str(tmp_path / "none.csv"), "--rate", "1", "--json", str(tmp_path / "o")],
                ["bench", "--url", "http://127.0.0.1:9"]):
        with pytest.raises(SystemExit) as e:
            main(cmd + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "--slo" in err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def trace_path(tmp_path):
    if os.path.isfile(AZURE):
        return AZURE
    path = str(tmp_path / "t.csv")            # a checkout without ../shared: the same shape
    save_trace(path, [TraceRequest(0.7 * i, 200 + 53 * i % 900, 20 + 37 * i % 300) for i in range(40)])
    return path


def test_num_requests_with_rates_gives_a_finite_burst_per_rate(trace_path):
    trace, _ = load_trace(trace_path, 30)
    for rate in (0.5, 2.0):
        burst = with_arrivals(trace, rate)
        assert len(burst) == 30 and [(r.prompt_tokens, r.output_tokens) for r in burst] == \
            [(r.prompt_tokens, r.output_tokens) for r in trace]
        assert burst[0].arrival == 0.0 and 29 / rate / 3 < burst[-1].arrival < 3 * 29 / rate


def test_simulate_reports_offered_served_slo_and_goodput(trace_path, tmp_path):
    out = tmp_path / "o.json"
    assert main(["simulate", "--trace", trace_path, "--num-requests", "30", "--rate", "2", "0.5",
                 "--policy", "fcfs", "--policy", "skip-join-mlfq", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"fcfs", "skip-join-mlfq", "summary"}
    for policy in ("fcfs", "skip-join-mlfq"):
        rows = res[policy]
        assert [m["offered_rps"] for m in rows] == [0.5, 2.0] == [m["rate"] for m in rows]   # rate order
        assert all(m["num_requests"] == 30 and m["throughput_rps"] > 0 for m in rows)        # 30 per rate
        for m in rows:
            assert [(s["ttft"], s["tpot"]) for s in m["slo_attainment"]] == list(PAPER_SLOS)
            assert all(0.0 <= s["attained"] <= 1.0 for s in m["slo_attainment"])
        s = res["summary"][policy]
        assert s["max_offered_rps"] == 2.0 and len(s["rate_at_95pct"]) == 3
        assert s["slo_latency_per_token"] == pytest.approx(5 * s["unloaded_latency_per_token"])
        trace, _ = load_trace(trace_path, 30)
        cost = CostModel.load("opt-13b-a100")
        assert s["unloaded_latency_per_token"] == pytest.approx(unloaded_latency_per_token(trace, cost, 2048))
        lpt = [m["mean_latency_per_token"] for m in rows]
        assert s["goodput_rps"] == highest_rate_within([0.5, 2.0], lpt, s["slo_latency_per_token"], False)


def test_simulate_writes_strict_json_and_says_what_changes_nothing(tmp_path, capsys):
    """A probe of 2026-12-07: a NaN mean TPOT (one-token answers) was written as a bare NaN,
    which strict parsers refuse; --swap-policy proactive without a host pool changed nothing
    without a word; a --slo pair given twice was a duplicated column; the heavy-tail script
    wrote arrival times of 0, so a forgotten --rate ran one burst instead of being refused."""
    path, out = str(tmp_path / "one.csv"), tmp_path / "o.json"
    save_trace(path, [TraceRequest(0.0, 30, 1) for _ in range(6)], timed=False)
    assert main(["simulate", "--trace", path, "--rate", "1", "2", "--swap-policy", "proactive", "--json", str(out)]) == 0
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert "there is none (--host-kv-capacity-tokens 0)" in capsys.readouterr().err
    assert main(["simulate", "--trace", path, "--rate", "1", "--slo", "1,0.1", "--slo", "1,0.1"]) == 2
    assert "--slo (1.0, 0.1) is given twice" in capsys.readouterr().err
    assert main(["simulate", "--trace", path]) == 2 and "--rate or --load" in capsys.readouterr().err


def test_simulate_one_rate_keeps_the_flat_shape_with_the_new_fields(trace_path, tmp_path):
    out = tmp_path / "o.json"
    assert main(["simulate", "--trace", trace_path, "--num-requests", "20", "--json", str(out),
                 "--slo", "100,10", "--slo", "0.001,0.001", "--slo-latency-per-token", "1"]) == 0
    res = json.loads(out.read_text())
    m = res["skip-join-mlfq"]                              # no summary: goodput needs a sweep
    assert set(res) == {"skip-join-mlfq"} and m["rate"] is None
    trace, _ = load_trace(trace_path, 20)
    # the trace's own rate, n over its span, as served is n over first arrival to last finish (it
    # was (n - 1) over the span: two requests 100 s apart were served at twice the rate offered)
    assert m["offered_rps"] == pytest.approx(20 / (trace[-1].arrival - trace[0].arrival))
    assert m["throughput_rps"] <= m["offered_rps"]
    assert [s["attained"] for s in m["slo_attainment"]] == [1.0, 0.0]
    assert 0 < m["throughput_rps"] <= m["num_requests"] / m["mean_jct"] + m["offered_rps"]
