"""The periodic stats line of the server's log (vLLM's "Engine 000: Avg prompt throughput ..."
line, as vLLM writes it, then this engine's own figures; off with --disable-log-stats): every
STATS_INTERVAL_S while requests are served, from the engine's snapshot (the one /metrics
exports), nothing while the server is idle. The prefix cache hit rate is the interval's
(vLLM's is over its last 1,000 requests)."""

from __future__ import annotations

import asyncio
import logging
import time

from fastserve_jax.serve.async_engine import AsyncEngine
from fastserve_jax.serve.prometheus import engine_snapshot

log = logging.getLogger("fastserve_jax.serve")
STATS_INTERVAL_S = 10.0       # vLLM's VLLM_LOG_STATS_INTERVAL


class StatsLine:
    """The line for each snapshot: throughputs over the time since the last one, the first
    over the time since `start` (the counters then at 0), as vLLM's logger counts from its
    start (until 2026-12-07 the first snapshot was only a base, and the work served before it
    was in no line)."""

    def __init__(self, start: float) -> None:
        self.last: tuple[float, dict] = (start, {})

    def line(self, s: dict, now: float) -> str | None:
        """None where nothing was computed since the last snapshot and nothing is live (idle)."""
        last, self.last = self.last, (now, s)
        if now <= last[0]:
            return None
        dt, before = now - last[0], last[1]
        prompt = s["prompt_tokens_total"] - before.get("prompt_tokens_total", 0)
        generated = s["generation_tokens_total"] - before.get("generation_tokens_total", 0)
        live = sum(s[f"requests_{k}"] for k in ("running", "paused", "swapped", "waiting"))
        if not (prompt or generated or live):
            return None
        usage = {pool: 100 * s[f"kv_{pool}_used_blocks"] / s[f"kv_{pool}_total_blocks"]
                 if s[f"kv_{pool}_total_blocks"] else 0.0 for pool in ("device", "host")}
        queries = s.get("prefix_cache_queries_total", 0) - before.get("prefix_cache_queries_total", 0)
        hits = s.get("prefix_cache_hits_total", 0) - before.get("prefix_cache_hits_total", 0)
        # vLLM's line as it writes it (log scrapers read it; "Waiting" counts what vllm:num_requests_waiting
        # does, the device pool is its "GPU" cache), then this engine's own figures
        waiting = sum(s[f"requests_{k}"] for k in ("waiting", "paused", "swapped"))
        return (f"Engine 000: Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: "
                f"{generated / dt:.1f} tokens/s, Running: {s['requests_running']} reqs, Waiting: {waiting} reqs, "
                f"GPU KV cache usage: {usage['device']:.1f}%, Prefix cache hit rate: "
                f"{100 * hits / queries if queries else 0.0:.1f}%; of those waiting: paused {s['requests_paused']}, "
                f"swapped {s['requests_swapped']}; host KV usage: {usage['host']:.1f}%")


async def log_stats(engine: AsyncEngine, interval: float = STATS_INTERVAL_S) -> None:
    """The logging task (cancelled when the app stops)."""
    stats = None
    while True:
        await asyncio.sleep(interval)
        h = engine.health
        if not h.ready or engine.stopped or h.lost:
            continue
        if stats is None:           # the counters start at 0 when the engine is ready
            stats = StatsLine(h.ready_at or time.monotonic())
        try:
            s = await engine.call(engine_snapshot)
        except RuntimeError:        # stopped or lost while the call waited
            continue
        text = stats.line(s, time.monotonic())
        if text is not None:
            log.info("%s", text)
