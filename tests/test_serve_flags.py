"""vLLM's `serve` flags for the HTTP layer, the logs and the tokenizer: parsed without starting
anything, then one server (the demo model) with several model names, a root path, CORS,
request and stats logging, a lower --max-logprobs and a tokenizer directory of its own; and
HTTPS from --ssl-keyfile/--ssl-certfile on a stub app."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import threading
import time

import pytest
import uvicorn

from fastserve_jax.models import demo_model_path, demo_task
from fastserve_jax.serve import bench_client
from fastserve_jax.serve.app import ServerConfig
from fastserve_jax.serve.cli import build_parser, main
from fastserve_jax.serve.engine_args import engine_argv, engine_kwargs, parse_engine_args
from fastserve_jax.serve.serve_cmd import model_name
from fastserve_jax.serve.server_args import check_server_args, server_settings, uvicorn_settings
from fastserve_jax.serve.stats_log import StatsLine
from server_harness import ENGINE_KW, LiveServer, free_port


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_server_flags_give_the_servers_settings():
    a = _serve_args()
    assert a.served_model_name is None
    # vLLM's default served name is --model as given: clients send that string back (until
    # 2026-12-07 it was the directory's basename, and a client sending the path got a 404)
    assert model_name("/srv/models/llama/") == "/srv/models/llama/" and model_name(None) == "demo"
    assert server_settings(a) == dict(root_path="", cors_origins=("*",), cors_methods=("*",), cors_headers=("*",),
                                      cors_credentials=False, log_requests=False, log_stats=True, max_logprobs=20,
                                      request_id_headers=False, max_log_len=500, response_role="assistant",
                                      tokens_as_ids=False)
    assert uvicorn_settings(a) == {"log_level": "info", "access_log": True, "uds": None}
    # vLLM binds every interface by default: a manifest copied from vLLM without --host was
    # reachable on loopback only (until 2026-12-07)
    assert a.host == "0.0.0.0" and a.shutdown_timeout == 25.0
    a = _serve_args("--served-model-name", "a", "b", "--root-path", "/api", "--allowed-origins", '["http://x"]',
                    "--allow-credentials", "--allowed-methods", '["GET", "POST"]', "--allowed-headers", "[]",
                    "--uvicorn-log-level", "warning", "--ssl-keyfile", "k.pem", "--ssl-certfile", "c.pem",
                    "--enable-log-requests", "--disable-log-stats", "--max-logprobs", "5", "--enable-request-id-headers",
                    "--max-log-len", "7", "--response-role", "bot", "--return-tokens-as-token-ids",
                    "--disable-uvicorn-access-log", "--uds", "/tmp/s.sock")
    assert a.served_model_name == ["a", "b"]
    assert server_settings(a) == dict(root_path="/api", cors_origins=("http://x",), cors_methods=("GET", "POST"),
                                      cors_headers=(), cors_credentials=True, log_requests=True, log_stats=False,
                                      max_logprobs=5, request_id_headers=True, max_log_len=7, response_role="bot",
                                      tokens_as_ids=True)
    assert uvicorn_settings(a) == dict(log_level="warning", ssl_keyfile="k.pem", ssl_certfile="c.pem",
                                       ssl_ca_certs=None, ssl_cert_reqs=0, access_log=False, uds="/tmp/s.sock")
    assert not server_settings(_serve_args("--enable-log-requests", "--disable-log-requests"))["log_requests"]


def test_vllm_serve_model_positional_and_flags_it_lacks(capsys):
    """`vllm serve MODEL` is vLLM's usual form (an argparse error until 2026-12-07); vLLM's
    flags for features this server lacks are refused in one line, their no-op values taken."""
    from fastserve_jax.serve.server_args import vllm_refusal

    a = _serve_args("/m/llama", "--port", "9")
    assert vllm_refusal(a) is None and a.model == "/m/llama"
    a = _serve_args("/m/llama", "--model", "/m/llama")
    assert vllm_refusal(a) is None and a.model == "/m/llama"
    assert "the model is given twice" in vllm_refusal(_serve_args("/m/a", "--model", "/m/b"))
    assert vllm_refusal(_serve_args("--api-server-count", "1", "--data-parallel-size", "1")) is None
    for argv, says in ((["--headless"], "--headless: not implemented"),
                       (["--tool-call-parser", "hermes"], "--tool-call-parser: not implemented: tool calls"),
                       (["--data-parallel-size", "2"], "data parallelism is not implemented"),
                       (["--config", "c.yaml"], "YAML")):
        assert says in vllm_refusal(_serve_args(*argv))
        assert main(["serve", *argv]) == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--max-logprobs", "21"], "--max-logprobs 21: the sampler computes the top 20"),
    (["--max-logprobs", "-1"], "give 0 to 20"),
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile go together"),
    (["--root-path", "api/"], "--root-path must start with '/'"),
    (["--max-log-len", "-1"], "--max-log-len must be >= 0"),
])
def test_serve_refuses_bad_server_flags_before_anything_starts(args, says, capsys):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and "Traceback" not in err


def test_serve_refuses_tls_files_it_cannot_read_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """uvicorn opened them only after the log said it was serving (and the model had started
    loading): a FileNotFoundError traceback."""
    from fastserve_jax.serve import serve_cmd

    def loads(*args, **kw):
        raise AssertionError("got past the checks to load the model")
    monkeypatch.setattr(serve_cmd, "EngineBuilder", loads)
    pem, missing = tmp_path / "c.pem", str(tmp_path / "none.pem")
    pem.write_text("PEM")
    for args, says in ((["--ssl-keyfile", missing, "--ssl-certfile", str(pem)],
                        f"--ssl-keyfile {missing}: cannot read it (No such file or directory)"),
                       (["--ssl-keyfile", str(pem), "--ssl-certfile", str(tmp_path)],
                        f"--ssl-certfile {tmp_path}: cannot read it (Is a directory)"),
                       (["--ssl-keyfile", str(pem), "--ssl-certfile", str(pem), "--ssl-ca-certs", missing],
                        f"--ssl-ca-certs {missing}: cannot read it")):
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err
    # readable but not PEM (an ssl.SSLError traceback from uvicorn), a socket path in a missing
    # folder or on a directory (FileNotFoundError, "Address already in use"), a host that does
    # not resolve (uvicorn's exit 3 once the model had loaded, without the flag)
    sock_dir = tmp_path / "sockets"
    sock_dir.mkdir()
    for args, says in ((["--ssl-keyfile", str(pem), "--ssl-certfile", str(pem)],
                        f"--ssl-certfile {pem}: not a PEM key and certificate that match"),
                       (["--uds", str(tmp_path / "none" / "s.sock")], f"its folder {tmp_path / 'none'} does not exist"),
                       (["--uds", str(sock_dir)], f"--uds {sock_dir}: exists and is not a socket"),
                       (["--host", "no.such.host.invalid"], "--host no.such.host.invalid: cannot be resolved")):
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ssl-cert-reqs", "7"])      # a ValueError traceback: 7 is not a valid VerifyMode
    assert e.value.code == 2 and "argument --ssl-cert-reqs: invalid choice: 7" in capsys.readouterr().err
    assert check_server_args(_serve_args("--uds", str(sock_dir / "s.sock"), "--host", "localhost")) is None


def test_cors_lists_must_be_json_arrays(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--allowed-origins", "http://x"])
    assert e.value.code == 2 and "--allowed-origins: must be a JSON array of strings" in capsys.readouterr().err


def test_tokenizer_and_vllms_block_count_name_are_engine_options():
    a = parse_engine_args(["--tokenizer", "/tok", "--num-gpu-blocks-override", "64"])
    for kw in (engine_kwargs(a), engine_kwargs(parse_engine_args(engine_argv(a)))):
        assert kw["tokenizer"] == "/tok" and kw["num_device_blocks"] == 64


def test_enable_prefix_caching_is_an_engine_option_passed_on_to_a_started_server():
    a = parse_engine_args(["--enable-prefix-caching"])
    for kw in (engine_kwargs(a), engine_kwargs(parse_engine_args(engine_argv(a)))):
        assert kw["enable_prefix_caching"] is True
    plain = parse_engine_args(["--no-enable-prefix-caching"])
    assert engine_kwargs(plain)["enable_prefix_caching"] is False and "--enable-prefix-caching" not in engine_argv(plain)


def test_bucket_lists_are_engine_options_passed_on_whole(capsys):
    """The compiled shapes (EngineConfig's bucket lists) from the command line: LLM gets tuples,
    a started server the same lists, and left out they stay the engine's to derive."""
    a = parse_engine_args(["--decode-batch-buckets", "2,8", "--prefill-token-buckets", "64",
                           "--block-buckets", "16,80"])
    for kw in (engine_kwargs(a), engine_kwargs(parse_engine_args(engine_argv(a)))):
        assert (kw["decode_batch_buckets"], kw["prefill_token_buckets"], kw["block_buckets"]) == ((2, 8), (64,), (16, 80))
    kw = engine_kwargs(parse_engine_args([]))
    assert not {"decode_batch_buckets", "prefill_token_buckets", "block_buckets"} & set(kw)
    for value, says in (("4,x", "is not a comma-separated list of integers"),
                        ("8,4", "must be strictly increasing positive integers"), ("0,4", "positive")):
        with pytest.raises(SystemExit):
            parse_engine_args(["--block-buckets", value])
        err = capsys.readouterr().err
        assert f"'{value}'" in err and says in err, err
    # refused as parsed: they failed only once the server listened ("engine start failed", exit 1)
    for flag, value, says in (("-tp", "0", ">= 1"), ("-pp", "-1", ">= 1"), ("--batches-in-flight", "-1", ">= 0")):
        with pytest.raises(SystemExit):
            parse_engine_args([flag, value])
        assert f"must be an integer {says}, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--quantization", "awq"], "--quantization awq: quantized weights are not implemented"),
    (["-q", "fp8"], "--quantization fp8: quantized weights are not implemented"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: only 'auto' is implemented"),
    (["--revision", "main"], "--revision main: model revisions are not implemented"),
    (["--lora-modules", "a=/x"], "LoRA adapters are not implemented"),
    (["--enable-lora"], "LoRA adapters are not implemented"),
    (["--tokenizer-mode", "slow"], "--tokenizer-mode slow: only 'auto' is implemented"),
    (["--load-format", "pt"], "--load-format pt: only 'auto' and 'safetensors' are implemented"),
])
@pytest.mark.parametrize("command", ["serve", "generate"])
def test_vllm_flags_naming_features_we_lack_are_refused_in_one_line(command, args, says, capsys):
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {err[7:]}" and says in err and err.count("\n") == 1 and "unrecognized" not in err


