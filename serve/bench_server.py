"""The servers `fastserve-jax bench` (and scripts/bench_*.py) start: `fastserve-jax serve` in a
subprocess on a free port, its log in a file, and what the log says when one exits before it
is ready (ServerNotReady: the log's last error line and its path, for a one-line error)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from fastserve_jax.serve import bench_client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a line that reports an error: serve's own `error: ...`, a logged ERROR, a traceback's last line
_ERROR_LINE = re.compile(r"^error: |^ERROR:| ERROR |^[\w.]*(Error|Exception|Interrupt|Exit)\b")


class ServerNotReady(RuntimeError):
    """A started server exited, or did not answer /health, before it was ready."""


def last_error_line(path: str) -> str:
    """The last line of the log at `path` that reports an error (_ERROR_LINE), else its last
    line; '' for an empty or unreadable log."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if _ERROR_LINE.search(line)), lines[-1] if lines else "")


class LaunchedServer:
    """`fastserve-jax serve` in a subprocess on a free port, its log in a file."""

    def __init__(self, scheduler: str, engine_argv: list[str]) -> None:
        self.scheduler, self.port = scheduler, bench_client.unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(tempfile.gettempdir(), f"fastserve-bench-{scheduler}-{self.port}.log"), "w")
        # each server learns its output lengths afresh (policy_state.py), so servers of one
        # policy compare alike and the user's cache is left as it was; unless the caller says
        env = dict(os.environ)
        env.setdefault("FASTSERVE_JAX_LENGTHS_DIR", "off")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastserve_jax", "serve", "--port", str(self.port),
                                      "--scheduler", scheduler, "--log-level", "warning", *engine_argv],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900.0) -> None:
        """Until /health answers 200; a ServerNotReady if the server exits first (its message
        has the log's last error line) or is not ready after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = last_error_line(self.log.name).removeprefix("error: ")
                raise ServerNotReady(f"the {self.scheduler} server exited with {self.proc.returncode} before it was ready"
                                     + (f": {said}" if said else "") + f" (log: {self.log.name})")
            try:
                if asyncio.run(bench_client.request(self.url, "GET", "/health"))[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise ServerNotReady(f"the {self.scheduler} server was not ready after {timeout} s (log: {self.log.name})")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def discard_log(self) -> None:
        """Remove the log of a server that stopped cleanly (call once its run checked out);
        a failed one keeps it for its error message. (uvicorn re-raises SIGTERM once it has
        drained, so a clean stop ends with -SIGTERM.)"""
        if self.proc.returncode in (0, -signal.SIGTERM):
            with contextlib.suppress(OSError):
                os.remove(self.log.name)


def server_health(url: str) -> dict:
    """GET /health of a running server; a ValueError that says how to fix it if none answers."""
    try:
        bench_client.split_url(url)
    except ValueError as e:
        raise ValueError(f"--url {e}") from None
    try:
        status, _, body = asyncio.run(bench_client.request(url, "GET", "/health"))
    except OSError as e:
        raise ValueError(f"no server answers at {url} ({type(e).__name__}: {e}); start one with `fastserve-jax "
                         "serve`, or leave out --url and bench starts its own") from None
    if status == 200 and not body.strip():
        return {}                   # vLLM's /health: ready, nothing said (its policy is unknown)
    try:
        health = json.loads(body)
    except ValueError:
        health = None
    if not isinstance(health, dict):
        raise ValueError(f"{url}/health answered status {status} with {body[:80]!r}, not a fastserve-jax "
                         "server's JSON object: is it one?")
    if status != 200:
        raise ValueError(f"{url}/health answered status {status} ({health.get('status', '?')}), not 200"
                         + ("; wait until it is ready" if status == 503 else ""))
    return health
