"""`fastserve-jax serve` as a user runs it: a subprocess on loopback with an API key from
the environment, /health not ready during warm-up, and a graceful SIGTERM that lets an
in-flight stream finish."""

from __future__ import annotations

import asyncio
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from fastserve_jax.models import demo_task
from fastserve_jax.serve import bench_client
from server_harness import ENGINE_ARGS, free_port

openai = pytest.importorskip("openai")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 400.0) -> list[tuple[int, str]]:
    """Poll /health until 200; returns every (status, message) seen."""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, _, body = asyncio.run(bench_client.request(url, "GET", "/health"))
            seen.append((status, json.loads(body)["status"]))
            if status == 200:
                return seen
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready (exit code {proc.poll()}); statuses seen: {seen[-3:]}")


def _sse_texts(body: bytes) -> tuple[dict[int, str], bool]:
    """Streamed text per choice index, and whether [DONE] came."""
    texts: dict[int, str] = {}
    done = False
    for event in body.decode().split("\n\n"):
        if event == "data: [DONE]":
            done = True
        elif event.startswith("data: "):
            for c in json.loads(event[6:])["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    return texts, done


def test_serve_command_api_key_warmup_and_graceful_shutdown():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, FASTSERVE_API_KEY="sekret")
    # a chat template of the deployment's own (vLLM's --chat-template, here inline): every
    # conversation becomes one counting prompt
    # started at a shell's usual soft limit of 1,024 open files, which it raises as vLLM does
    # (test_serve_flags.py: a burst past it had connections dropped with no answer)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = subprocess.Popen([sys.executable, "-m", "fastserve_jax", "serve", "--port", str(port), *ENGINE_ARGS,
                             "--shutdown-timeout", "60", "--chat-template", "{{ 'count from 5 to 9:' }}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard)))
    try:
        seen = _wait_ready(url, proc)
        assert any(s == 503 and "warming up" in m for s, m in seen), seen
        if hard == resource.RLIM_INFINITY or hard > 1024:
            assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0] > 1024

        body = json.dumps({"prompt": demo_task.make_prompt(3, 12), "max_tokens": 20, "temperature": 0}).encode()
        for path in ("/v1/completions", "/tokenize", "/detokenize", "/invocations"):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                status, _, err = asyncio.run(bench_client.request(url, "POST", path, body, headers))
                assert status == 401 and "API key" in json.loads(err)["error"]["message"]
        status, _, out = asyncio.run(bench_client.request(url, "POST", "/tokenize", b'{"prompt": "count"}',
                                                          {"Authorization": "Bearer sekret"}))
        assert status == 200 and json.loads(out)["count"] >= 1
        assert asyncio.run(bench_client.request(url, "GET", "/version"))[0] == 200      # public, as /health
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        out = client.completions.create(model="demo", prompt=demo_task.make_prompt(3, 12), max_tokens=20,
                                        temperature=0)
        assert demo_task.check_answer(3, 12, out.choices[0].text)
        chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=20, temperature=0)
        assert chat.choices[0].message.content == demo_task.expected_answer(5, 9)

        async def stream_through_sigterm():
            payload = {"prompt": [demo_task.make_prompt(0, 250)] * 4, "max_tokens": 260, "temperature": 0,
                       "stream": True}
            reader, writer, status, h = await bench_client._open(
                url, "POST", "/v1/completions", json.dumps(payload).encode(), {"Authorization": "Bearer sekret"})
            assert status == 200
            proc.send_signal(signal.SIGTERM)           # the request is admitted and running
            data = b"".join([p async for p in bench_client._body_pieces(reader, h)])
            writer.close()
            return data

        texts, done = _sse_texts(asyncio.run(stream_through_sigterm()))
        assert done and texts == {i: demo_task.expected_answer(0, 250) for i in range(4)}
        proc.wait(timeout=60)
        assert proc.returncode in (0, -signal.SIGTERM)
        with pytest.raises(OSError):
            asyncio.run(bench_client.request(url, "GET", "/health"))
        log = proc.stdout.read()
        assert "warm-up: compiled" in log and "Shutting down" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_process_is_refused_with_multi_host(capsys):
    from fastserve_jax.serve.cli import main

    code = main(["serve", "--engine-process", "--coordinator-address", "127.0.0.1:1", "--num-processes", "2",
                 "--process-id", "0"])
    assert code == 2 and "--engine-process serves from one host" in capsys.readouterr().err


