"""The OpenAI-compatible server on loopback with the demo model: the official `openai`
client for completions and chat (streaming and not), raw HTTP for the error cases,
disconnects, the admission bound, an engine fault, and a bounded load test (-m slow)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from fastserve_jax.models import demo_task
from fastserve_jax.models.loader import cache_root
from fastserve_jax.serve import bench_client
from fastserve_jax.serve.app import ServerConfig
from server_harness import (LiveServer, fail_next_step, fail_three_collections, fail_three_steps, load_pairs,
                            lose_the_cache_in_next_step)

openai = pytest.importorskip("openai")

MAX_PENDING = 48


@pytest.fixture(scope="module")
def live():
    # The server must start on a provisional cost model (the test of its replacement below), and
    # the test must know it did. Found failing in whole-suite runs, passing alone; two ways, not
    # told apart: a full profile that another module's server of the same engine config left in
    # the session's cache is loaded instead, or, with the session's compile cache warm, the
    # background warm-up ends and the idle engine profiles before the flag is read after /health
    if cache_root() is not None:
        shutil.rmtree(os.path.join(cache_root(), "cost_models"), ignore_errors=True)
    refined = _Seen("cost model profiled now that every shape is compiled")
    serve_log = logging.getLogger("fastserve_jax.serve")
    level = serve_log.level
    serve_log.addHandler(refined)
    serve_log.setLevel(min(level or logging.INFO, logging.INFO))        # its info records reach the handler
    try:
        srv = LiveServer(ServerConfig(model_name="demo", max_pending=MAX_PENDING, max_body_bytes=64 << 10)).start()
        srv.started_provisional = srv.state.engine.engine.profile_provisional or refined.seen
        srv.refined = refined
        yield srv
        srv.stop()
    finally:
        serve_log.removeHandler(refined)
        serve_log.setLevel(level)


class _Seen(logging.Handler):
    """Whether a record whose message starts with `text` was logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text, self.seen = text, False

    def emit(self, record: logging.LogRecord) -> None:
        self.seen = self.seen or record.getMessage().startswith(self.text)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def _counting(a: int, b: int, **kw) -> dict:
    return dict(prompt=demo_task.make_prompt(a, b), max_tokens=b - a + 2, temperature=0, **kw)


def test_health_models_metrics(live, client):
    status, _, body = live.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["demo"]
    m = live.metrics()
    assert m[("fastserve_server_ready", ())] == 1.0
    for name in ("fastserve_queue_length", "fastserve_requests", "fastserve_kv_blocks_total",
                 "fastserve_time_to_first_token_seconds_count", "fastserve_time_per_output_token_seconds_count",
                 "fastserve_e2e_request_latency_seconds_count", "fastserve_prompt_tokens_total",
                 "fastserve_generation_tokens_total", "fastserve_swap_blocks_total", "fastserve_swap_bytes_total",
                 "fastserve_swap_stall_seconds_total", "fastserve_recomputations_total",
                 "fastserve_cost_model_provisional", "fastserve_iteration_phase_seconds_total",
                 "fastserve_swap_link_bytes_per_second"):
        assert any(k[0] == name for k in m), f"{name} missing from /metrics"
    assert m[("fastserve_queue_length", (("level", "1"),))] == 0        # skip-join MLFQ: several levels
    assert m[("fastserve_kv_blocks_total", (("pool", "device"),))] > 0
    assert m[("fastserve_swap_link_bytes_per_second", (("direction", "in"),))] > 0     # proactive: measured
    phases = {dict(k[1])["phase"] for k in m if k[0] == "fastserve_iteration_phase_seconds_total"}
    assert phases == {"schedule", "assemble", "device", "postprocess"}


def test_model_retrieval_sagemaker_ping_and_invocations(live, client):
    """OpenAI's GET /v1/models/{model} (the SDK's models.retrieve), and SageMaker's /ping and
    /invocations as vLLM serves them: a body with messages is a chat, one with prompt a completion."""
    assert client.models.retrieve("demo").id == "demo"
    status, _, body = live.get("/v1/models/other/name")
    assert status == 404 and "'other/name' does not exist" in json.loads(body)["error"]["message"]
    assert live.get("/ping")[0] == 200 and json.loads(live.get("/ping")[2])["status"] == "ok"
    status, _, out = live.post("/invocations", _counting(3, 9))
    assert status == 200 and out["object"] == "text_completion" and out["choices"][0]["text"] == " 3 4 5 6 7 8 9"
    status, _, out = live.post("/invocations", {"messages": [{"role": "user", "content": demo_task.make_prompt(3, 6)}],
                                                "max_tokens": 6, "temperature": 0})
    assert status == 200 and out["object"] == "chat.completion", out
    for bad in ({"max_tokens": 3}, {"prompt": "x", "messages": []}, {"prompt": None, "messages": None}):
        status, _, err = live.post("/invocations", bad)
        assert status == 400 and "'messages' (a chat completion) or 'prompt'" in err["error"]["message"]
    # null is left out here as in every field (a 400 before), and a body may start with a BOM (Notepad's)
    status, _, out = live.post("/invocations", dict(_counting(3, 9), messages=None, suffix=None))
    assert status == 200 and out["choices"][0]["text"] == " 3 4 5 6 7 8 9"
    status, _, out = live.post("/v1/completions", b"\xef\xbb\xbf" + json.dumps(_counting(3, 5)).encode())
    assert status == 200 and out["choices"][0]["text"] == " 3 4 5"
    # and in UTF-16 or UTF-32, which vLLM reads as json.loads(bytes) does (a 400 until 2026-12-07)
    for encoding in ("utf-16", "utf-16-le", "utf-32-be"):
        status, _, out = live.post("/v1/completions", json.dumps(_counting(3, 5)).encode(encoding))
        assert status == 200 and out["choices"][0]["text"] == " 3 4 5", (encoding, out)
    status, _, err = live.post("/v1/completions", b"{\"prompt\": \"\xed\xa0\x80\"}")     # an encoded surrogate
    assert status == 400 and "not valid UTF-8" in err["error"]["message"]
    # a chat body counted as sent to the chat endpoint (tools: [] was a 400 here only)
    chat = {"messages": [{"role": "user", "content": "hi"}], "tools": [], "tool_choice": "none", "prompt": None}
    status, _, out = live.post("/tokenize", chat)
    assert status == 200 and out["count"] > 0, out
    status, _, err = live.post("/tokenize", dict(chat, tools=[{"type": "function"}]))
    assert status == 400 and "tool" in err["error"]["message"]