def test_vllm_flags_without_meaning_here_are_accepted_with_a_line_saying_why(caplog):
    from fastserve_jax.vllm_options import notes, refusal

    a = _serve_args("--no-enable-prefix-caching", "--kv-cache-dtype", "auto", "--trust-remote-code", "--enforce-eager",
                    "--disable-frontend-multiprocessing", "--disable-custom-all-reduce", "--disable-fastapi-docs",
                    "--distributed-executor-backend", "ray", "--tokenizer-mode", "auto", "--load-format", "safetensors",
                    "--download-dir", "/d")
    assert refusal(a) is None and len(notes(a)) == 7 and notes(_serve_args()) == []
    caplog.set_level(logging.INFO, logger="fastserve_jax.serve")
    # the notes come first; a refused --max-logprobs then stops the server before the engine starts
    assert main(["serve", "--trust-remote-code", "--enforce-eager", "--max-logprobs", "21"]) == 2
    assert "--trust-remote-code has no effect: only the architectures fastserve-jax implements" in caplog.text
    assert "--enforce-eager has no effect: there are no CUDA graphs" in caplog.text


def test_the_stats_line_says_throughput_and_load_and_nothing_when_idle():
    def snap(prompt: int, generated: int, running: int = 0, waiting: int = 0) -> dict:
        return dict(prompt_tokens_total=prompt, generation_tokens_total=generated, requests_running=running,
                    requests_waiting=waiting, requests_paused=0, requests_swapped=1 if waiting else 0,
                    kv_device_used_blocks=25, kv_device_total_blocks=100, kv_host_used_blocks=0,
                    kv_host_total_blocks=0)
    stats = StatsLine(0.0)
    # the first line counts from the start: work served before the first snapshot is in it
    # (until 2026-12-07 the first snapshot was only a base)
    assert stats.line(snap(30, 80), 5.0).startswith("Engine 000: Avg prompt throughput: 6.0 tokens/s, Avg "
                                                     "generation throughput: 16.0 tokens/s")
    stats = StatsLine(0.0)
    assert stats.line(snap(0, 0), 0.0) is None                # no time since the start
    assert stats.line(snap(0, 0), 10.0) is None               # idle
    line = stats.line(dict(snap(500, 200, running=3, waiting=2), prefix_cache_queries_total=400,
                           prefix_cache_hits_total=100), 20.0)
    # vLLM's line as vLLM writes it (until 2026-12-07 in words of its own, which a scraper of
    # vLLM's log missed), waiting counted as vllm:num_requests_waiting, then this engine's figures
    assert line == ("Engine 000: Avg prompt throughput: 50.0 tokens/s, Avg generation throughput: 20.0 tokens/s, "
                    "Running: 3 reqs, Waiting: 3 reqs, GPU KV cache usage: 25.0%, Prefix cache hit rate: 25.0%; "
                    "of those waiting: paused 0, swapped 1; host KV usage: 0.0%")
    assert stats.line(snap(500, 200), 30.0) is None


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A tokenizer directory of its own whose chat template turns any conversation into one
    counting prompt, so a chat's answer shows which tokenizer the engine loaded."""
    tok = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(demo_model_path(), name), tok / name)
    with open(os.path.join(demo_model_path(), "tokenizer_config.json")) as f:
        config = json.load(f)
    (tok / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template="{{ 'count from 5 to 9:' }}")))
    cfg = ServerConfig(model_name="first", model_aliases=("second",), root_path="/api",
                       cors_origins=("http://allowed.example",), log_requests=True, stats_interval=0.2,
                       max_logprobs=2, request_id_headers=True, max_log_len=12, response_role="bot",
                       tokens_as_ids=True)
    srv = LiveServer(cfg, dict(ENGINE_KW, tokenizer=str(tok))).start()
    yield srv
    srv.stop()


