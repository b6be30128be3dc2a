"""Workload inputs at the boundary: trace files (out of order, short rows), the capacity a
token budget allows, and `simulate` and `bench` turning bad input into `error: ...` and exit
2 before anything runs or starts. No model, no jax, no server."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fastserve_jax.cost_model import CostModel
from fastserve_jax.serve import bench_cmd, bench_server
from fastserve_jax.serve.cli import main
from fastserve_jax.serve.simulate_cmd import check_plot
from fastserve_jax.workload import TraceRequest, capacity_rps, gamma_shape, load_trace, save_trace, with_arrivals

OPT = CostModel.load("opt-13b-a100")
HEAD = "arrived_at,num_prefill_tokens,num_decode_tokens\n"


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def trace(tmp_path) -> str:
    """40 requests of Azure-like lengths, 0.7 s apart."""
    path = str(tmp_path / "t.csv")
    save_trace(path, [TraceRequest(0.7 * i, 200 + 53 * i % 900, 20 + 37 * i % 300) for i in range(40)])
    return path


def test_an_out_of_order_trace_loads_sorted_from_its_earliest_arrival(tmp_path):
    ordered, timed = load_trace(write(tmp_path, "a.csv", HEAD + "1.0,20,8\n3.0,30,9\n5.0,10,5\n"))
    shuffled, _ = load_trace(write(tmp_path, "b.csv", HEAD + "5.0,10,5\n1.0,20,8\n3.0,30,9\n"))
    assert timed and shuffled == ordered
    assert [r.arrival for r in ordered] == [0.0, 2.0, 4.0]
    ties, _ = load_trace(write(tmp_path, "c.csv", HEAD + "2.0,1,1\n1.0,2,2\n2.0,3,3\n"))
    assert [r.prompt_tokens for r in ties] == [2, 1, 3]           # stable: equal times keep file order


def test_simulate_gives_an_out_of_order_trace_the_sorted_one_s_result(tmp_path):
    res = []
    for name, rows in (("a.csv", "1.0,20,8\n3.0,30,9\n5.0,10,5\n"), ("b.csv", "5.0,10,5\n1.0,20,8\n3.0,30,9\n")):
        out = tmp_path / f"{name}.json"
        assert main(["simulate", "--trace", write(tmp_path, name, HEAD + rows), "--policy", "fcfs",
                     "--json", str(out)]) == 0
        res.append(json.loads(out.read_text())["fcfs"])
    timing = ("sim_wall_seconds", "policy_host_seconds")       # host time, not simulated time
    ordered, shuffled = ({k: v for k, v in m.items() if k not in timing} for m in res)
    assert ordered["offered_rps"] == pytest.approx(3 / 4) and shuffled == ordered     # 3 requests over 4 s


def test_the_first_n_of_an_out_of_order_trace_are_its_earliest_arrivals(tmp_path):
    """--num-requests cut the file before sorting it: of a log written 5, 1, 3 the first two
    were the requests at 5 and 1 (4 s apart, offered 0.25/s) instead of those at 1 and 3."""
    ordered, _ = load_trace(write(tmp_path, "a.csv", HEAD + "1.0,20,8\n3.0,30,9\n5.0,10,5\n"), 2)
    shuffled, _ = load_trace(write(tmp_path, "b.csv", HEAD + "5.0,10,5\n1.0,20,8\n3.0,30,9\n"), 2)
    assert shuffled == ordered == [TraceRequest(0.0, 20, 8), TraceRequest(2.0, 30, 9)]
    untimed, _ = load_trace(write(tmp_path, "c.csv", "num_prefill_tokens,num_decode_tokens\n7,1\n8,2\n9,3\n"), 2)
    assert [r.prompt_tokens for r in untimed] == [7, 8]             # no times: file order


@pytest.mark.parametrize("rows,what", [("10,5\n20\n", "line 3"), ("10,5\n,5\n", "line 3"),
                                       ("10.5,5\n", "integers"), ("0,5\n", r"in \[1, ")])
def test_a_bad_row_is_a_value_error_naming_the_file_and_line(tmp_path, rows, what):
    path = write(tmp_path, "bad.csv", "num_prefill_tokens,num_decode_tokens\n" + rows)
    with pytest.raises(ValueError, match=what) as e:
        load_trace(path)
    assert path in str(e.value) and "line" in str(e.value)
    with pytest.raises(ValueError, match="finite"):
        load_trace(write(tmp_path, "nan.csv", HEAD + "0,1,1\nnan,1,1\n"))


def test_a_trace_saved_with_a_byte_order_mark_keeps_its_first_column(tmp_path):
    """A CSV saved by a spreadsheet starts with a UTF-8 byte order mark, which became part of
    the first column's name: 'has no arrived_at column; give --rate or --load' for a file that
    has one, or a missing num_prefill_tokens; a misspelt header now shows what was read."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + HEAD.encode() + b"1.0,20,8\n3.0,30,9\n")
    assert load_trace(str(path)) == ([TraceRequest(0.0, 20, 8), TraceRequest(2.0, 30, 9)], True)
    with pytest.raises(ValueError, match=r"column ' num_decode_tokens' is not read: column names are exact, this "
                                         r"one reads as 'num_decode_tokens'"):
        load_trace(write(tmp_path, "spaced.csv", "arrived_at, num_prefill_tokens, num_decode_tokens\n0,1,1\n"))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['num_prefill_tokens'\] \(its columns "
                                         r"\['arrived_at', 'prompt', 'num_decode_tokens'\]\)"):
        load_trace(write(tmp_path, "misspelt.csv", "arrived_at,prompt,num_decode_tokens\n0,1,1\n"))