def test_vllm_named_series_match_ours(live):
    """Dashboards and autoscalers written for vLLM read vllm:* series labelled model_name and
    engine (V1's labels; until 2026-12-07 model_name alone): the same gauges, counters and
    histograms as ours (waiting counts paused and swapped requests too, as V1's)."""
    assert live.post("/v1/completions", _counting(3, 9))[0] == 200
    live.wait_idle()
    m = live.metrics()
    model = (("engine", "0"), ("model_name", "demo"))
    ours = {k[0]: v for k, v in m.items() if not k[1]}

    def states(*names):
        return sum(m[("fastserve_requests", (("state", n),))] for n in names)
    assert m[("vllm:num_requests_running", model)] == states("running")
    assert m[("vllm:num_requests_waiting", model)] == states("waiting", "paused", "swapped")
    assert m[("vllm:num_requests_swapped", model)] == states("swapped")
    assert m[("vllm:kv_cache_usage_perc", model)] == m[("vllm:gpu_cache_usage_perc", model)] == \
        m[("fastserve_kv_usage", (("pool", "device"),))]
    assert m[("vllm:cpu_cache_usage_perc", model)] == m[("fastserve_kv_usage", (("pool", "host"),))]
    for name in ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "time_per_output_token_seconds_sum", "e2e_request_latency_seconds_count"):
        theirs = "vllm:request_" + name if name.startswith("time_per") else "vllm:" + name    # per request, as ours
        assert m[(theirs, model)] == ours[f"fastserve_{name}"] and ours[f"fastserve_{name}"] > 0, name
    for reason in ("stop", "length", "error"):      # abort: test_requests_are_counted_by_finish_reason
        assert m[("vllm:request_success_total", (model[0], ("finished_reason", reason), model[1]))] == \
            m[("fastserve_request_success_total", (("finished_reason", reason),))]
    # vLLM's name of the inter-token latency until 0.11 (its example dashboard's "Time Per Output
    # Token Latency" panel reads it), not exported until 2026-12-07
    for part in ("count", "sum"):
        assert m[(f"vllm:time_per_output_token_seconds_{part}", model)] == \
            m[(f"vllm:inter_token_latency_seconds_{part}", model)] > 0


def test_vllms_per_request_histograms_split_each_finished_request(live):
    """vLLM's queue, prefill, decode and inference times and token counts per request (added
    2026-12-07; dashboards built on them were empty), and its TPOT, observed for a one-token
    answer too (as 0; until then left out, so its count was below e2e's)."""
    model = (("engine", "0"), ("model_name", "demo"))
    parts = ("queue_time", "prefill_time", "decode_time", "inference_time")
    names = [f"vllm:request_{p}_seconds_{s}" for p in parts for s in ("count", "sum")] + [
        f"vllm:request_{n}_tokens_{s}" for n in ("prompt", "generation") for s in ("count", "sum")] + [
        f"vllm:{n}_seconds_{s}" for n in ("time_to_first_token", "e2e_request_latency",
                                          "request_time_per_output_token") for s in ("count", "sum")]
    live.wait_idle()
    before = live.metrics()
    outs = [live.post("/v1/completions", dict(_counting(3, 9), max_tokens=k))[2] for k in (1, 20)]
    live.wait_idle()
    m = live.metrics()
    d = {n: m[(n, model)] - before[(n, model)] for n in names}
    assert all(d[n] == 2 for n in names if n.endswith("_count")), d
    assert d["vllm:request_prompt_tokens_sum"] == sum(o["usage"]["prompt_tokens"] for o in outs)
    assert d["vllm:request_generation_tokens_sum"] == sum(o["usage"]["completion_tokens"] for o in outs)
    seconds = {p: d[f"vllm:request_{p}_seconds_sum"] for p in parts}
    assert seconds["queue_time"] + seconds["prefill_time"] < d["vllm:time_to_first_token_seconds_sum"]
    assert seconds["prefill_time"] + seconds["decode_time"] == pytest.approx(seconds["inference_time"])
    assert seconds["inference_time"] < d["vllm:e2e_request_latency_seconds_sum"]
    # the most tokens of a prompt's n choices, once per prompt (vLLM's): it was once per choice
    # until 2026-12-07; here two prompts of two choices each, one cut short by a stop string
    most = "vllm:request_max_num_generation_tokens"
    before = {s: live.metrics()[(f"{most}_{s}", model)] for s in ("count", "sum")}
    out = live.post("/v1/completions", dict(_counting(3, 9), prompt=[demo_task.make_prompt(3, 9),
                                                                   demo_task.make_prompt(4, 6)], n=2))[2]
    live.wait_idle()
    assert out["usage"]["completion_tokens"] == 2 * (8 + 4)
    m = live.metrics()
    assert m[(f"{most}_count", model)] - before["count"] == 2
    assert m[(f"{most}_sum", model)] - before["sum"] == 8 + 4     # " 3 ... 9" and EOS, " 4 5 6" and EOS


def test_vllms_dashboard_reads_its_buckets_inter_token_latency_and_http_series(live):
    """vLLM's dashboard reads its TPOT SLO as a bucket (le="0.1"), inter-token latency, the
    most tokens of a request and the instrumentator's HTTP series: each was empty here until
    2026-12-07 (found by a probe evaluating the dashboard's queries)."""
    model = (("engine", "0"), ("model_name", "demo"))

    def http(m, handler, status, method="POST"):
        return m.get(("http_requests_total", (("handler", handler), ("method", method), ("status", status))), 0)
    live.wait_idle()
    before = live.metrics()
    outs = [live.post("/v1/completions", dict(_counting(3, 9), max_tokens=k))[2] for k in (1, 20)]
    assert live.post("/v1/completions", dict(_counting(3, 9), model="other"))[0] == 404
    assert live.get("/health")[0] == 200 and live.get("/no/such/path")[0] == 404
    live.wait_idle()
    m = live.metrics()
    for name, le in (("request_time_per_output_token_seconds", "0.1"), ("time_to_first_token_seconds", "2560.0"),
                     ("e2e_request_latency_seconds", "7680.0"), ("inter_token_latency_seconds", "0.075")):
        assert (f"vllm:{name}_bucket", (model[0], ("le", le), model[1])) in m, name
    tokens = [o["usage"]["completion_tokens"] for o in outs]
    d = {n: m[(n, model)] - before.get((n, model), 0) for n in ("vllm:inter_token_latency_seconds_count",
                                                                "vllm:request_max_num_generation_tokens_sum")}
    assert d["vllm:inter_token_latency_seconds_count"] == sum(t - 1 for t in tokens)
    assert d["vllm:request_max_num_generation_tokens_sum"] == sum(tokens)
    assert http(m, "/v1/completions", "2xx") - http(before, "/v1/completions", "2xx") == 2
    assert http(m, "/v1/completions", "4xx") - http(before, "/v1/completions", "4xx") == 1
    assert http(m, "none", "4xx", "GET") - http(before, "none", "4xx", "GET") == 1
    assert not [k for k in m if k[0] == "http_requests_total" and ("handler", "/health") in k[1]]
    assert m[("http_request_duration_seconds_count", (("handler", "/v1/completions"), ("method", "POST")))] >= 3


