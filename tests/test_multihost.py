"""Two processes started with jax.distributed on loopback serve requests end to end: process 0
runs the HTTP server and the scheduler, process 1 replays its steps (fastserve_jax/multihost.py), over a
tp=2 x pp=2 mesh whose every stage spans both processes, and over a tp=2 mesh of one device per
process (one stage, so async scheduling is on: the token box spans both processes, and the
worker replays its puts and takes)."""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from fastserve_jax.serve.bench_client import unused_port
from fastserve_jax.serve.serve_cmd import multihost_hangs_on

# serve refuses a multi-host start on a jax that hangs it (test_distributed.py checks the refusal)
pytestmark = pytest.mark.skipif(bool(multihost_hangs_on(importlib.metadata.version("jax"))),
                                reason="multi-host serving hangs on this jax; serve refuses it")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


IDLE_RUNS = "programs not run yet once while idle"     # serve/engine_loop.py, _first_runs


def _free_ports(n: int) -> list[int]:
    """n distinct ports below the ephemeral range (bench_client.unused_port): the leader binds
    its HTTP port only after the worker has connected over loopback, on an ephemeral port."""
    ports: list[int] = []
    while len(ports) < n:
        p = unused_port()
        if p not in ports:
            ports.append(p)
    return ports


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


# with the Pallas kernel (Triton's, interpret mode) per head shard over the two processes' mesh: -m slow
# ... and with a full warm-up, whose runs of each program the worker replays, and with a
# background one, whose idle leader runs the programs that have not run (mirrored too). The
# default suite runs the two meshes with lazy compiles (the one-stage one with async
# scheduling): the full warm-up took 15 s of its 2 cores, the lazy one-stage run 6 s (2026-12-06).
# How each run ends: the leader stopped by SIGTERM (pp=2) or SIGINT (pp=1), or the worker killed
# while the leader is idle ("kill-worker").
@pytest.mark.parametrize("backend,tp,pp,warmup,end", [
    ("reference", 2, 2, "lazy", "stop"), pytest.param("pallas", 2, 2, "lazy", "stop", marks=pytest.mark.slow),
    ("reference", 2, 1, "lazy", "kill-worker"), pytest.param("reference", 2, 1, "lazy", "stop", marks=pytest.mark.slow),
    pytest.param("reference", 2, 1, "full", "stop", marks=pytest.mark.slow),
    pytest.param("reference", 2, 1, "background", "stop", marks=pytest.mark.slow)])