@pytest.mark.parametrize("head", ["timestamp,num_prefill_tokens,num_decode_tokens",
                                  "Arrived_At,num_prefill_tokens,num_decode_tokens",
                                  "Timestamp,ContextTokens,GeneratedTokens"])
def test_a_time_column_named_but_for_case_is_refused_not_ignored(tmp_path, head):
    """A `timestamp` column was read as any other column: the trace loaded untimed, and
    `simulate` ran it on generated arrival times without a word."""
    with pytest.raises(ValueError, match=f"its column '{head.split(',')[0]}' is not read: column names are exact"):
        load_trace(write(tmp_path, "t.csv", head + "\n0,1,1\n"))
    # beside the exact name it is just another column
    assert load_trace(write(tmp_path, "u.csv", "arrived_at,timestamp,num_prefill_tokens,num_decode_tokens\n"
                                               "2,0,1,1\n"))[1] is True


def test_a_row_with_more_fields_than_the_header_is_refused(tmp_path):
    """csv.DictReader files a long row's extra fields under None, and the row loaded: a
    shifted column read as lengths."""
    with pytest.raises(ValueError, match=r"line 3: 4 fields, the header names 3"):
        load_trace(write(tmp_path, "long.csv", HEAD + "0,1,1\n1,2,2,9\n"))
    with pytest.raises(ValueError, match=r"line 2: 3 fields, the header names 2"):
        load_trace(write(tmp_path, "long2.csv", "num_prefill_tokens,num_decode_tokens\n1,2,3\n"))


def test_azures_published_trace_format_loads_as_ours(tmp_path):
    """Azure's LLM inference traces as published (TIMESTAMP,ContextTokens,GeneratedTokens, the
    time a date and time of day with 7 fractional digits) load as the processed ones do: times
    in seconds from the earliest, rows sorted by time; without TIMESTAMP, untimed. A bad row
    names Azure's columns."""
    head = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    rows = "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:15:45.0,10,3\n"
    reqs, timed = load_trace(write(tmp_path, "az.csv", head + rows))
    assert timed and [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(10, 3), (374, 44), (396, 109)]
    assert [r.arrival for r in reqs] == pytest.approx([0.0, 1.68059, 5.995169], abs=1e-6)
    assert load_trace(write(tmp_path, "az2.csv", "ContextTokens,GeneratedTokens\n5,7\n")) == ([TraceRequest(0.0, 5, 7)], False)
    with pytest.raises(ValueError, match=r"line 2: .*TIMESTAMP a date and time .*got yesterday,5,7"):
        load_trace(write(tmp_path, "az3.csv", head + "yesterday,5,7\n"))
    with pytest.raises(ValueError, match="line 3: no value for GeneratedTokens; every row needs "
                                         "TIMESTAMP,ContextTokens,GeneratedTokens"):
        load_trace(write(tmp_path, "az4.csv", head + "2023-11-16 18:15:45,5,7\n2023-11-16 18:15:46,5\n"))
    for big in ("1" + "0" * 400, str(2 ** 63), str((1 << 24) + 1)):       # hung or overflowed the simulator
        with pytest.raises(ValueError, match=r"line 2: prompt and output lengths must be in \[1, 16777216\]"):
            load_trace(write(tmp_path, "big.csv", head + f"2023-11-16 18:15:45,{big},7\n"))
    # both namings in one file: ours win, Azure's columns are ignored as any other column
    both = "arrived_at,num_prefill_tokens,num_decode_tokens,ContextTokens,GeneratedTokens\n0,5,7,1,1\n"
    assert load_trace(write(tmp_path, "both.csv", both)) == ([TraceRequest(0.0, 5, 7)], True)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00garbage", HEAD.encode() + b"0,1,1\n0,\"" + b"1" * 200_000 + b"\",1\n"],
                         ids=["binary", "a field over csv's limit"])