def test_handoff_is_observed_once_per_finished_request_and_is_part_of_its_ttft(live):
    names = [f"fastserve_{n}_{s}" for n in ("request_handoff_seconds", "time_to_first_token_seconds",
                                            "e2e_request_latency_seconds") for s in ("count", "sum")]
    before = {n: live.metric(n) for n in names}
    # an open loop (bench_client) records when each request was due beside when it went out
    results = asyncio.run(bench_client.run_load(live.url, [_counting(a, a + 5, stream=True) for a in (10, 20)],
                                                arrivals=[0.0, 0.05]))
    assert all(r.ok for r in results) and results[1].due - results[0].due == pytest.approx(0.05)
    assert all(r.sent >= r.due for r in results)
    d = {n: live.metric(n) - before[n] for n in names}
    assert d["fastserve_request_handoff_seconds_count"] == d["fastserve_e2e_request_latency_seconds_count"] == 2
    # the handler's start to the engine's add_request comes before the first token
    assert 0 < d["fastserve_request_handoff_seconds_sum"] < d["fastserve_time_to_first_token_seconds_sum"]


def test_completions_non_streaming(live, client):
    pairs = [(3, 12), (250, 300), (0, 7)]
    out = client.completions.create(model="demo", prompt=[demo_task.make_prompt(a, b) for a, b in pairs],
                                    max_tokens=300, temperature=0, n=2)
    assert len(out.choices) == 6
    for c in out.choices:
        a, b = pairs[c.index // 2]
        assert demo_task.check_answer(a, b, c.text), (c.index, c.text)
        assert c.finish_reason == "stop"
    assert out.usage.completion_tokens == 2 * sum(demo_task.answer_num_tokens(a, b) for a, b in pairs)
    tokens = live.state.engine.engine.tokenizer.encode(demo_task.make_prompt(5, 40))
    ids = client.completions.create(model="demo", prompt=tokens, max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == len(tokens) and ids.choices[0].finish_reason == "length"
    assert ids.choices[0].text == " 5 6 7" and ids.choices[0].stop_reason is None


def test_completions_streaming_with_usage_and_stop(live, client):
    chunks = list(client.completions.create(model="demo", prompt=demo_task.make_prompt(40, 90), max_tokens=60,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert demo_task.check_answer(40, 90, text)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == demo_task.answer_num_tokens(40, 90)
    assert all(c.usage is None for c in chunks[:-1])
    # a stop string spanning two tokens: nothing past the cut is ever streamed
    stopped = list(client.completions.create(model="demo", prompt=demo_task.make_prompt(5, 40), max_tokens=50,
                                             temperature=0, stream=True, stop=["0 1"]))
    assert "".join(c.choices[0].text for c in stopped) == " 5 6 7 8 9 1"
    assert stopped[-1].choices[0].finish_reason == "stop" and stopped[-1].choices[0].stop_reason == "0 1"
    assert all(not hasattr(c.choices[0], "stop_reason") for c in stopped[:-1])     # on the last chunk only
    # vLLM's stop_reason: the stop string, the stop_token_ids token, None at EOS
    [seven] = live.state.engine.engine.tokenizer.encode(" 7", add_special_tokens=False)
    by_token = client.completions.create(model="demo", prompt=demo_task.make_prompt(5, 40), max_tokens=50,
                                         temperature=0, stop=["zz"], extra_body={"stop_token_ids": [seven]})
    assert by_token.choices[0].text == " 5 6" and by_token.choices[0].stop_reason == seven
    whole = client.completions.create(model="demo", prompt=demo_task.make_prompt(5, 40), max_tokens=50, temperature=0)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].stop_reason is None


def test_chat_streaming_and_not(client):
    msgs = [{"role": "user", "content": demo_task.make_prompt(17, 60)}]
    out = client.chat.completions.create(model="demo", messages=msgs, temperature=0, logprobs=True, top_logprobs=2)
    ch = out.choices[0]
    assert ch.message.role == "assistant" and demo_task.check_answer(17, 60, ch.message.content)
    assert len(ch.logprobs.content) == demo_task.answer_num_tokens(17, 60)
    assert ch.logprobs.content[0].token == " 17" and len(ch.logprobs.content[0].top_logprobs) == 2
    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_completion_tokens=100,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert demo_task.check_answer(17, 60, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_sampling_parameters_and_extensions(client):
    kw = dict(model="demo", prompt=demo_task.make_prompt(1, 30), max_tokens=12, temperature=0.9, top_p=0.9,
              seed=7, n=2, presence_penalty=0.5, frequency_penalty=0.3, user="tester",
              extra_body={"top_k": 5, "priority": 3})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]     # seeded: reproducible
    lp = client.completions.create(model="demo", prompt=demo_task.make_prompt(1, 3), max_tokens=5, temperature=0,
                                   logprobs=3).choices[0].logprobs
    assert lp.tokens[:3] == [" 1", " 2", " 3"] and len(lp.top_logprobs[0]) == 3 and lp.text_offset[:2] == [0, 2]


BAD = [
    (b"{bad json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"null", 400, "must be a JSON object, got null"),
    (b'{"prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b"[" * 60000, 400, "too deeply"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "NaN"),
    (b'{"prompt": 5}', 400, "'prompt' must be"),
    (b'{"prompt": []}', 400, "'prompt' must be"),
    (b'{"prompt": "x", "max_tokens": "10"}', 400, "'max_tokens' must be an integer"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "'max_tokens' must be in [1, inf]"),
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 1000 + b"}", 400, "and 10000000000000000000...(1001 characters) more were"),
    (b'{"prompt": "x", "temperature": true}', 400, "'temperature' must be a number"),
    (b'{"prompt": "x", "temperature": 3}', 400, "'temperature' must be in [0.0, 2.0]"),
    (b'{"prompt": "x", "top_p": 0}', 400, "'top_p' must be in (0.0, 1.0]"),
    (b'{"prompt": "x", "n": 0}', 400, "'n' must be in [1, 16]"),
    (b'{"prompt": "x", "stop": [1]}', 400, "'stop' must be"),
    (b'{"prompt": "x", "logprobs": 21}', 400, "'logprobs' is 21, more than this server allows: at most 20"),
    (b'{"prompt": "x", "frequency_penalty": 2.5}', 400, "'frequency_penalty' must be in [-2.0, 2.0]"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "only allowed with"),
    (b'{"prompt": "x", "best_of": 2}', 400, "unsupported value of 'best_of'"),
    (b'{"prompt": [99999]}', 400, "token ids must be in [0, 1270)"),
    (json.dumps({"prompt": "count " * 600}).encode(), 400, "max_model_len is 512"),
    (b'{"prompt": "count from 1 to 3:", "max_tokens": 600}', 400, "maximum context length is 512 tokens"),
    # was a 500: the message's prompt + max_tokens had more digits than str() writes
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 4300 + b"}", 400, "maximum context length is 512 tokens"),
    # past Python's 4,300 digits: the 400 was Python's advice to raise its limit, naming no field
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "'max_tokens' must be in [1, inf], got a number too"),
    (b'{"prompt": "x", "seed": -' + b"9" * 5000 + b"}", 400, "'seed' must be in"),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "does not exist"),
    (b'{"max_tokens": 3}', 400, "'prompt' is required"),
    # a lone UTF-16 surrogate escape: was a 500 from the tokenizer, or from writing the error naming it
    (b'{"prompt": "a\\ud800b"}', 400, "unpaired UTF-16 surrogate"),
    (b'{"prompt": ["x", "\\udfff"]}', 400, "unpaired UTF-16 surrogate"),
    (b'{"prompt": "x", "model": "\\ud83c"}', 400, "unpaired UTF-16 surrogate"),
    (b'{"prompt": "x", "\\ud800": 1}', 400, "unpaired UTF-16 surrogate"),
    # was a 500: int() refuses 4,300 digits or more
    (json.dumps({"prompt": "x", "logit_bias": {"1" * 5000: 1}}).encode(), 400, "past any vocabulary"),
]
BAD_CHAT = [
    (b'{"messages": "hi"}', 400, "'messages' must be a non-empty array"),
    (b'{"messages": [{"role": "", "content": "x"}]}', 400, "'role' string"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "only text parts"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400, 'needs "logprobs": true'),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9999}', 400,
     "lower max_completion_tokens to"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999}', 400, "lower max_tokens to"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": ' + b"9" * 4300 + b"}", 400, "context length"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', 400, "surrogate"),
]


