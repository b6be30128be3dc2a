"""The engine's side of swapping: the device copies behind each iteration's KV moves.

kv_plan.py applies a plan (and the swap policy's moves) to the ledger; this issues the copies
on the runner (runner/swap_ops.py) and follows them until they land:

    on_demand(copies)   a plan's swap-outs, then its swap-ins, before its step; waiting on
                        those is stall, charged to the swap policy
    fused copies        a swap moved by the fused path (runner/kv_transfer.py: every swap on
                        the CPU, small ones on accelerators) copies inside calls that run in
                        the device's queue between steps, so the steps wait for it, on demand
                        or ahead, and no host-side wait sees it: its time is estimated from
                        the link's probed speed (an upper estimate: fused copies ran faster
                        than `device_put`'s), counted as stall and charged to the policy
    (start)             the link's speed, for the swap policy's per-step upload bound
    ahead(plan, ...)    after the step: the swap policy's offloads and uploads for later
                        iterations (swap_policy.py), which overlap the step
    land(wait)          at the start of an iteration: uploads whose copies are in go into the
                        cache (with `wait`, all of them, the wait counted as stall); finished
                        swap-outs are marked
"""

from __future__ import annotations

from fastserve_jax.kv_cache import KVLocation, KVManager
from fastserve_jax.kv_plan import Copies, SwapAhead, apply_ahead
from fastserve_jax.request import Request
from fastserve_jax.runner.swap_ops import moves_of
from fastserve_jax.stats import EngineStats
from fastserve_jax.swap_policy import SwapPolicy


class SwapCopies:
    def __init__(self, runner, kv: KVManager, policy: SwapPolicy, stats: EngineStats) -> None:
        self.runner, self.kv, self.policy, self.stats = runner, kv, policy, stats
        self.uploading: list[Request] = []          # uploads issued, to land in a later iteration
        self.swapping_out: list[Request] = []       # swap-outs whose copy may still be in flight
        # The link's speed, measured once here (KVTransfer.probe_link): it bounds the uploads
        # issued after a step to what the link carries during one, and under reactive swapping
        # turns the stall credit into blocks (swap_policy.py), as the simulator does with its
        # cost model's transfer figures.
        self.link = runner.transfer.probe_link(runner.caches) if policy.swaps else None
        self._fused_charged = 0.0                  # fused_seconds() charged to the policy so far
        if self.link is not None:
            policy.seconds_per_block = self.link.in_seconds_per_block
            stats.swap_link_out_bytes_per_second = self.link.bytes_per_second("out")
            stats.swap_link_in_bytes_per_second = self.link.bytes_per_second("in")

    def land(self, wait: bool = False) -> None:
        swaps = self.runner.swaps
        for req in self.uploading:
            if self.kv.location(req) is KVLocation.SWAPPING_IN and (wait or swaps.transfer.in_landed(req.request_id)):
                swaps.land(req.request_id)
                self.kv.finish_swap_in(req)
        self.uploading = [r for r in self.uploading if self.kv.location(r) is KVLocation.SWAPPING_IN]
        for req in self.swapping_out:
            if self.kv.location(req) is KVLocation.SWAPPING_OUT and swaps.transfer.out_landed(req.request_id):
                self.kv.finish_swap_out(req)
        self.swapping_out = [r for r in self.swapping_out if self.kv.location(r) is KVLocation.SWAPPING_OUT]

    def on_demand(self, copies: Copies) -> None:
        if not (copies.swap_out or copies.swap_in):
            return
        swaps = self.runner.swaps
        swaps.swap_out(moves_of(copies.swap_out))
        stalled = swaps.transfer.stall_seconds
        swaps.swap_in_now(moves_of(copies.swap_in))
        self.policy.charge(swaps.transfer.stall_seconds - stalled)
        self._charge_fused()
        self.stats.swap_ins_on_demand += len(copies.swap_in)
        self.stats.swap_outs_on_demand += len(copies.swap_out) - copies.fills    # requests, not fills

    def ahead(self, plan, requests, scheduler, now: float) -> None:
        ahead = self.policy.plan_ahead(plan, requests, scheduler, now)
        self.swapping_out += plan.swapped_out
        if ahead:
            self.issue(ahead)

    def issue(self, ahead: SwapAhead) -> None:
        """Apply moves ahead of need to the ledger and issue their copies."""
        copies = apply_ahead(ahead, self.kv)
        self.runner.swaps.swap_out(moves_of(copies.swap_out))
        self.runner.swaps.start_swap_in(moves_of(copies.swap_in))
        self._charge_fused()
        self.swapping_out += ahead.offload
        self.uploading += ahead.upload
        self.stats.swap_ins_ahead += len(ahead.upload)
        self.stats.swap_outs_ahead += len(ahead.offload)

    def fused_seconds(self) -> float:
        """The estimated time of every fused copy so far (see the module docstring)."""
        t = self.runner.transfer
        if self.link is None or t is None:
            return 0.0
        return t.fused_blocks_out * self.link.out_seconds_per_block + t.fused_blocks_in * self.link.in_seconds_per_block

    def _charge_fused(self) -> None:
        now = self.fused_seconds()
        self.policy.charge(now - self._fused_charged)
        self._fused_charged = now

    def forget(self, req: Request) -> None:
        """Drop a request's host copy or pending upload (it finished, or its KV was dropped)."""
        if self.runner.swaps is not None:
            self.runner.swaps.discard(req.request_id)

    def count(self) -> None:
        """The transfer's totals into the engine's stats."""
        t = self.runner.transfer
        if t is None:
            return
        st = self.stats
        st.swap_out_blocks, st.swap_in_blocks = t.blocks_out, t.blocks_in
        st.swap_out_bytes, st.swap_in_bytes = t.bytes_out, t.bytes_in
        st.swap_fused_seconds = self.fused_seconds()
        st.swap_stall = t.stall_seconds + st.swap_fused_seconds
