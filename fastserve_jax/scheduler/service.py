"""Remaining work in decode slots, the service unit of the size-based policies (srpt, gittins).

A decode slot is one sequence's share of a full decode iteration: decode_time(max_num_seqs)
/ max_num_seqs seconds. A decode token costs one slot. A prefill blocks the whole
iteration, so a prefill of t seconds costs t / slot slots: with OPT-13B on an A100, a
1,000-token prompt is worth about 110 decode tokens.
"""

from __future__ import annotations

from fastserve_jax.cost_model import CostModel
from fastserve_jax.request import Request


class ServiceMeter:
    def __init__(self, cost: CostModel, max_num_seqs: int) -> None:
        self.cost = cost
        self.slot = cost.decode_time(max_num_seqs) / max_num_seqs

    def prefill_slots(self, req: Request) -> float:
        """Slots of prefill (or recomputation) still ahead of `req`; 0 once it decodes."""
        pending = req.num_pending_tokens
        if pending <= 1:
            return 0.0
        return self.cost.prefill_time(pending, req.num_computed_tokens) / self.slot
