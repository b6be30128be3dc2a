"""The real server on loopback for tests: the app under uvicorn on a background thread,
plus helpers to read /metrics and to run a function on the engine thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from fastserve_jax.models.demo_task import answerable
from fastserve_jax.serve import bench_client
from fastserve_jax.serve.app import ServerConfig, create_app
from fastserve_jax.serve.draining import DrainingServer
from fastserve_jax.serve.serve_cmd import EngineBuilder

# Small settings: a batch limit well below the load tests' concurrency, so requests queue
# and the policy preempts, and a small bucket grid (2 decode x 2 prefill sizes x 2 block
# counts, the largest of each reaching the limits), so the background warm-up compiles 8
# launches instead of the default grid's 31. The CLI test starts the same limits (the
# command line has no bucket options, so it compiles the default grid).
ENGINE_KW = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128,
                 decode_batch_buckets=(2, 8), prefill_token_buckets=(32, 128), block_buckets=(8, 48))
ENGINE_ARGS = ["--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "128"]


def load_pairs(rng, n: int, cut_every: int, tokenizer) -> tuple[list[tuple[int, int]], list[int | None]]:
    """n counting pairs the demo model answers exactly, and for every `cut_every`-th one (> 3; from
    the fourth) a hang-up after 1-5 tokens (None: read to the end); cut ones are long enough
    to cut. Spans up to 40 tokens: concurrency, hang-ups and accounting are what the load
    tests check, and 200 answers of up to 120 tokens took 16 s of the suite at 8 rows a step
    (7 s with these spans; 100 answers since 2026-12-06)."""
    cut = [int(rng.integers(1, 6)) if i % cut_every == 3 else None for i in range(n)]
    cuts = sum(c is not None for c in cut)
    # screened with a margin of 8 each (the model misses ~0.6% of pairs)
    short = answerable([(a, a + int(rng.integers(0, 40))) for a in map(int, rng.integers(0, 800, n - cuts + 8))],
                       tokenizer)
    long = answerable([(a, a + int(rng.integers(20, 60))) for a in map(int, rng.integers(0, 800, cuts + 8))], tokenizer)
    return [long.pop() if c else short.pop() for c in cut], cut


def fail_next_step(engine) -> None:
    """For `LiveServer.on_engine`: the engine's next iteration raises, once (then the class's
    step serves again)."""
    def failing_step():
        del engine.step
        raise RuntimeError("injected device fault")
    engine.step = failing_step


def lose_the_cache_in_next_step(engine) -> None:
    """For `LiveServer.on_engine`: the next iteration raises after taking (donating) the KV
    cache, as a fault inside a compiled step can, once."""
    def failing_step():
        del engine.step
        for st in engine.runner.stages:
            st.cache.k.delete()
            st.cache.v.delete()
        raise RuntimeError("injected device fault")
    engine.step = failing_step


def kv_integrity(engine) -> None:
    """For `LiveServer.on_engine`: the KV manager's own check (a module-level function, so it
    also crosses to an engine process)."""
    engine.kv.check_integrity()


def free_port() -> int:
    return bench_client.unused_port()


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, _, body = asyncio.run(bench_client.request(url, "GET", "/health"))
            if status == 200:
                return
            if b"failed to start" in body:       # it will not come up: say why now, not after `timeout`
                raise RuntimeError(f"{url}/health: {body!r}")
            last = body
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health not ready after {timeout} s: {last!r}")


class LiveServer:
    def __init__(self, cfg: ServerConfig, engine_kw: dict = ENGINE_KW, grace: float = 10.0,
                 draining: bool = False) -> None:
        """grace: uvicorn's timeout_graceful_shutdown; draining: `serve`'s own uvicorn server
        (serve/draining.py) instead of uvicorn's."""
        self.app = create_app(EngineBuilder(None, engine_kw), cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=grace)
        self.server = DrainingServer(config, self.app) if draining else uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def start(self, timeout: float = 400.0) -> "LiveServer":
        self.thread.start()
        wait_healthy(self.url, timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        # the background warm-up's compile in progress, if any, before the session removes its
        # compilation cache (atexit, where the compiler waits for it otherwise, comes after)
        runner = getattr(getattr(self.state.engine, "engine", None), "runner", None)    # none: --engine-process
        if runner is not None:
            runner.compiler.stop_background()

    def on_engine(self, fn):
        """fn(engine) on the engine thread, between iterations."""
        ae = self.state.engine
        return asyncio.run_coroutine_threadsafe(ae.call(fn), ae.loop).result(30)

    def get(self, path: str) -> tuple[int, dict, bytes]:
        return asyncio.run(bench_client.request(self.url, "GET", path))

    def post(self, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, h, data = asyncio.run(bench_client.request(self.url, "POST", path, raw, headers))
        return status, h, json.loads(data)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted label items): value} from /metrics."""
        status, _, body = self.get("/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}

    def metric(self, name: str, **labels) -> float:
        return self.metrics()[(name, tuple(sorted(labels.items())))]

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until no request is pending and the device KV pool is empty again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if m[("fastserve_server_pending_requests", ())] == 0 and \
                    m[("fastserve_kv_blocks_used", (("pool", "device"),))] == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"server not idle after {timeout} s: pending "
                           f"{m[('fastserve_server_pending_requests', ())]}, KV blocks "
                           f"{m[('fastserve_kv_blocks_used', (('pool', 'device'),))]}")


def fail_three_collections(engine) -> None:
    """For `LiveServer.on_engine`: as under async scheduling when what a launch computed fails
    only where it is collected, three times: each request's first step launches and returns no
    tokens (nothing raised), its next one raises (then the class's step serves again)."""
    left, launched = [3], [False]

    def step():
        launched[0] = not launched[0]
        if launched[0]:
            return []
        left[0] -= 1
        if not left[0]:
            del engine.step
        raise RuntimeError("injected device fault")
    engine.step = step


def fail_three_steps(engine) -> None:
    """For `LiveServer.on_engine`: the engine's next three iterations raise (then the class's
    step serves again), enough for /health to call it failing (serve/app.py FAULTY_AFTER)."""
    left = [3]

    def failing_step():
        left[0] -= 1
        if not left[0]:
            del engine.step
        raise RuntimeError("injected device fault")
    engine.step = failing_step