def test_two_processes_serve_a_request_end_to_end(tmp_path, backend, tp, pp, warmup, end):
    http, coord = _free_ports(2)
    while coord + 1 in (http,):
        http, coord = _free_ports(2)
    common = ["-m", "fastserve_jax", "serve", "--port", str(http), "--coordinator-address", f"127.0.0.1:{coord}",
              "--num-processes", "2", "-tp", str(tp), "-pp", str(pp), "--scheduler", "fcfs", "--max-num-seqs", "4",
              "--max-num-batched-tokens", "32", "--max-model-len", "128", "--num-device-blocks", "9", "--block-size", "8",
              "--warmup", warmup, "--log-level", "info", "--attention-backend", backend,
              "--decode-batch-buckets", "2,4", "--block-buckets", "8,28"]    # 2 x 2 decode shapes, not 3 x 4
    env = dict(os.environ, FASTSERVE_LOCAL_DEVICE_COUNT=str(tp * pp // 2), PYTHONPATH=ROOT)
    # the parent's virtual device count must not reach the children; its optimisation level may
    env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    procs, logs = [], []
    for pid in (0, 1):
        log = open(tmp_path / f"p{pid}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *common, "--process-id", str(pid)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 400
        while True:
            assert all(p.poll() is None for p in procs), _logs(tmp_path)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "not ready in time\n" + _logs(tmp_path)
            time.sleep(0.2)
        while warmup == "background" and IDLE_RUNS not in (tmp_path / "p0.log").read_text():
            assert all(p.poll() is None for p in procs) and time.time() < deadline, _logs(tmp_path)
            time.sleep(0.2)
        # four at once in a pool of 9 blocks: the leader swaps KV to the host and back, and the
        # worker replays those copies on its shards
        spans = [(3, 12), (40, 52), (100, 109), (7, 19)]
        with concurrent.futures.ThreadPoolExecutor(len(spans)) as pool:
            outs = list(pool.map(lambda ab: _post(f"http://127.0.0.1:{http}/v1/completions", {
                "model": "demo", "prompt": f"count from {ab[0]} to {ab[1]}:", "max_tokens": 40, "temperature": 0}),
                spans))
        for (a, b), out in zip(spans, outs):
            assert out["choices"][0]["text"] == "".join(f" {i}" for i in range(a, b + 1)), _logs(tmp_path)
        if warmup == "background":      # (slow) prompt logprobs: the launch's targets reach the worker
            plp = _post(f"http://127.0.0.1:{http}/v1/completions", {"model": "demo", "prompt": "count from 3 to 9:",
                        "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2})["choices"][0]["logprobs"]
            assert plp["token_logprobs"][0] is None and all(x <= 0 for x in plp["token_logprobs"][1:]), plp
            assert plp["token_logprobs"][-3:] == [max(t.values()) for t in plp["top_logprobs"][-3:]]   # greedy
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        swapped = [ln for ln in metrics.splitlines() if ln.startswith('fastserve_swap_blocks_total{direction="out"}')]
        assert swapped and float(swapped[0].split()[-1]) > 0, metrics
        link = [ln for ln in metrics.splitlines()
                if ln.startswith('fastserve_swap_link_bytes_per_second{direction="in"}')]
        assert link and float(link[0].split()[-1]) > 0, metrics       # the leader's own device, probed
        if end == "kill-worker":
            # the leader sees it while idle and exits 1 at once (until 2026-12-07 /health said ok
            # until the next request failed, then JAX's shutdown barrier held it 1-1.5 min and
            # aborted it)
            procs[1].kill()
            assert procs[0].wait(timeout=30) == 1, _logs(tmp_path)
            assert "worker 1 is gone" in (tmp_path / "p0.log").read_text()
            return
        # graceful: the leader tells the worker to stop, after SIGINT and after a supervisor's SIGTERM
        # (which uvicorn re-raised after its drain, so that the leader died before telling the worker).
        # With pp=2 the SIGTERM reaches both processes, as a supervisor's stop of the host does, while
        # a request runs: the worker died at once and the leader's drain failed it (until 2026-12-07)
        stop = signal.SIGTERM if pp == 2 else signal.SIGINT
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/completions", json.dumps({
            "model": "demo", "prompt": "count from 0 to 40:", "max_tokens": 44, "temperature": 0,
            "stream": True}).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            lines = [r.readline()]                         # its first chunk: the request is running
            for p in procs if pp == 2 else procs[:1]:
                p.send_signal(stop)
            lines += r.readlines()
        text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines if ln.startswith(b"data: {"))
        assert text == "".join(f" {i}" for i in range(41)), (lines[-3:], _logs(tmp_path))
        assert procs[0].wait(timeout=120) in (0, -signal.SIGINT), _logs(tmp_path)
        assert procs[1].wait(timeout=120) == 0, _logs(tmp_path)
        worker_log = (tmp_path / "p1.log").read_text()
        assert "leader shut down after" in worker_log
        # a full warm-up's runs are collectives the worker joins (replayed), or the leader would hang
        assert ("running each program once" in (tmp_path / "p0.log").read_text()) == (warmup == "full")
        assert (IDLE_RUNS in (tmp_path / "p0.log").read_text()) == (warmup == "background")
        assert ("async scheduling" in worker_log) == (pp == 1), worker_log[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()                               # JAX traps SIGTERM; a hung collective needs SIGKILL
        for log in logs:
            log.close()


def _logs(tmp_path) -> str:
    return "\n".join(f"--- p{i} ---\n" + (tmp_path / f"p{i}.log").read_text()[-3000:] for i in (0, 1))