def test_a_file_that_is_not_a_text_csv_is_a_value_error_naming_it(tmp_path, data):
    """A binary file gave the codec's message without the file; a field over csv's size limit
    raised _csv.Error, a traceback."""
    path = tmp_path / "bin.csv"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"trace {path} line .*not a CSV of UTF-8 text"):
        load_trace(str(path))


def test_capacity_without_a_budget_is_the_documented_formula(trace):
    reqs, _ = load_trace(trace)
    held_each = np.asarray([r.prompt_tokens + r.output_tokens / 2 for r in reqs])
    batch = min(16, int(20000 // held_each.mean()))
    longest = int(np.ceil(np.quantile(held_each, batch / (batch + 1))))
    per_token = OPT.decode_launch_time(batch, int(batch * held_each.mean()), longest) / batch
    want = 1 / np.mean([OPT.prefill_time(r.prompt_tokens) + r.output_tokens * per_token for r in reqs])
    assert capacity_rps(reqs, OPT, 16, 20000) == capacity_rps(reqs, OPT, 16, 20000, None) == float(want)


def test_a_small_token_budget_lowers_the_capacity(trace):
    reqs, _ = load_trace(trace)
    caps = [capacity_rps(reqs, OPT, 16, 0, b) for b in (4096, 256, 64, 1)]
    assert caps == sorted(caps, reverse=True) and caps[-1] < caps[0] / 10
    assert caps[0] == pytest.approx(capacity_rps(reqs, OPT, 16, 0), rel=0.02)    # no chunking: ~ one launch
    flat = CostModel("flat", (1, 4096), (0.01, 0.2), (1, 16), (0.01, 0.02))   # no context term, no overhead
    assert capacity_rps(reqs, flat, 16, 0, 4096) == pytest.approx(capacity_rps(reqs, flat, 16, 0))
    with pytest.raises(ValueError, match="budget"):
        capacity_rps(reqs, OPT, 16, 0, 0)


def test_simulate_load_is_a_fraction_of_the_capacity_within_its_token_budget(trace, tmp_path):
    out = tmp_path / "o.json"
    assert main(["simulate", "--trace", trace, "--num-requests", "10", "--load", "0.5", "--policy", "fcfs",
                 "--max-num-batched-tokens", "64", "--json", str(out)]) == 0
    reqs, _ = load_trace(trace, 10)
    blocks = 59337 // 16           # opt-13b-a100's KV pool in 16-token blocks
    cap = capacity_rps(reqs, OPT, 16, (blocks - 1) * 16, 64)
    assert json.loads(out.read_text())["fcfs"]["offered_rps"] == pytest.approx(0.5 * cap)


@pytest.mark.parametrize("args,msg", [
    (["--rate", "nan"], "finite"), (["--load", "nan"], "finite"), (["--rate", "inf"], "finite"),
    (["--load", "inf"], "finite"), (["--rate", "1", "--arrival", "gamma", "--cv", "0"], "--cv"),
    (["--rate", "1", "--arrival", "gamma", "--cv", "-1"], "--cv"),
    (["--rate", "1", "--arrival", "gamma", "--cv", "1e-300"], "--cv"),       # ZeroDivisionError before
    (["--load", "0.5", "--arrival", "gamma", "--cv", "1e300"], "--cv"),      # OverflowError before
    (["--rate", "1", "--cv", "2"], "--cv 2 shapes gamma arrivals; add --arrival gamma"),   # ignored before
    (["--rate", "1", "--jobs", "-3"], "--jobs must be >= 1"),                 # accepted before
    (["--rate", "1", "--kv-capacity-tokens", "100"], "--kv-capacity-tokens"),
    (["--rate", "1", "--num-requests", "0"], "--num-requests must be >= 1"),   # "the trace has no requests" before
    (["--rate", "1", "--json", "/"], "--json /: a directory")])               # a traceback after the run before
def test_simulate_rejects_bad_input_with_an_error_line(trace, args, msg, capsys):
    assert main(["simulate", "--trace", trace, "--num-requests", "5", "--policy", "fcfs", *args]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and msg in err and "Traceback" not in err


def test_simulate_warns_that_shared_prefix_flags_need_prefix_caching(trace, capsys):
    assert main(["simulate", "--trace", trace, "--num-requests", "5", "--policy", "fcfs", "--rate", "1",
                 "--shared-prefix-tokens", "64"]) == 0
    assert "warning: --shared-prefix-tokens and --prefix-groups" in capsys.readouterr().err
    assert main(["simulate", "--trace", trace, "--num-requests", "5", "--policy", "fcfs", "--rate", "1",
                 "--shared-prefix-tokens", "64", "--enable-prefix-caching"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_simulate_warns_of_a_host_pool_that_changes_nothing_and_refuses_a_trace_too_long(trace, tmp_path, capsys):
    """recompute with a host pool gave byte-identical results without a word, and so did a host
    pool smaller than a block; a trace whose arrivals span 1e15 s had requests finish the
    instant they came (its milliseconds lost to rounding), as --rate's check_rates guards."""
    base = ["simulate", "--trace", trace, "--num-requests", "5", "--policy", "fcfs", "--rate", "1"]
    assert main([*base, "--swap-policy", "recompute", "--host-kv-capacity-tokens", "50000"]) == 0
    assert "--host-kv-capacity-tokens changes nothing" in capsys.readouterr().err
    assert main([*base, "--host-kv-capacity-tokens", "5"]) == 0
    assert "holds no block of 16 tokens" in capsys.readouterr().err
    far = tmp_path / "far.csv"
    save_trace(str(far), [TraceRequest(0.0, 10, 5), TraceRequest(1e15, 10, 5)])
    assert main(["simulate", "--trace", str(far), "--policy", "fcfs"]) == 2
    assert "its arrivals span 1e+15 s" in capsys.readouterr().err


def test_simulate_saves_each_request_and_its_figures_follow_from_them(trace, tmp_path, capsys):
    """--save-requests (none until 2026-12-07; vLLM's bench has --save-detailed): a row per
    request per policy and rate, from which the printed figures are recomputed."""
    import csv
    import json

    out, js = tmp_path / "reqs.csv", tmp_path / "out.json"
    assert main(["simulate", "--trace", trace, "--num-requests", "6", "--policy", "fcfs", "--policy", "srpt",
                 "--rate", "1", "3", "--save-requests", str(out), "--json", str(js)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 * 2 * 6 and "records" not in js.read_text()
    for m in json.load(open(js))["srpt"]:
        mine = [r for r in rows if r["policy"] == "srpt" and float(r["rate"]) == m["rate"]]
        jct = [float(r["finish_s"]) - float(r["arrival_s"]) for r in mine]
        assert sum(jct) / len(jct) == pytest.approx(m["mean_jct"])
        assert sum(j / int(r["output_tokens"]) for j, r in zip(jct, mine)) / len(mine) == \
            pytest.approx(m["mean_latency_per_token"])


@pytest.mark.parametrize("cv", [1e-300, 1e-155, 1e155, 1e300, 0.0, float("nan")])
def test_gamma_arrivals_refuse_a_cv_whose_shape_is_not_a_finite_positive_number(cv):
    """1/cv**2 divided by zero (1e-300) or overflowed (1e300): a ZeroDivisionError or an
    OverflowError out of with_arrivals instead of its ValueError; 1e-155 gave an infinite shape."""
    reqs = [TraceRequest(0.0, 10, 5)] * 3
    with pytest.raises(ValueError, match="--cv must be a finite number > 0 whose gamma shape"):
        with_arrivals(reqs, 1.0, "gamma", cv)
    assert gamma_shape(1e-154) == pytest.approx(1e308) and gamma_shape(1e154) == pytest.approx(1e-308)
    assert len(with_arrivals(reqs, 1.0, "gamma", 1e154)) == 3
    with pytest.raises(ValueError, match="gap scale"):      # a finite shape, but rate * shape overflows
        with_arrivals(reqs, 1e300, "gamma", 1e-150)


@pytest.mark.parametrize("name,says", [("out.txt", "matplotlib writes no .txt files"),
                                       ("out", "no extension")])
def test_simulate_refuses_a_plot_format_matplotlib_does_not_write_before_the_run(trace, tmp_path, name, says,
                                                                                 capsys):
    """--plot out.txt ran the whole simulation, then died in savefig (ValueError: Format 'txt'
    is not supported); a name without an extension was written with .png added."""
    path = str(tmp_path / "new" / name)
    assert main(["simulate", "--trace", trace, "--rate", "1", "--policy", "fcfs", "--plot", path]) == 2
    err = capsys.readouterr().err
    assert f"error: --plot {path}: {says}; end the name with the format to write" in err and ".svg" in err
    assert "capacity" not in err and not (tmp_path / "new").exists()     # refused before anything ran or was made
    for ok in ("a.png", "a.PDF", "a.svg"):
        check_plot(str(tmp_path / ok))


def test_a_trace_that_arrives_at_one_instant_is_offered_all_at_once(tmp_path, capsys):
    path = write(tmp_path, "burst.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n0,20,5\n")
    assert main(["simulate", "--trace", path, "--policy", "fcfs"]) == 0
    err = capsys.readouterr().err
    assert "offered all at once, served" in err and "offered 0.000" not in err


def test_simulate_rejects_a_short_row(tmp_path, capsys):
    path = write(tmp_path, "short.csv", "num_prefill_tokens,num_decode_tokens\n10,5\n20\n")
    assert main(["simulate", "--trace", path, "--rate", "1"]) == 2
    assert f"error: trace {path} line 3" in capsys.readouterr().err


@pytest.fixture
def no_launch(monkeypatch):
    """bench_cmd with LaunchedServer and the workload build (and the dataset's look at the
    server before it) replaced by ones that fail loudly: a test that reaches either has got
    past the checks."""
    class Reached(Exception):
        pass

    def reached(*args, **kw):
        raise Reached
    monkeypatch.setattr(bench_cmd, "LaunchedServer", reached)
    monkeypatch.setattr(bench_cmd, "build_workload", reached)
    monkeypatch.setattr(bench_cmd, "workload_builder", reached)
    return Reached


@pytest.mark.parametrize("rows,args,msg", [
    ("num_prefill_tokens,num_decode_tokens\n10,5\n20,6\n", ["--arrivals", "trace"], "no arrival times (arrived_at or TIMESTAMP)"),
    ("num_prefill_tokens,num_decode_tokens\n10,5\n20,6\n", ["--num-requests", "3"], "fewer than the 3"),
    (HEAD + "0,10,5\n1,20,6\n", ["--arrivals", "trace", "--num-requests", "3"], "fewer than the 3"),
    ("num_prefill_tokens,num_decode_tokens\n10,5\n20\n", ["--num-requests", "1"], "line 3")])
def test_bench_checks_the_workload_before_it_starts_a_server(tmp_path, no_launch, rows, args, msg, capsys):
    path = write(tmp_path, "t.csv", rows)
    assert main(["bench", "--trace", path, "--scheduler", "fcfs", *args]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and msg in err
    good = write(tmp_path, "good.csv", HEAD + "1,10,5\n0,20,6\n")
    for arrivals in ("trace", "poisson"):          # a good workload goes on to start the server
        with pytest.raises(no_launch):
            main(["bench", "--trace", good, "--scheduler", "fcfs", "--num-requests", "2", "--arrivals", arrivals])


@pytest.mark.parametrize("args,msg", [
    (["--max-model-len", "0"], "error: max_model_len must be a positive integer, got 0"),
    (["--model", "/nonexistent"], "error: '/nonexistent' is not a model directory: no config.json in it"),
    (["--cost-model", "/nonexistent.json"], "error: no cost model '/nonexistent.json'"),
    # these two reached a server, which exited 1 with them
    (["--num-device-blocks", "1"], "error: the device KV pool needs at least 2 blocks (one is the null block)"),
    (["--decode-batch-buckets", "1,2"], "error: decode_batch_buckets must reach 32, got largest 2")])
def test_bench_checks_the_engine_options_as_generate_does_before_it_starts_a_server(trace, no_launch, args, msg,
                                                                                   capsys):
    """A server started with them exited, and the traceback said `the server exited with 1; see LOG`
    (the message only in the log)."""
    assert main(["bench", "--trace", trace, "--scheduler", "fcfs", "--num-requests", "2", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and "starting a server" not in err


def test_a_server_that_exits_before_it_is_ready_is_one_error_line_with_its_log_s_last_error(
        trace, tmp_path, monkeypatch, capsys):
    """A RuntimeError traceback saying only `the server exited with 1; see LOG` before."""
    log = tmp_path / "server.log"
    said = ("print('WARNING starting'); print('error: the engine did not start: RuntimeError: no device'); "
            "print('shutting down'); raise SystemExit(1)")

    class Dying(bench_server.LaunchedServer):
        def __init__(self, scheduler: str, engine_argv: list[str]) -> None:
            self.scheduler, self.port, self.url, self.log = scheduler, 9, "http://127.0.0.1:9", open(log, "w")
            self.proc = subprocess.Popen([sys.executable, "-c", said], stdout=self.log, stderr=subprocess.STDOUT)
            self.proc.wait()
    monkeypatch.setattr(bench_cmd, "LaunchedServer", Dying)
    assert main(["bench", "--trace", trace, "--scheduler", "fcfs", "--num-requests", "2"]) == 1
    err = capsys.readouterr().err
    assert (f"error: the fcfs server exited with 1 before it was ready: the engine did not start: RuntimeError: "
            f"no device (log: {log})") in err and "Traceback" not in err
    assert log.exists()                                     # kept for its reader


def test_bench_url_errors_clearly_and_warns_of_launch_only_flags(trace, no_launch, monkeypatch, capsys):
    url = "http://127.0.0.1:9"                     # nothing listens on port 9 (discard)
    assert main(["bench", "--trace", trace, "--num-requests", "4", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "error: no server answers at http://127.0.0.1:9" in err and "Traceback" not in err
    monkeypatch.setattr(bench_cmd, "server_health", lambda url: {"scheduler": "skip-join-mlfq"})
    with pytest.raises(no_launch):
        main(["bench", "--trace", trace, "--num-requests", "4", "--url", "http://x:1", "--scheduler", "fcfs",
              "--max-num-seqs", "4"])
    err = capsys.readouterr().err
    assert "warning: --max-num-seqs --scheduler configure a server that bench starts" in err
    with pytest.raises(no_launch):
        main(["bench", "--trace", trace, "--num-requests", "4", "--url", "http://x:1"])
    assert "warning" not in capsys.readouterr().err


def _fake_server(routes: dict):
    """(url, server) of an HTTP server on a free port answering {(method, path): (status,
    body)}, read at each request (a test may change them); shut it down when done."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            status, body = routes[self.command, self.path]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}", srv


def test_bench_url_that_answers_health_with_something_else_is_one_error_line(tmp_path, capsys):
    """A /health that is not a fastserve-jax server's JSON object (a list, text) was an
    AttributeError or a bare JSON message; a server still warming up (503) says so."""
    from fastserve_jax.serve.bench_server import server_health

    bodies = {("GET", "/health"): (200, b"[1, 2]")}
    url, srv = _fake_server(bodies)
    try:
        with pytest.raises(ValueError, match=r"/health answered status 200 with b'\[1, 2\]', not a fastserve"):
            server_health(url)
        bodies["GET", "/health"] = (200, b"hello")
        assert main(["bench", "--url", url, "--num-requests", "2"]) == 2
        assert "not a fastserve-jax server's JSON object" in capsys.readouterr().err
        bodies["GET", "/health"] = (503, b'{"status": "warming up"}')
        with pytest.raises(ValueError, match=r"status 503 \(warming up\), not 200; wait until it is ready"):
            server_health(url)
        bodies["GET", "/health"] = (200, b"")
        assert server_health(url) == {}                # vLLM's: ready, with an empty body
    finally:
        srv.shutdown()


def test_bench_says_why_its_first_request_failed_and_keeps_no_key_or_nan_in_its_json(trace, tmp_path, capsys):
    """A wrong --api-key against counting prompts said only "no request completed ... is the
    server healthy?"; the results JSON held the key in the clear and NaN, which is not JSON."""
    from fastserve_jax.serve.bench_report import write_json

    url, srv = _fake_server({("GET", "/health"): (200, b""), ("POST", "/v1/completions"): (
        401, b'{"error": {"message": "invalid API key", "type": "authentication_error"}}')})
    try:
        assert main(["bench", "--trace", trace, "--url", url, "--dataset", "counting", "--num-requests", "2",
                     "--api-key", "wrong"]) == 1
        err = capsys.readouterr().err
        assert "the first request failed" in err and "give the server's key with --api-key" in err
    finally:
        srv.shutdown()
    assert main(["bench", "--trace", trace, "--scheduler", "fcfs", "--scheduler", "fcfs"]) == 2
    assert "--scheduler fcfs is given twice" in capsys.readouterr().err
    a = bench_cmd.argparse.Namespace(dataset="random", arrivals="poisson", num_requests=1, output_dist="trace",
                                     output_scale=1.0, trace=trace, api_key="sekret")
    assert write_json(str(tmp_path / "r.json"), a, {"fcfs": {"4.0": {"tpot_mean": float("nan")}}}, {})
    text = (tmp_path / "r.json").read_text()
    assert "sekret" not in text and "NaN" not in text and json.loads(text)["results"]["fcfs"]["4.0"] == {"tpot_mean": None}
    # a full disk (/dev/full): one error line after the run, not a traceback (until 2026-12-07)
    capsys.readouterr()
    assert not write_json("/dev/full", a, {}, {}) and pathlib.Path("/dev/full").exists()
    assert "error: --json /dev/full could not be written (" in capsys.readouterr().err


def test_simulate_on_a_full_disk_says_so_after_the_run_and_exits_1(trace, capsys):
    assert main(["simulate", "--trace", trace, "--num-requests", "20", "--policy", "fcfs", "--json", "/dev/full"]) == 1
    err = capsys.readouterr().err
    assert "error: --json /dev/full could not be written (" in err and "fcfs" in err


@pytest.mark.parametrize("url", ["127.0.0.1:9", "localhost:9", "notaurl", "https://127.0.0.1:9",
                                 "http://127.0.0.1:abc", "http://:9", ""])
def test_bench_refuses_a_url_it_cannot_reach_as_written(trace, no_launch, url, capsys):
    """host:port without http:// (and any word) went to 127.0.0.1:80, whatever listens there;
    https:// spoke plain HTTP to a TLS port; a bad port gave urllib's message without the flag;
    an empty one (an unset $URL) started no server and failed with a traceback."""
    assert main(["bench", "--trace", trace, "--num-requests", "4", "--url", url]) == 2
    err = capsys.readouterr().err
    assert f"error: --url {url or repr(url)}: not an http://HOST[:PORT] URL" in err and "Traceback" not in err


def test_output_files_that_cannot_be_written_are_refused_before_the_run(trace, no_launch, capsys):
    """Once a traceback after the whole run (simulate, bench), its results lost; a folder
    that does not exist yet is made."""
    under_a_file = f"{trace}/out.png"
    assert main(["simulate", "--trace", trace, "--rate", "1", "--plot", under_a_file]) == 2
    assert f"error: --plot {under_a_file}: cannot make its folder" in capsys.readouterr().err
    assert main(["bench", "--trace", trace, "--scheduler", "fcfs", "--num-requests", "2", "--json", "/"]) == 2
    assert "error: --json /: a directory" in capsys.readouterr().err
    with pytest.raises(no_launch):
        main(["bench", "--trace", trace, "--scheduler", "fcfs", "--num-requests", "2", "--json",
              f"{trace}.d/new/out.json"])


def test_an_output_file_root_cannot_write_is_refused_before_the_run_and_a_new_one_is_not_left(trace, tmp_path, capsys):
    """os.access let root through to /proc (or a read-only mount), and the run ended in a
    traceback; the check opens the file, and removes it again if it made it."""
    assert main(["simulate", "--trace", trace, "--rate", "1", "--json", "/proc/out.json"]) == 2
    assert "error: --json /proc/out.json: cannot be written" in capsys.readouterr().err
    from fastserve_jax.serve.simulate_cmd import check_output

    check_output(str(tmp_path / "new.json"), "--json")
    assert not (tmp_path / "new.json").exists()


@pytest.mark.parametrize("args,says", [
    (["--rate", "1e-15"], "--rate: an arrival rate of 1e-15 requests/s is outside 1e-06-1e+09"),
    (["--rate", "1e300"], "an arrival rate of 1e+300 requests/s is outside"),
    (["--load", "1e-12"], "error: --load: an arrival rate of"),
    (["--rate", "1", "2", "1"], "error: --rate 1.0 is given twice"),
    (["--rate", "2", "--rate", "1", "2"], "error: --rate 2.0 is given twice"),     # the last flag was all it read
    (["--rate", "1", "--policy", "fcfs", "--policy", "fcfs"], "error: --policy fcfs is given twice"),
    (["--rate", "1", "--num-requests", "100000"], "requests, fewer than the 100000 asked; lower --num-requests")])
def test_simulate_refuses_rates_without_precision_and_repeats(trace, args, says, capsys):
    """1e-15 requests/s reported a 0.4 ms latency per token (arrival times past 1e15 s keep no
    step's digits); a policy given twice ran twice and the JSON kept one; more requests than
    the trace holds ran the trace (bench refuses them)."""
    assert main(["simulate", "--trace", trace, *args]) == 2
    assert says in capsys.readouterr().err


def test_bench_refuses_a_rate_it_would_never_send_at(trace, no_launch, capsys):
    """1e-300 requests/s: the first request's arrival never came."""
    assert main(["bench", "--trace", trace, "--num-requests", "2", "--rate", "1e-300"]) == 2
    assert "error: --rate: an arrival rate of 1e-300 requests/s is outside" in capsys.readouterr().err


def test_bench_refuses_a_rate_given_twice(trace, no_launch, capsys):
    """The table printed both runs at 4 req/s, the JSON (one result per rate) and the sweep's
    summary kept only the second."""
    assert main(["bench", "--trace", trace, "--num-requests", "2", "--rate", "4", "--rate", "2", "--rate", "4.0"]) == 2
    assert "error: --rate 4.0 is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,flag", [("simulate", "--seed"), ("bench", "--workload-seed")])
def test_a_negative_seed_is_refused_by_its_flag(trace, cmd, flag, capsys):
    """numpy's own 'error: expected non-negative integer' came without the flag that gave it."""
    argv = (["simulate", "--trace", trace, "--rate", "1"] if cmd == "simulate" else
            ["bench", "--trace", trace, "--url", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit) as e:
        main(argv + [flag, "-1"])
    assert e.value.code == 2
    assert f"argument {flag}: must be an integer >= 0, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["nan", "0", "-1"])
def test_bench_refuses_an_output_scale_that_is_not_positive(trace, no_launch, scale, capsys):
    """NaN failed with a traceback once a server had started; 0 and negatives turned every
    answer into 2 tokens without a word."""
    assert main(["bench", "--trace", trace, "--scheduler", "fcfs", "--num-requests", "2", "--output-scale", scale]) == 2
    assert "error: --output-scale must be a finite number > 0" in capsys.readouterr().err


def test_bench_hands_its_servers_absolute_paths(tmp_path, monkeypatch):
    """The servers bench starts run in the repository's root (bench_server.ROOT): a relative
    --model, --tokenizer or --cost-model that exists here goes to them absolute (it passed the
    check here and was not found there before); a shipped cost model's name stays a name."""
    from fastserve_jax.serve.engine_args import engine_argv, parse_engine_args

    (tmp_path / "m").mkdir()
    (tmp_path / "cost.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    argv = engine_argv(parse_engine_args(["--model", "m", "--tokenizer", "m", "--cost-model", "cost.json"]))
    for flag, name in (("--model", "m"), ("--tokenizer", "m"), ("--cost-model", "cost.json")):
        assert argv[argv.index(flag) + 1] == str(tmp_path / name)
    argv = engine_argv(parse_engine_args(["--cost-model", "opt-13b-a100"]))
    assert argv[argv.index("--cost-model") + 1] == "opt-13b-a100"
