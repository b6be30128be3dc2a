"""Applying plans to the KV ledger and the requests: the part of an iteration that the engine
and the simulator share. Pure Python; the device copies are the caller's (runner or
transfer-time model), in the order returned:

    apply_plan(plan)    drops, swap-outs, then for each scheduled request: swap-in of KV on
                        the host, allocation of its new tokens' blocks (with prefix caching a
                        prefilling request first takes the cached blocks of its prefix, and
                        its entry in the plan shrinks to the tokens left to compute; then its
                        full blocks get keys, so that a later request of the same plan may
                        take them: the runner puts the decode launch first and the prefill
                        chunks in plan order, and a launch writes its K/V before any of its
                        rows reads, so the blocks are written before the later request reads
                        them). The swap-out copies must be issued before the swap-in copies (a
                        swap-in may reuse a block just freed) and both before the step.
    apply_ahead(ahead)  the swap policy's moves for later iterations, issued after the step:
                        offloads free their device blocks at once, uploads hold theirs, and
                        the caller marks them landed (`KVManager.finish_swap_in`) once the copy
                        is in: the engine checks at the start of each iteration, before its plan
                        (`SwapCopies.land`, swap_copies.py), the simulator when the modelled copy ends.
Both add the ledger's fills to their swap-outs (`KVManager.take_fills`: with prefix caching, the
blocks of a host copy that stayed on the device while others held them, copied once they do not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastserve_jax.kv_cache import ON_HOST, KVManager, SwapCopy
from fastserve_jax.request import Request, RequestStatus
from fastserve_jax.scheduler.base import Plan, ScheduledRequest


@dataclass
class Copies:
    swap_out: list[SwapCopy] = field(default_factory=list)   # device -> host
    swap_in: list[SwapCopy] = field(default_factory=list)    # host -> device
    fills: int = 0      # the last swap_out copies that are fills (take_fills), not requests moved


@dataclass
class SwapAhead:
    """A swap policy's moves for later iterations (see swap_policy.py)."""

    offload: list[Request] = field(default_factory=list)   # device -> host: paused, next run far off
    upload: list[Request] = field(default_factory=list)    # host -> device: next run soon

    def __bool__(self) -> bool:
        return bool(self.offload or self.upload)


def drop_kv(req: Request, kv: KVManager) -> None:
    """The request loses its KV wherever it is and will prefill again."""
    kv.free(req)
    req.num_computed_tokens = 0
    req.status = RequestStatus.WAITING
    req.num_preemptions += 1


def apply_plan(plan: Plan, kv: KVManager, now: float) -> Copies:
    copies = Copies()
    for req in plan.preempted:
        drop_kv(req, kv)
    where = kv.where
    back = {s.request.request_id for s in plan.scheduled if where.get(s.request.request_id) in ON_HOST}
    borrow = sum(kv.host_blocks(s.request) for s in plan.scheduled if s.request.request_id in back) if back else 0
    for req in plan.swapped_out:
        copies.swap_out.append(kv.swap_out(req, borrow))
    for i, s in enumerate(plan.scheduled):
        req = s.request
        if back and req.request_id in back:       # not uploaded ahead of time: comes back now
            copies.swap_in.append(kv.swap_in(req))
            kv.finish_swap_in(req)
        # prefilling (prefix_cache.py); a 1-token prompt finds nothing but counts its lookup, as in vLLM
        if kv.caching and (req.num_computed_tokens + 1 < req.num_known_tokens or req.num_known_tokens == 1):
            hit = kv.match_prefix(req, s.num_tokens, s.cached)
            if hit or s.cached:     # fewer found than the policy expected: compute no more than it counted
                s = plan.scheduled[i] = ScheduledRequest(req, s.num_tokens - max(hit, s.cached))
                if hit and req.metrics.first_token_time is None and not req.num_preemptions:   # its first prefill
                    req.num_cached_tokens = min(req.num_cached_tokens + hit, req.num_prompt_tokens)
        kv.allocate(req, s.num_tokens)
        if kv.caching:      # later requests of this plan may match them: see the module docstring
            kv.register(req, s.num_tokens)
        req.status = RequestStatus.RUNNING
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = now
    fills = kv.take_fills()                 # owed since the last batch of copies or by this plan's releases
    copies.swap_out += fills
    copies.fills = len(fills)
    if kv.caching:
        kv.plan_issued()
    return copies


def apply_ahead(ahead: SwapAhead, kv: KVManager) -> Copies:
    """Uploads come back SWAPPING_IN; call kv.finish_swap_in once their copy has landed."""
    out = [kv.swap_out(r) for r in ahead.offload]
    return Copies(out + kv.take_fills(), [kv.swap_in(r) for r in ahead.upload])
