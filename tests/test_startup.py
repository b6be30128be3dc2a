"""Startup as a user meets it: a second start of the same command loads every executable from
the persistent cache (the cache key does not drift between identical runs), and the status
line says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generate(cache: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTSERVE_JAX_COMPILE_CACHE=os.path.join(cache, "xla"),
               FASTSERVE_JAX_CACHE=os.path.join(cache, "params"))
    return subprocess.run([sys.executable, "-m", "fastserve_jax", "generate", "count from 3 to 12:", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _compiled(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"compiled (\d+) executables?, (\d+)/(\d+) from the persistent cache", stderr)
    assert m, stderr[-2000:]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_second_start_loads_every_executable_from_the_cache(tmp_path):
    first = _generate(str(tmp_path))
    assert first.returncode == 0 and "output: ' 3 4 5 6 7 8 9 10 11 12'" in first.stdout, first.stderr[-2000:]
    n, hits, asked = _compiled(first.stderr)
    assert n > 0 and hits < asked                      # an empty cache compiled something itself
    second = _generate(str(tmp_path))
    outputs = lambda p: [ln for ln in p.stdout.splitlines() if ln.startswith("output:")]
    assert second.returncode == 0 and outputs(second) == outputs(first)
    n2, hits2, asked2 = _compiled(second.stderr)
    # the first start also profiled the cost model (cached on disk since), so it compiled more
    assert 0 < n2 <= n and hits2 == asked2 == n2, second.stderr[-2000:]
    status = [ln for ln in second.stderr.splitlines() if ln.startswith("load ")]
    assert status and "first token" in status[0]