def test_multi_host_flags_without_a_coordinator_are_refused(capsys, monkeypatch):
    """--num-processes / --process-id with no coordinator: a one-line error (a one-host server
    that never read them before)."""
    from fastserve_jax.serve.cli import main

    for name in ("FASTSERVE_COORDINATOR", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--num-processes", "2", "--process-id", "5"]) == 2
    assert "--num-processes and --process-id need --coordinator-address" in capsys.readouterr().err
    assert main(["serve", "--num-processes", "0"]) == 2
    assert "--num-processes needs --coordinator-address" in capsys.readouterr().err


@pytest.mark.parametrize("held", [0, 1], ids=["coordinator port", "plan port"])
def test_a_leader_whose_port_another_program_holds_says_so(capsys, held, monkeypatch):
    """JAX's coordinator crashed in gRPC (exit 139, no message) on a port another program held;
    a busy plan port showed only after every worker had joined. Both are refused before JAX
    starts (this process would have crashed)."""
    import socket

    from fastserve_jax.serve import serve_cmd
    from fastserve_jax.serve.bench_client import unused_port
    from fastserve_jax.serve.cli import main

    monkeypatch.setattr(serve_cmd, "multihost_hangs_on", lambda version: None)     # on any jax

    coord = unused_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", coord + held))
        other.listen()
        assert main(["serve", "--coordinator-address", f"127.0.0.1:{coord}", "--num-processes", "2",
                     "--process-id", "0"]) == 1
    err = capsys.readouterr().err
    assert ("the coordinator port", "the plan port")[held] in err and f" {coord + held}: another program holds it" in err


@pytest.mark.parametrize("mode", ["--no-engine-process", "--engine-process"])
def test_ctrl_c_during_a_cold_warm_up_stops_the_server_without_compiling_the_rest(mode, tmp_path):
    """A cold full warm-up takes a minute or more (the demo model: 135 shapes, ~90 s on the
    2-core VM); Ctrl-C during it used to wait for every shape (thread) or 30 s (process)."""
    import threading

    port = free_port()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))          # nothing compiled yet
    env.pop("FASTSERVE_JAX_COMPILE_CACHE", None)
    proc = subprocess.Popen([sys.executable, "-m", "fastserve_jax", "serve", "--port", str(port), *ENGINE_ARGS,
                             "--warmup", "full", mode], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            text = "".join(lines)
            if "Uvicorn running" in text and "loading the bundled demo model" in text:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(120), "".join(lines)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(10)
        log = "".join(lines)
        assert proc.returncode == 0, log
        assert "stopped before the engine was ready" in log, log
        assert "engine ready" not in log and "error" not in log.lower(), log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, says", [
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive integer"),
    (["--model", "/nonexistent-model-dir"], "is not a model directory"),
    (["--max-model-len", "99999"], "exceeds the model's 2048 positions"),
    (["--num-device-blocks", "1000000000000"], "num_device_blocks=1000000000000 needs"),   # a MemoryError before
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be a fraction in (0, 1]"),
    (["--swap-space", "-1"], "swap_space must be a number of GiB in [0, 1048576]"),
    (["--decode-batch-buckets", "2,4"], "decode_batch_buckets must reach 32, got largest 4"),
])
def test_generate_refuses_a_bad_engine_setting_with_one_line_and_exit_code_2(args, says, capsys):
    from fastserve_jax.serve.cli import main

    assert main(["generate", *args, "count from 1 to 3:"]) == 2
    err = capsys.readouterr()
    assert "error: " in err.err and says in err.err and "Traceback" not in err.err + err.out
    if "--num-device-blocks" in args:       # the pool is checked where the engine sees its devices
        return
    # serve the same, before its port opens (it said "the engine did not start" and exited 1 after)
    assert main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr()
    assert "error: " in err.err and says in err.err and "Traceback" not in err.err + err.out