BAD_TOKENIZE = [
    (b'{}', 400, "either 'prompt' (text) or 'messages'"),
    (b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', 400, "either 'prompt' (text) or"),
    (b'{"prompt": [1, 2]}', 400, "'prompt' must be a string"),
    (b'{"prompt": "x", "add_special_tokens": "yes"}', 400, "'add_special_tokens' must be true or false"),
    (b'{"prompt": "x", "add_generation_prompt": true}', 400, "unknown or unsupported field(s) ['add_generation_"),
    (b'{"prompt": "x", "model": "gpt-4"}', 404, "does not exist"),
    (b'{"messages": [{"role": "", "content": "x"}]}', 400, "'role' string"),
    (b'{"messages": [{"role": "user", "content": "x"}], "continue_final_message": true}', 400, "cannot both be true"),
    (b'{"prompt": "a\\ud800b"}', 400, "unpaired UTF-16 surrogate"),
]
BAD_DETOKENIZE = [
    (b'{}', 400, "'tokens' is required"),
    (b'{"tokens": "1 2"}', 400, "'tokens' must be an array of token ids"),
    (b'{"tokens": [1, true]}', 400, "'tokens' must be an array of token ids"),
    (b'{"tokens": [1, 1270]}', 400, "token ids in [0, 1270)"),
    (b'{"tokens": [-1]}', 400, "token ids in [0, 1270)"),
    (b'{"tokens": [1], "skip_special_tokens": true}', 400, "unknown or unsupported field(s)"),
]


@pytest.mark.parametrize("path,body,status,message", [("/v1/completions", *b) for b in BAD] +
                         [("/v1/chat/completions", *b) for b in BAD_CHAT] +
                         [("/tokenize", *b) for b in BAD_TOKENIZE] +
                         [("/detokenize", *b) for b in BAD_DETOKENIZE], ids=lambda v: str(v)[:40])
def test_bad_requests_get_openai_errors(live, path, body, status, message):
    got, _, err = live.post(path, body, {"Content-Type": "application/json"})
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and message in err["error"]["message"], err


def test_tokenize_detokenize_and_version_answer_as_vllms(live, client):
    """vLLM's /tokenize (a completion's `prompt`, or chat `messages` rendered as the chat endpoint
    renders them), /detokenize and /version, with its fields; a chat's token count is the
    prompt_tokens its chat completion reports."""
    tok = live.state.engine.engine.tokenizer
    prompt = demo_task.make_prompt(3, 12)
    limit = client.models.list().data[0].max_model_len
    status, _, out = live.post("/tokenize", {"prompt": prompt, "model": "demo"})
    assert status == 200 and out == {"tokens": tok.encode(prompt), "count": len(tok.encode(prompt)),
                                     "max_model_len": limit, "token_strs": None}
    status, _, bare = live.post("/tokenize", {"prompt": prompt, "add_special_tokens": False, "return_token_strs": True})
    ids = tok.encode(prompt, add_special_tokens=False)
    assert status == 200 and bare["tokens"] == ids and bare["token_strs"] == tok.convert_ids_to_tokens(ids)
    messages = [{"role": "user", "content": prompt}]
    status, _, chat = live.post("/tokenize", {"messages": messages})
    done = client.chat.completions.create(model="demo", messages=messages, max_tokens=1)
    assert status == 200 and chat["count"] == done.usage.prompt_tokens == len(chat["tokens"])
    status, _, plain = live.post("/tokenize", {"messages": messages, "add_special_tokens": False})
    assert status == 200 and plain["tokens"] == ids          # the demo's template writes the content alone
    status, _, text = live.post("/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and text == {"prompt": tok.decode(out["tokens"])} and text["prompt"].endswith(prompt)
    assert live.post("/detokenize", {"tokens": [float(t) for t in out["tokens"]]})[2] == text    # 5.0 is 5
    status, _, body = live.get("/version")
    assert status == 200 and isinstance(json.loads(body)["version"], str)


def test_an_escaped_surrogate_pair_is_one_character(live):
    status, _, out = live.post("/v1/completions", b'{"prompt": "\\ud83c\\udf89 1", "max_tokens": 1, "echo": true}')
    assert status == 200 and out["choices"][0]["text"].startswith("\U0001f389 1"), out


def test_a_top_k_past_int32_samples_with_every_token_and_faults_nothing(live):
    """top_k is any integer >= -1 (vLLM's); one of 2**31 or more overflowed the sampler's int32
    array in the engine step: a 500 counted as an engine fault, so three such requests left
    /health, and every later request, at 503."""
    faults = live.metric("fastserve_engine_faults_total")
    body = dict(prompt=demo_task.make_prompt(1, 30), max_tokens=8, temperature=0.8, seed=3)
    status, _, want = live.post("/v1/completions", body)
    assert status == 200, want
    for k in (2 ** 31, 10 ** 20):
        status, _, got = live.post("/v1/completions", dict(body, top_k=k))
        assert status == 200, got
        assert got["choices"][0]["text"] == want["choices"][0]["text"]   # k past the vocabulary: top-k off
    assert live.metric("fastserve_engine_faults_total") == faults and live.get("/health")[0] == 200


def test_huge_body_wrong_method_unknown_route(live):
    status, _, err = live.post("/v1/completions", b'{"prompt": "' + b"a" * (200 << 10) + b'"}')
    assert status == 413 and "larger than the server's limit of 65536 bytes" in err["error"]["message"]
    status, headers, body = live.get("/v1/completions")
    assert status == 405 and "error" in json.loads(body) and headers.get("allow") == "POST"
    status, _, body = live.get("/v2/nothing")
    assert status == 404 and "error" in json.loads(body)
    assert live.get("/health")[0] == 200


def test_an_empty_prompt_is_the_tokenizers_bos_as_in_vllm(live):
    """"" was a 400 though the demo tokenizer adds BOS: vLLM serves it (and refuses only a
    prompt of no tokens, as admission.py does)."""
    status, _, out = live.post("/v1/completions", {"prompt": "", "max_tokens": 2, "temperature": 0})
    assert status == 200 and out["usage"]["prompt_tokens"] == 1, out
    status, _, out = live.post("/v1/completions", {"prompt": ["", "count from 1 to 2:"], "max_tokens": 4,
                                                   "temperature": 0})
    assert status == 200 and out["choices"][1]["text"] == " 1 2", out
    status, _, err = live.post("/v1/completions", {"prompt": [], "max_tokens": 2})
    assert status == 400 and err["error"]["param"] == "prompt"


def test_a_content_length_far_past_the_limit_is_answered_at_once(live):
    """A Content-Length of 100 MB over a short body: the server waited for bytes that never
    came, and the client for its own timeout."""
    import socket

    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n{\"prompt\": \"x\"}")
        head = b""
        while b"limit" not in head and (chunk := s.recv(4096)):     # the status line and the body's message
            head += chunk
    assert head.startswith(b"HTTP/1.1 413") and b"(100000000 bytes) is larger than the server's limit" in head
    assert live.get("/health")[0] == 200


def test_a_client_gone_mid_upload_is_no_server_error(live, caplog):
    """A hang-up before the body's end was logged as an unexpected exception with a traceback
    (starlette's ClientDisconnect out of the body read)."""
    import socket

    uvicorn_log = logging.getLogger("uvicorn.error")      # uvicorn's loggers do not propagate to the root
    uvicorn_log.addHandler(caplog.handler)
    try:
        with socket.create_connection(("127.0.0.1", live.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\":")
            time.sleep(0.3)
        time.sleep(0.3)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert live.get("/health")[0] == 200


async def _open_streams(url: str, payloads: list[dict]):
    """Start streaming requests and read only their status lines (they stay admitted)."""
    opened = [await bench_client._open(url, "POST", "/v1/completions", json.dumps(p).encode(),
                                       {"Content-Type": "application/json"}) for p in payloads]
    return opened


def test_admission_queue_full_then_disconnects_free_everything(live, monkeypatch):
    """A request the full queue cannot take is refused before it is tokenized: it waited behind
    the prompts others had sent to the one preparing thread (15.5 s behind twelve 900 KB
    prompts in a probe, 2026-12-07) to learn it had no room."""
    from fastserve_jax.serve import app as app_mod

    real = app_mod.prepare

    async def scenario():
        hold = [_counting(0, 250, stream=True, n=16) for _ in range(MAX_PENDING // 16)]
        opened = await _open_streams(live.url, hold)
        assert [o[2] for o in opened] == [200] * len(hold)
        monkeypatch.setattr(app_mod, "prepare", lambda *a: pytest.fail("tokenized a request the full queue refuses"))
        status, headers, body = await bench_client.request(
            live.url, "POST", "/v1/completions", json.dumps(_counting(1, 2)).encode())
        monkeypatch.setattr(app_mod, "prepare", real)
        for _, writer, _, _ in opened:
            writer.close()
        return status, headers, json.loads(body)

    status, headers, err = asyncio.run(scenario())
    assert status == 503 and headers["retry-after"] == "1" and "admission queue is full" in err["error"]["message"]
    live.wait_idle(timeout=10)
    assert live.metric("fastserve_server_rejected_total", reason="queue_full") >= 1


def test_more_prompts_than_the_server_admits_are_refused_before_they_are_tokenized(live, monkeypatch):
    """Tokenizing 45,000 prompts held the one preparing thread, and every request behind it, for
    2.5 s before the count was checked."""
    from fastserve_jax.serve import app as app_mod

    monkeypatch.setattr(app_mod, "prepare", lambda *a: pytest.fail("tokenized a request it refuses"))
    status, _, err = live.post("/v1/completions", dict(_counting(3, 9), prompt=["count from 3 to 9:"] * (MAX_PENDING + 1)))
    assert status == 400 and err["error"]["param"] == "prompt" and f"at most {MAX_PENDING}" in err["error"]["message"]
    status, _, err = live.post("/v1/completions", dict(_counting(3, 9), n=MAX_PENDING + 1))
    assert status == 400 and err["error"]["param"] == "n"


def test_requests_whose_clients_left_before_they_were_tokenized_are_not_tokenized(live, monkeypatch):
    """Ten hung-up 1 MB prompts were tokenized one after another on the one preparing thread,
    and a small request behind them waited 17 s."""
    from fastserve_jax.serve import app as app_mod

    real, release, prepared = app_mod.prepare, threading.Event(), []

    def held(job, *rest):
        prepared.append(job.prompts[0])
        if job.prompts[0] == "count from 3 to 9:":
            assert release.wait(10)             # holds the thread: the others queue behind it
        return real(job, *rest)

    monkeypatch.setattr(app_mod, "prepare", held)

    async def scenario():
        first = asyncio.create_task(bench_client.request(live.url, "POST", "/v1/completions",
                                                         json.dumps(_counting(3, 9)).encode()))
        await asyncio.sleep(0.3)
        for a in (10, 20, 30):
            reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
            body = json.dumps(_counting(a, a + 5)).encode()
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
        await asyncio.sleep(0.3)
        release.set()
        return await first

    status, _, body = asyncio.run(scenario())
    assert status == 200 and json.loads(body)["choices"][0]["text"] == demo_task.expected_answer(3, 9)
    time.sleep(0.3)
    assert prepared == ["count from 3 to 9:"]


def test_non_streaming_disconnect_aborts(live):
    before = live.metric("fastserve_e2e_request_latency_seconds_count")

    async def hang_up():
        """Send the request, let it run a little, hang up without reading the response."""
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        body = json.dumps(_counting(0, 250, n=4)).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.close()

    gen0 = live.metric("fastserve_generation_tokens_total")
    asyncio.run(hang_up())
    live.wait_idle(timeout=5)
    generated = live.metric("fastserve_generation_tokens_total") - gen0
    assert 0 < generated < 4 * 252, "the request should have started and been cut short"
    assert live.metric("fastserve_e2e_request_latency_seconds_count") == before   # aborted, not finished


def _histogram_count(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name + "_count")


def test_ttft_is_observed_at_the_first_token_also_for_a_stream_cut_short(live):
    """The TTFT histogram was fed when a request finished: a long answer's first token showed
    on /metrics only at its end, and a client that hung up after its first tokens never
    counted. As in vLLM, a first token is observed when it comes, whatever follows."""
    ttft = "fastserve_time_to_first_token_seconds"
    before = live.metric(ttft + "_count"), live.metric("fastserve_e2e_request_latency_seconds_count")

    async def scenario():
        long = dict(prompt=demo_task.make_prompt(0, 5), max_tokens=400, temperature=0, ignore_eos=True, stream=True)
        [(reader, writer, status, h)] = await _open_streams(live.url, [long])
        pieces = bench_client._body_pieces(reader, h)
        while b'"text":"' not in await anext(pieces):     # the first token's chunk (chat would open with a role)
            pass
        _, _, body = await bench_client.request(live.url, "GET", "/metrics")
        writer.close()
        return _histogram_count(body.decode(), ttft)

    assert asyncio.run(scenario()) == before[0] + 1          # running, its first token out
    live.wait_idle()
    assert live.metric(ttft + "_count") == before[0] + 1     # hung up: still counted, once
    assert live.metric("fastserve_e2e_request_latency_seconds_count") == before[1]   # but it never finished


def test_requests_are_counted_by_finish_reason(live):
    """vLLM's request_success_total{finished_reason}: /metrics had no count of requests by how
    they ended, so neither hang-ups nor answers cut at max_tokens could be told apart. The
    vllm: twin leaves out what a client aborted, as vLLM's (its output processor drops the
    request before any finish is recorded): it counted them until 2026-12-07, so its sum was
    no longer the count of e2e latencies, as it is in vLLM."""
    model = (("engine", "0"), ("model_name", "demo"))

    def counts():
        m = live.metrics()
        return {(who, r): m[("fastserve_request_success_total", (("finished_reason", r),))] if who == "ours" else
                m[("vllm:request_success_total", (model[0], ("finished_reason", r), model[1]))]
                for r in ("stop", "length", "abort", "error") for who in ("ours", "vllm")}
    before = counts()
    assert live.post("/v1/completions", _counting(3, 9))[2]["choices"][0]["finish_reason"] == "stop"     # EOS
    assert live.post("/v1/completions", dict(_counting(3, 90), stop=[" 6"]))[2]["choices"][0]["finish_reason"] == "stop"
    out = live.post("/v1/completions", dict(_counting(3, 90), max_tokens=3, n=2))[2]
    assert [c["finish_reason"] for c in out["choices"]] == ["length"] * 2

    async def hang_up():
        [(reader, writer, _, h)] = await _open_streams(live.url, [dict(_counting(0, 300), stream=True)])
        await anext(bench_client._body_pieces(reader, h))
        writer.close()
    asyncio.run(hang_up())
    live.wait_idle()
    after = counts()
    assert {r: after[(who, r)] - before[(who, r)] for who, r in after if who == "ours"} == \
        {"stop": 2, "length": 2, "abort": 1, "error": 0}
    assert {r: after[(who, r)] - before[(who, r)] for who, r in after if who == "vllm"} == \
        {"stop": 2, "length": 2, "abort": 0, "error": 0}


@pytest.mark.parametrize("inject", [fail_next_step, lose_the_cache_in_next_step])
def test_engine_fault_fails_requests_and_server_keeps_serving(live, client, inject):
    """Also where the failed step took the KV cache with it: every later step failed on the
    deleted buffer, and the server never served again (until 2026-12-07)."""
    faults = live.metric("fastserve_engine_faults_total")
    live.on_engine(inject)
    status, _, err = live.post("/v1/completions", _counting(3, 30))
    assert status == 500 and "injected device fault" in err["error"]["message"]
    out = client.completions.create(model="demo", prompt=demo_task.make_prompt(3, 30), max_tokens=40, temperature=0)
    assert demo_task.check_answer(3, 30, out.choices[0].text)
    assert live.get("/health")[0] == 200 and live.metric("fastserve_engine_faults_total") == faults + 1
    live.wait_idle()
    live.on_engine(lambda e: e.kv.check_integrity())


def test_a_failed_stream_ends_with_one_error_event_as_vllms(live):
    """A stream whose choices failed sent an error event per choice (a probe, 2026-12-07);
    vLLM's stream sends one and ends ([DONE]), as here now."""
    live.on_engine(fail_next_step)
    body = json.dumps(_counting(3, 30, stream=True, n=2)).encode()
    status, _, raw = asyncio.run(bench_client.request(live.url, "POST", "/v1/completions", body))
    events = [ln[6:] for ln in raw.decode().split("\n") if ln.startswith("data: ")]
    assert status == 200 and len(events) == 2 and events[-1] == "[DONE]", events
    assert "injected device fault" in json.loads(events[0])["error"]["message"]
    live.wait_idle()


@pytest.mark.parametrize("inject", [fail_three_steps, fail_three_collections])
def test_a_failing_engine_takes_one_request_at_a_time_and_recovers(live, inject):
    """Three failed iterations in a row make /health 503 'engine failing'; every request used to
    be refused from then on, so no iteration could run to reset the count and the server stayed
    failing after a transient fault. Now one request is let in, and its success clears it.
    A step that launches without raising but gives no tokens is no sign of health: between
    failing collections it kept /health at 200 (until 2026-12-07)."""
    live.on_engine(inject)
    for _ in range(3):
        status, _, err = live.post("/v1/completions", _counting(3, 9))
        assert status == 500 and "injected device fault" in err["error"]["message"]
    deadline = time.monotonic() + 5
    while live.get("/health")[0] == 200 and time.monotonic() < deadline:    # the health event trails the 500
        time.sleep(0.02)
    status, _, raw = live.get("/health")
    assert status == 503 and b"engine failing" in raw
    assert live.metric("fastserve_server_ready") == 0        # /metrics agrees with /health
    status, _, out = live.post("/v1/completions", _counting(3, 30))
    assert status == 200 and demo_task.check_answer(3, 30, out["choices"][0]["text"])
    assert live.get("/health")[0] == 200
    live.wait_idle()


def test_a_drain_that_begins_while_a_prompt_is_tokenized_refuses_it_with_a_503(live, monkeypatch):
    """The serving state was read only before tokenizing: a drain (or an engine stop, then a
    500 from submit) that began meanwhile let the request through."""
    from fastserve_jax.serve import app as app_mod
    srv, prepare = live.state, app_mod.prepare

    def prepare_then_drain(job, eng, *rest):
        out = prepare(job, eng, *rest)
        srv.draining = True
        return out
    monkeypatch.setattr(app_mod, "prepare", prepare_then_drain)
    try:
        status, headers, err = live.post("/v1/completions", _counting(3, 9))
        health, ready = live.get("/health")[0], live.metric("fastserve_server_ready")
    finally:
        srv.draining = False
    assert (health, ready) == (503, 0)          # draining: fastserve_server_ready said 1 while /health said 503
    assert status == 503 and "shutting down" in err["error"]["message"] and "retry-after" in map(str.lower, headers)


@pytest.mark.slow   # 5 s of CPU; scripts/soak_server.py is the long form, disconnects are tested above
def test_load_100_requests_32_clients_with_disconnects(live):
    """Concurrency, hang-ups and accounting over HTTP (scripts/soak_server.py runs thousands
    of such requests; 200 here took 9.6 s of the suite on a slow VM)."""
    rng = np.random.default_rng(5)
    n = 100
    tok = live.state.engine.engine.tokenizer
    pairs, cut = load_pairs(rng, n, 8, tok)
    payloads = [_counting(a, b, stream=True, stream_options={"include_usage": True}) for a, b in pairs]
    prompt_tokens = sum(len(tok.encode(p["prompt"])) for p in payloads)
    m0 = live.metrics()

    results = asyncio.run(bench_client.run_load(live.url, payloads, concurrency=32, disconnect_after=cut))

    wrong = [(pairs[i], r.text[:60], r.error) for i, r in enumerate(results)
             if cut[i] is None and not (r.ok and demo_task.check_answer(*pairs[i], r.text))]
    assert not wrong, f"{len(wrong)} wrong or failed, e.g. {wrong[:3]}"
    for i, r in enumerate(results):
        assert len(r.ids) == 1
        if cut[i]:
            assert r.disconnected and demo_task.expected_answer(*pairs[i]).startswith(r.text)
        else:
            assert r.completion_tokens == demo_task.answer_num_tokens(*pairs[i]) and r.finish_reason == "stop"
    assert len({next(iter(r.ids)) for r in results}) == n                       # nothing duplicated
    assert all(r.due is None for r in results)                                   # a closed loop: none due
    live.wait_idle(timeout=20)                                                    # KV back to zero
    m1 = live.metrics()
    delta = lambda name: m1[(name, ())] - m0[(name, ())]
    assert delta("fastserve_prompt_tokens_total") == prompt_tokens               # each prefilled once (cut ones too)
    assert delta("fastserve_e2e_request_latency_seconds_count") == sum(c is None for c in cut)
    assert live.get("/health")[0] == 200
    live.on_engine(lambda e: e.kv.check_integrity())


def test_idle_server_replaces_its_provisional_cost_model_once_the_warmup_is_done(live):
    """serve came up on a cost model timed on the background warm-up's covering set; once
    every shape is compiled the idle engine thread profiles every bucket and the scheduler
    takes it, and then runs every program that has not run yet once."""
    assert live.started_provisional
    live.on_engine(lambda e: e.runner.compiler.wait_background())
    deadline = time.monotonic() + 60       # profiling every bucket beside the suite's other worker
    while live.on_engine(lambda e: e.profile_provisional):
        assert time.monotonic() < deadline, "still on the provisional cost model"
        time.sleep(0.1)
    assert live.on_engine(lambda e: e.scheduler.cost_model is e.cost_model and not e.runner.shapes_pending())
    assert live.refined.seen          # what the fixture reads where the refine beat it
    assert live.metric("fastserve_cost_model_provisional") == 0
    # then, still idle, it runs each compiled program that has not run yet once, in slices
    # (engine_loop._first_runs), so that no request pays a program's costlier first run
    while live.on_engine(lambda e: e.runner.first_runs_pending()):
        assert time.monotonic() < deadline + 30, "programs left that never ran"
        time.sleep(0.1)
    assert live.on_engine(lambda e: set(e.runner.compiler.all_keys()) <= e.runner.ran)
    status, _, out = live.post("/v1/completions", _counting(3, 30))
    assert status == 200 and demo_task.check_answer(3, 30, out["choices"][0]["text"])


def test_prompts_are_tokenized_off_the_event_loop(live, monkeypatch):
    """A 1 MB prompt took ~1 s to tokenize on the event loop, and every stream stalled that long."""
    from fastserve_jax.serve import app

    threads = []

    def recording(job, eng, *rest, inner=app.prepare):
        threads.append(threading.current_thread().name)
        return inner(job, eng, *rest)
    monkeypatch.setattr(app, "prepare", recording)
    assert live.post("/v1/completions", _counting(3, 5))[0] == 200
    assert threads and threads[0].startswith("fastserve-prepare")


@pytest.mark.parametrize("forced", [False, True])
def test_requests_left_when_the_shutdown_grace_runs_out_get_a_clean_answer(caplog, forced, monkeypatch):
    """Past --shutdown-timeout uvicorn cancels the handlers: a non-streaming client got a
    text/plain 500, a stream stopped with no [DONE], and the log had a traceback per request.
    Now they are answered just before: a JSON 503, an error event then [DONE]. So are they when
    a second Ctrl-C forces the exit (`forced`; the same 500s and tracebacks until 2026-12-07), and
    a request whose body is still arriving or that still waits to be tokenized (a plain-text 500
    and a traceback each until 2026-12-07)."""
    from fastserve_jax.serve import app as app_mod

    real, held = app_mod.prepare, threading.Event()

    def prepare(job, *rest):
        if job.prompts[0] == "held":
            held.wait(10)           # the one preparing thread: the request behind it waits its turn
        return real(job, *rest)
    monkeypatch.setattr(app_mod, "prepare", prepare)
    srv = LiveServer(ServerConfig(model_name="demo"), grace=60 if forced else 0.6, draining=True).start()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(caplog.handler)
    long = dict(prompt=demo_task.make_prompt(0, 5), max_tokens=490, temperature=0, ignore_eos=True)

    async def scenario():
        plain = asyncio.create_task(bench_client.request(srv.url, "POST", "/v1/completions",
                                                         json.dumps(long).encode()))
        [(reader, writer, status, h)] = await _open_streams(srv.url, [dict(long, stream=True)])
        assert status == 200
        holding = asyncio.create_task(bench_client.request(srv.url, "POST", "/v1/completions",
                                                           json.dumps(dict(long, prompt="held")).encode()))
        queued = asyncio.create_task(bench_client.request(srv.url, "POST", "/v1/completions",
                                                          json.dumps(long).encode()))
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", srv.port)
        up_writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        await asyncio.sleep(0.2)
        if forced:      # what two Ctrl-Cs do (signal handlers are the main thread's; uvicorn runs on another here)
            srv.server.handle_exit(signal.SIGINT, None)
            await asyncio.sleep(0.3)
            srv.server.handle_exit(signal.SIGINT, None)
        else:
            srv.server.should_exit = True
        data = b"".join([p async for p in bench_client._body_pieces(reader, h)])
        writer.close()
        uploading = await up_reader.read()
        up_writer.close()
        waited = [await t for t in (holding, queued)]
        return await plain, data.decode(), uploading.decode(), waited
    try:
        (status, headers, body), stream, uploading, waited = asyncio.run(scenario())
    finally:
        held.set()
        srv.stop()
        uvicorn_log.removeHandler(caplog.handler)
    said = "a forced exit" if forced else "shut down before this request finished"
    assert status == 503 and said in json.loads(body)["error"]["message"]
    events = [e for e in stream.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and said in json.loads(events[-2][6:])["error"]["message"]
    for w_status, _, w_body in waited:
        assert w_status == 503 and said in json.loads(w_body)["error"]["message"], w_body
    head, _, answer = uploading.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and said in json.loads(answer)["error"]["message"], uploading
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_token_counters_count_what_the_engine_processes(live, client):
    """fastserve_prompt_tokens_total counts a prompt once per choice, as vLLM's prompt_tokens_total
    does (n choices are n engine requests, each prefilled), while usage.prompt_tokens counts it
    once; generation tokens equal the usage's completion tokens (streams, echo, stops, n > 1)."""
    names = ("fastserve_prompt_tokens_total", "fastserve_generation_tokens_total")
    before = [live.metric(n) for n in names]
    a = client.completions.create(model="demo", prompt=[demo_task.make_prompt(3, 9), demo_task.make_prompt(40, 52)],
                                  max_tokens=20, temperature=0, n=2, stop=["8"])
    msgs = [{"role": "user", "content": demo_task.make_prompt(5, 9)}]
    b = list(client.chat.completions.create(model="demo", messages=msgs, max_completion_tokens=8, temperature=0, n=3,
                                            stream=True, stream_options={"include_usage": True}))[-1]
    c = client.completions.create(model="demo", prompt=demo_task.make_prompt(1, 4), max_tokens=6, temperature=0,
                                  echo=True)
    live.wait_idle()
    assert [live.metric(n) - x for n, x in zip(names, before)] == \
        [2 * a.usage.prompt_tokens + 3 * b.usage.prompt_tokens + c.usage.prompt_tokens,
         a.usage.completion_tokens + b.usage.completion_tokens + c.usage.completion_tokens]


def _add_then_abort(engine) -> int:
    """A request aborted before any iteration ran (a client gone while it waited): the growth of
    the engine's prompt token count."""
    from fastserve_jax import SamplingParams

    before = engine.snapshot()["prompt_tokens_total"]
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=4), request_id="never-prefilled")
    engine.abort("never-prefilled")
    return engine.snapshot()["prompt_tokens_total"] - before


def test_a_prompt_counts_once_its_prefill_is_done_not_when_admitted(live):
    """fastserve_prompt_tokens_total counted a prompt on admission, so requests whose clients left
    while they waited (never prefilled) inflated it; vLLM's prompt_tokens_total counts a prompt
    when its prefill ends (its first token), once also when its KV is recomputed."""
    assert live.on_engine(_add_then_abort) == 0


@pytest.mark.parametrize("when", ["before", "during"])
def test_metrics_render_once_the_engine_is_gone(when):
    """A scrape after the engine process died, or one whose snapshot call the engine failed as
    it stopped (calls left queued at a stop fail), answered 500: render() called into the lost
    engine. It answers with fastserve_server_ready 0 and the last snapshot's figures."""
    from types import SimpleNamespace

    from fastserve_jax.serve.async_engine import EngineHealth
    from fastserve_jax.serve.prometheus import ServerMetrics

    async def call(fn):
        engine.stopped = True
        raise RuntimeError("the engine has stopped")
    lost = "engine process exited" if when == "before" else None
    engine = SimpleNamespace(health=EngineHealth(ready=True, lost=lost), stopped=False, num_pending=0, engine=None, call=call)
    text = asyncio.run(ServerMetrics(engine).render()).decode()
    assert "fastserve_server_ready 0.0" in text and "fastserve_server_pending_requests 0.0" in text
    # every refusal reason has a series before its first refusal (rate() over a missing one is empty)
    assert all(f'fastserve_server_rejected_total{{reason="{r}"}} 0.0' in text for r in ("unavailable", "queue_full"))
