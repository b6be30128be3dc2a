"""The engine's counters: where the loop's time goes, tokens, recomputation and swap work,
and the monitoring snapshot that serve/ exports as Prometheus metrics."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from fastserve_jax.kv_cache import KVLocation, KVManager


PHASES = ("schedule", "assemble", "device", "postprocess")      # EngineStats' split of an iteration


@dataclass
class EngineStats:
    """Cumulative wall-clock split of the loop (seconds), for host-overhead measurements.

    schedule: policy + KV allocation + swap planning; assemble: building padded host arrays;
    device: from dispatch until the sampled tokens are on the host (swap copies issued on the
    way included); postprocess: appending tokens, stop checks, detokenizing, freeing finished
    requests. swap_stall: part of `device` and `schedule` spent waiting for a swap copy the
    step needed."""

    iterations: int = 0
    schedule: float = 0.0
    assemble: float = 0.0
    device: float = 0.0
    postprocess: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prompt_tokens: int = 0              # prompt tokens of requests whose prefill is done (first token out)
    generated_tokens: int = 0           # tokens sampled and appended to outputs
    recomputations: int = 0             # requests that lost their KV and were prefilled again
    recomputed_tokens: int = 0          # computed tokens those requests lost (prefilled again)
    device_drops: int = 0               # of the recomputations, those whose KV was on the device
    busy: float = 0.0                   # seconds of iterations (the base of the stall bound)
    swap_out_blocks: int = 0            # device -> host
    swap_in_blocks: int = 0             # host -> device
    swap_out_bytes: int = 0             # copied over all devices (KVTransfer.host_block_bytes a block)
    swap_in_bytes: int = 0
    swap_stall: float = 0.0             # seconds the loop waited for a swap copy to land, and
    swap_fused_seconds: float = 0.0     # of those, the fused copies' estimate (swap_copies.py)
    swap_ins_on_demand: int = 0         # swap-ins the step had to wait for (not uploaded ahead)
    swap_ins_ahead: int = 0             # uploads issued ahead of need (proactive)
    swap_outs_on_demand: int = 0        # evictions a scheduled request needed room for
    swap_outs_ahead: int = 0            # offloads ahead of need (proactive)
    swap_link_out_bytes_per_second: float = 0.0   # one device's link, measured at start (0: no swapping)
    swap_link_in_bytes_per_second: float = 0.0
    launches: dict = field(default_factory=dict)

    @property
    def host(self) -> float:
        return self.schedule + self.assemble + self.postprocess

    def count_drops(self, dropped: list, kv: KVManager) -> None:
        """Requests whose KV a plan drops, to be prefilled again (before the plan is applied).
        One whose KV was on the host left the device before, counted then as a swap-out."""
        self.recomputations += len(dropped)
        self.recomputed_tokens += sum(r.num_computed_tokens for r in dropped)
        self.device_drops += sum(kv.location(r) is KVLocation.DEVICE for r in dropped)

    @contextlib.contextmanager
    def phase(self, name: str):
        """`with stats.phase("schedule"): ...` adds the block's wall-clock time to that field."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, name, getattr(self, name) + time.perf_counter() - t0)


def snapshot(st: EngineStats, requests: dict, last_scheduled: set[str], kv: KVManager, scheduler) -> dict:
    """Gauges and counters for monitoring (serve/ exports them as Prometheus metrics).

    Requests are running (in the latest iteration), paused (started, KV on the device,
    not in the latest iteration), swapped (KV on the host, or in flight between the pools)
    or waiting (no KV: not started, or dropped for recomputation). Counters end in _total."""
    running = paused = swapped = waiting = 0
    for rid, req in requests.items():
        where = kv.location(req)
        if rid in last_scheduled:
            running += 1
        elif where is KVLocation.DEVICE:
            paused += 1
        elif where is KVLocation.NONE:
            waiting += 1
        else:
            swapped += 1
    return dict(
        queue_lengths=scheduler.queue_lengths(),
        requests_running=running, requests_paused=paused, requests_swapped=swapped, requests_waiting=waiting,
        kv_device_used_blocks=kv.num_used_blocks, kv_device_total_blocks=kv.num_usable_blocks,
        kv_host_used_blocks=kv.num_host_used_blocks, kv_host_total_blocks=kv.num_host_blocks,
        prompt_tokens_total=st.prompt_tokens, generation_tokens_total=st.generated_tokens,
        recomputations_total=st.recomputations, recomputed_tokens_total=st.recomputed_tokens,
        device_drops_total=st.device_drops,
        prefix_cache_queries_total=kv.queries, prefix_cache_hits_total=kv.hits,
        prefix_cache_requeries_total=kv.requeries, prefix_cache_rehits_total=kv.rehits,
        swap_in_shared_blocks_total=kv.swap_in_shared, swap_out_pinned_blocks_total=kv.swap_out_pinned,
        busy_seconds_total=st.busy, swap_stall_fraction=st.swap_stall / st.busy if st.busy else 0.0,
        swap_out_blocks_total=st.swap_out_blocks, swap_in_blocks_total=st.swap_in_blocks,
        swap_out_bytes_total=st.swap_out_bytes, swap_in_bytes_total=st.swap_in_bytes,
        swap_stall_seconds_total=st.swap_stall, swap_fused_seconds_total=st.swap_fused_seconds,
        iterations_total=st.iterations,
        swap_outs_total=st.swap_outs_on_demand + st.swap_outs_ahead,        # requests, not blocks
        swap_link_out_bytes_per_second=st.swap_link_out_bytes_per_second,
        swap_link_in_bytes_per_second=st.swap_link_in_bytes_per_second,
        **{f"phase_{k}_seconds_total": getattr(st, k) for k in PHASES})