def _request(live, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    raw = json.dumps(body).encode() if body is not None else b""
    status, h, data = asyncio.run(bench_client.request(live.url, method, path, raw, headers))
    return status, h, json.loads(data) if data.startswith(b"{") else data


def test_several_names_a_root_path_and_cors(live, caplog):
    for path in ("/v1/models", "/api/v1/models"):          # a proxy that strips the prefix, or one that keeps it
        status, _, body = _request(live, "GET", path)
        assert status == 200 and [c["id"] for c in body["data"]] == ["first", "second"]
    prompt = demo_task.make_prompt(3, 12)
    with caplog.at_level(logging.INFO, logger="fastserve_jax.serve"):
        for model in ("first", "second", None):
            status, _, out = _request(live, "POST", "/api/v1/completions",
                                      {"model": model, "prompt": prompt, "max_tokens": 20, "temperature": 0})
            assert status == 200 and out["model"] == "first" and demo_task.check_answer(3, 12, out["choices"][0]["text"])
        deadline = time.monotonic() + 10
        while "Avg generation throughput" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert f"received request {out['id']}: prompt {repr(prompt)[:12]} (" in caplog.text     # --max-log-len 12
    assert "Avg generation throughput" in caplog.text, caplog.text
    status, _, err = _request(live, "POST", "/v1/completions", {"model": "third", "prompt": "x"})
    assert status == 404 and "'first', 'second'" in err["error"]["message"]

    preflight = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST"}
    status, h, _ = _request(live, "OPTIONS", "/v1/completions", headers=preflight)
    assert status == 200 and h["access-control-allow-origin"] == "http://allowed.example"
    status, _, _ = _request(live, "OPTIONS", "/v1/completions", headers=dict(preflight, Origin="http://other.example"))
    assert status == 400
    status, h, _ = _request(live, "GET", "/v1/models", headers={"Origin": "http://allowed.example"})
    assert status == 200 and h["access-control-allow-origin"] == "http://allowed.example"


def test_model_cards_are_vllms_and_an_empty_name_is_the_default(live):
    """`vllm bench serve` without --model reads the first card's root (a KeyError here before
    2026-12-07); /v1/models/ was a 404 (vLLM redirects; a probe counts a 404 as down); a body's
    "model": "" was a 404 where vLLM serves the default model."""
    status, _, body = _request(live, "GET", "/v1/models")
    assert [(c["root"], c["parent"], c["permission"][0]["object"]) for c in body["data"]] == \
        [("first", None, "model_permission")] * 2
    status, h, _ = _request(live, "GET", "/v1/models/")
    assert status == 307 and h["location"].endswith("/v1/models")
    status, _, out = _request(live, "POST", "/v1/completions", {"model": "", "prompt": "count from 3 to 5:",
                                                                "max_tokens": 4, "temperature": 0})
    assert status == 200 and out["model"] == "first"


def test_api_keys_several_any_scheme_case_and_vllms_variable(monkeypatch):
    """--api-key took one key, the scheme had to be written "Bearer", and $VLLM_API_KEY was not
    read: a deployment moved from vLLM served with no key check."""
    from starlette.requests import Request

    from fastserve_jax.serve.app import Server
    from fastserve_jax.serve.errors import APIError
    from fastserve_jax.serve.serve_cmd import api_keys

    for name in ("FASTSERVE_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert api_keys(None) is None and api_keys([""]) is None and api_keys(["a", "b"]) == ("a", "b")
    monkeypatch.setenv("VLLM_API_KEY", "v")
    assert api_keys(None) == ("v",) and api_keys(["a"]) == ("a",)
    monkeypatch.setenv("FASTSERVE_API_KEY", "f")
    assert api_keys(None) == ("f",)

    def allowed(keys, header):
        srv = type("S", (), {"cfg": ServerConfig(api_key=keys)})()
        scope = {"type": "http", "headers": [] if header is None else [(b"authorization", header.encode())]}
        try:
            Server.check_auth(srv, Request(scope))
        except APIError as e:
            assert e.status == 401
            return False
        return True
    assert [allowed(("k1", "k2"), h) for h in ("Bearer k1", "bearer k2", "BEARER k1", "Bearer k3", "Basic k1",
                                               "Bearer", None)] == [True, True, True, False, False, False, False]
    assert allowed("k", "Bearer k") and not allowed("k", "Bearer kk") and allowed(None, None) and allowed((), None)


def test_x_request_id_names_the_response_and_comes_back_as_a_header(live):
    """vLLM's: the header's value is the completion's id (over the body's request_id), and with
    --enable-request-id-headers every response carries it back, a new one where the request had
    none, streamed answers too."""
    body = {"prompt": demo_task.make_prompt(3, 6), "max_tokens": 8, "temperature": 0, "request_id": "from-body"}
    status, h, out = _request(live, "POST", "/v1/completions", body, headers={"X-Request-Id": "trace-42"})
    assert status == 200 and out["id"] == "cmpl-trace-42" and h["x-request-id"] == "trace-42"
    status, h, out = _request(live, "POST", "/v1/completions", body)
    assert status == 200 and out["id"] == "cmpl-from-body" and len(h["x-request-id"]) == 32
    status, h, out = _request(live, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
                              headers={"X-Request-Id": "s-1"})
    assert status == 200 and h["x-request-id"] == "s-1" and b'"id": "chatcmpl-s-1"' in out.replace(b'":"', b'": "')
    status, h, _ = _request(live, "GET", "/health", headers={"X-Request-Id": "probe"})
    assert status == 200 and h["x-request-id"] == "probe"
    status, _, err = _request(live, "POST", "/v1/completions", body, headers={"X-Request-Id": "x" * 257})
    assert status == 400 and "X-Request-Id header must be 1 to 256 printable characters" in err["error"]["message"]


def _asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[bytes, bytes]]:
    """(status, response headers) of one request to the ASGI `app`, without a server."""
    sent = []
    scope = dict(type="http", asgi={"version": "3.0"}, http_version="1.1", method=method, scheme="http",
                 path=path, raw_path=path.encode(), query_string=b"", root_path="", headers=headers,
                 client=("127.0.0.1", 1), server=("127.0.0.1", 80))

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def run():
        try:
            await app(scope, receive, send)
        except RuntimeError:             # Starlette re-raises an internal error after its 500
            pass
    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


def test_x_request_id_on_preflights_errors_and_repeated_headers():
    """The header comes back on a CORS preflight (the middleware is outside CORS's), on a 404
    and on an internal error's 500 (sent outside every middleware); the first non-empty
    X-Request-Id is the one, an empty one counts as none."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from fastserve_jax.serve.app import _unexpected
    from fastserve_jax.serve.http_layer import header_value, middleware
    from fastserve_jax.serve.errors import APIError
    from fastserve_jax.serve.protocol_extras import header_request_id

    def boom(request):
        raise RuntimeError("a bug")

    app = Starlette(routes=[Route("/boom", boom)], middleware=middleware(ServerConfig(request_id_headers=True)),
                    exception_handlers={Exception: _unexpected})
    rid = [(b"x-request-id", b"abc")]
    status, h = _asgi(app, "GET", "/boom", rid)
    assert status == 500 and h[b"x-request-id"] == b"abc"
    assert _asgi(app, "GET", "/nowhere", rid)[1][b"x-request-id"] == b"abc"
    status, h = _asgi(app, "OPTIONS", "/boom", [(b"origin", b"http://x"), (b"access-control-request-method", b"GET"),
                                                (b"x-request-id", b"pre")])
    assert status == 200 and h[b"x-request-id"] == b"pre"
    raw = [(b"x-request-id", b""), (b"x-request-id", b"a"), (b"x-request-id", b"b")]
    assert _asgi(app, "GET", "/nowhere", raw)[1][b"x-request-id"] == b"a"
    assert header_request_id(header_value(raw, b"x-request-id")) == "a"          # the completion's id agrees
    assert header_request_id(header_value([(b"x-request-id", b"")], b"x-request-id")) is None
    assert header_request_id("a ünï".encode()) == "a ünï"          # UTF-8, not Latin-1's "a Ã¼nÃ¯"
    with pytest.raises(APIError, match=r"printable characters \(UTF-8\)"):
        header_request_id(b"a \xfc")
    assert len(_asgi(app, "GET", "/nowhere", [(b"x-request-id", b"")])[1][b"x-request-id"]) == 32   # a new one


def test_max_logprobs_lowers_the_limit_and_tokenizer_is_loaded_from_its_directory(live):
    status, _, err = _request(live, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": 3})
    assert status == 400 and "at most 2 (--max-logprobs)" in err["error"]["message"]
    status, _, out = _request(live, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
                               "logprobs": True, "top_logprobs": 2})
    assert status == 200 and out["choices"][0]["message"]["content"].startswith(" 5 6 7 8 9"), out
    first = out["choices"][0]["logprobs"]["content"][0]
    assert len(first["top_logprobs"]) == 2
    # --response-role and --return-tokens-as-token-ids (vLLM's flags; argparse errors until 2026-12-07)
    assert out["choices"][0]["message"]["role"] == "bot" and first["token"].startswith("token_id:"), out
    status, _, out = _request(live, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                               "add_generation_prompt": False})
    assert status == 200 and out["choices"][0]["message"]["role"] == "user"      # the last message's, as vLLM


def test_model_cards_wait_for_the_warm_up(monkeypatch):
    """GET /v1/models answered 200 while the engine warmed up, with cards lacking max_model_len:
    a readiness loop on it (common with vLLM, which listens only once ready) saw the server up
    too early, and a client reading max_model_len got a KeyError."""
    import server_harness

    gate = threading.Event()

    class Gated(server_harness.EngineBuilder):
        def __call__(self, stopping=None):
            gate.wait(120)
            return super().__call__(stopping)

    monkeypatch.setattr(server_harness, "EngineBuilder", Gated)
    srv = LiveServer(ServerConfig())
    srv.thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _, body = _request(srv, "GET", "/v1/models")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert status == 503 and "warming up" in body["error"]["message"], body
        gate.set()
        server_harness.wait_healthy(srv.url, 400)
        status, _, body = _request(srv, "GET", "/v1/models")
        assert status == 200 and body["data"][0]["max_model_len"] > 0
    finally:
        gate.set()
        srv.stop()


def test_ssl_flags_serve_https(tmp_path):
    """--ssl-keyfile/--ssl-certfile reach uvicorn: a self-signed certificate made here."""
    x509 = pytest.importorskip("cryptography.x509")
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    a = _serve_args("--ssl-keyfile", str(tmp_path / "key.pem"), "--ssl-certfile", str(tmp_path / "cert.pem"),
                    "--uvicorn-log-level", "warning")
    assert check_server_args(a) is None
    (tmp_path / "encrypted.pem").write_bytes(key.private_bytes(     # its passphrase is uvicorn's to ask for, not the check's
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))
    assert check_server_args(_serve_args("--ssl-keyfile", str(tmp_path / "encrypted.pem"), "--ssl-certfile",
                                         str(tmp_path / "cert.pem"))) is None
    app = Starlette(routes=[Route("/health", lambda r: PlainTextResponse("ok"))])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **uvicorn_settings(a)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))

        async def get() -> bytes:
            for _ in range(100):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                                   server_hostname="localhost")
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.05)
            writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data
        reply = asyncio.run(get())
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"ok")
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_server_raises_its_open_file_limit_as_vllm_does():
    """At a shell's or systemd's usual soft limit of 1,024 open files, a burst of 1,500
    connections had 492 dropped with no response and nothing logged (a probe, 2026-12-07);
    serve raises it toward 65,536, at most to the hard limit, as vLLM does (test_serve_cli.py
    starts a server at 1,024)."""
    import resource
    import subprocess
    import sys

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    code = ("import resource; from fastserve_jax.serve.draining import raise_open_file_limit as r; "
            "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, want), hard)))
    assert out.returncode == 0 and out.stdout.split() == [str(want)] * 2, out.stderr[-2000:]
