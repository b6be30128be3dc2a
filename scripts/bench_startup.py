"""Startup times side by side: the README's main command and `serve`, lazy (or background)
against full warm-up, with an empty and with a warm cache.

Each run is a fresh process with its own cache directories (compiled executables,
converted params, the profiled cost model): "cold" starts from empty ones, "warm" reuses
what the cold run of the same mode left. Times count from the command's start:

    generate   until both answers are printed (the process exits)
    serve      until /health is 200, and until a completion is answered

    python scripts/bench_startup.py                 # every cell (about 8 minutes on 2 cores)
    python scripts/bench_startup.py --only generate
    python scripts/bench_startup.py --python /tmp/bare/bin/python   # as the README's first command installs it
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["count from 3 to 12:", "count from 250 to 300:"]


PYTHON = [sys.executable]


def env_for(cache: str) -> dict:
    return dict(os.environ, FASTSERVE_JAX_COMPILE_CACHE=os.path.join(cache, "xla"),
                FASTSERVE_JAX_CACHE=os.path.join(cache, "params"), PYTHONPATH=REPO)


def run_generate(cache: str, warmup: str) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([*PYTHON, "-m", "fastserve_jax", "generate", *PROMPTS, "--warmup", warmup],
                       env=env_for(cache), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if p.returncode != 0 or " 12'" not in p.stdout or " 300'" not in p.stdout:
        raise RuntimeError(f"generate failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    summary = next((ln for ln in p.stderr.splitlines() if ln.startswith("load ")), "")
    m = re.search(r"compiled (\d+) executables?(?:, (\d+)/(\d+) from the persistent cache)?", summary)
    return dict(seconds=wall, compiled=int(m.group(1)) if m else None,
                cache_hits=f"{m.group(2)}/{m.group(3)}" if m and m.group(2) else "-")


def _free_port() -> int:
    from fastserve_jax.serve.bench_client import unused_port

    return unused_port()


def _get(url: str, body: dict | None = None, timeout: float = 120) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def run_serve(cache: str, warmup: str, extra: tuple[str, ...] = ()) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([*PYTHON, "-m", "fastserve_jax", "serve", "--port", str(port), "--warmup", warmup,
                             "--log-level", "warning", *extra], env=env_for(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while _get(f"{url}/health", timeout=5) != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {proc.stderr.read()[-2000:]}")
            if time.perf_counter() - t0 > 900:
                raise TimeoutError("serve not healthy after 900 s")
            time.sleep(0.1)
        healthy = time.perf_counter() - t0
        status = _get(f"{url}/v1/completions", dict(model="demo", prompt=PROMPTS[0], max_tokens=16, temperature=0))
        if status != 200:
            raise RuntimeError(f"completion answered {status}")
        return dict(healthy=healthy, answered=time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["generate", "serve"], default=None)
    ap.add_argument("--engine-process", action="store_true",
                    help="also time `serve --engine-process` (background warm-up), the engine in its own process")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter to start the commands with, e.g. a bare install's venv (a test "
                         "environment with torch makes transformers import it: seconds per start)")
    a = ap.parse_args(argv)
    PYTHON[0] = a.python
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastserve-startup-") as root:
        if a.only in (None, "generate"):
            for mode in ("lazy", "full"):
                cache = os.path.join(root, f"generate-{mode}")
                for temp in ("cold", "warm"):
                    r = run_generate(cache, mode)
                    rows.append(("generate (README)", mode, temp, f"{r['seconds']:6.1f} s", "",
                                 f"{r['compiled']} compiled, {r['cache_hits']} cache hits"))
                    print(*rows[-1], sep=" | ", flush=True)
        if a.only in (None, "serve"):
            variants = [("serve", "background", ()), ("serve", "full", ())]
            if a.engine_process:
                variants.append(("serve --engine-process", "background", ("--engine-process",)))
            for i, (command, mode, extra) in enumerate(variants):
                cache = os.path.join(root, f"serve-{i}")
                for temp in ("cold", "warm"):
                    r = run_serve(cache, mode, extra)
                    rows.append((command, mode, temp, f"{r['healthy']:6.1f} s", f"{r['answered']:6.1f} s", ""))
                    print(*rows[-1], sep=" | ", flush=True)
    print("\n| command | warm-up | cache | ready (generate: answers printed) | first completion | compiles |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