def test_vllms_memory_flags_reach_the_engine_and_the_argv_of_started_servers(capsys):
    """--gpu-memory-utilization and --swap-space (vLLM's names and defaults) are engine options:
    LLM's keywords, and passed on to the servers a benchmark starts; --help says what they do
    and that --num-device-blocks / --num-host-blocks win."""
    from fastserve_jax.serve.cli import main
    from fastserve_jax.serve.engine_args import engine_argv, engine_kwargs, parse_engine_args

    a = parse_engine_args(["--gpu-memory-utilization", "0.5", "--swap-space", "0"])
    for kw in (engine_kwargs(a), engine_kwargs(parse_engine_args(engine_argv(a)))):
        assert kw["gpu_memory_utilization"] == 0.5 and kw["swap_space"] == 0
    kw = engine_kwargs(parse_engine_args([]))
    assert kw["gpu_memory_utilization"] == 0.9 and kw["swap_space"] == 4
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory-utilization" in text and "--num-device-blocks wins" in text and "CPU" in text
    assert "--swap-space" in text and "GiB of host memory per device" in text and "--num-host-blocks wins" in text


def test_serve_with_a_bad_engine_setting_exits_1_and_says_which():
    """The engine is built after the server starts; a setting only it can judge (the pool against
    the devices' memory; the others are refused before the port opens, exit 2) ends the server
    with exit code 1 and one line naming it (the log gets the message, without a traceback)."""
    proc = subprocess.run([sys.executable, "-m", "fastserve_jax", "serve", "--port", str(free_port()),
                           "--num-device-blocks", "1000000000000"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "error: the engine did not start: ValueError: num_device_blocks=1000000000000 needs" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_servers_get_ports_below_the_ephemeral_range(monkeypatch):
    """bench_client.unused_port: a port an outbound connection cannot take before the server
    binds it (the multi-host test's leader once lost its port so), and one nothing listens on."""
    import itertools
    import socket

    from fastserve_jax.serve.bench_client import ephemeral_port_start, unused_port

    low = ephemeral_port_start()
    ports = {unused_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports) and len(ports) > 1
    with socket.socket() as s:                  # taken: the next pick is another
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        s.listen()
        picks = itertools.chain([taken], range(20000, 21000))
        monkeypatch.setattr("random.Random.randrange", lambda self, a, b: next(picks))
        assert unused_port() != taken


def test_serve_refuses_a_chat_template_it_cannot_read_before_anything_starts(tmp_path, capsys):
    from fastserve_jax.serve.cli import main

    assert main(["serve", "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --chat-template") and "cannot be read" in err and "Traceback" not in err


@pytest.mark.parametrize("args, says", [
    (["--port", "70000"], "argument --port: must be a port number in 0-65535"),     # bound as 4464 before
    (["--port", "-1"], "argument --port: must be a port number in 0-65535"),       # uvicorn's error, exit 3
    (["--shutdown-timeout", "nan"], "argument --shutdown-timeout: must be a finite number"),   # a traceback
    (["--shutdown-timeout", "-1"], "argument --shutdown-timeout: must be a finite number"),
])
def test_serve_refuses_a_bad_port_or_timeout_before_anything_starts(args, says, capsys):
    from fastserve_jax.serve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", *args])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_generate_takes_the_models_sampling_defaults(tmp_path, capsys):
    """`generate` fills what its flags leave out from the model's generation_config.json (it
    built greedy, unpenalized params whatever the model said): a repetition penalty of 3 there
    moves the demo model off its count. (That a flag wins, `--repetition-penalty 1` bringing
    the count back, was checked by hand: a second start of the model costs the suite 2.5 s.)"""
    import json
    import os

    from fastserve_jax.models import demo_model_path
    from fastserve_jax.serve.cli import main

    src = demo_model_path()
    for name in os.listdir(src):
        if name != "generation_config.json":
            os.symlink(os.path.join(src, name), tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "repetition_penalty": 3.0}))
    want = "output: ' 3 4 5 6 7 8 9 10 11 12'"
    # and a stdout that cannot say a prompt's character (PYTHONIOENCODING=ascii) escapes it: the
    # print raised UnicodeEncodeError, exit 1, the outputs lost (until 2026-12-07)
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", ascii_out)
        assert main(["generate", "--model", str(tmp_path), "--max-tokens", "12", "count from 3 to 12:", "é"]) == 0
        ascii_out.flush()
    out = ascii_out.buffer.getvalue().decode("ascii")
    assert "output: '" in out and want not in out and "prompt: '\\xe9'" in out, out
