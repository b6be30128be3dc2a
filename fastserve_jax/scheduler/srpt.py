"""Oracle shortest-remaining-processing-time, for benchmarks only: the lower bound.

It reads the true output length from `SamplingParams.max_tokens`, which is exact in the
simulator (requests there end at max_tokens) and only an upper bound in real serving, where
EOS may come first. Remaining work is in decode slots (see service.py): the prefill still
ahead plus the tokens still to generate.
"""

from __future__ import annotations

from fastserve_jax.request import Request
from fastserve_jax.scheduler.index_policy import IndexPolicy
from fastserve_jax.scheduler.service import ServiceMeter


class SRPTScheduler(IndexPolicy):
    name = "srpt"
    needs_cost_model = True

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        self.meter = ServiceMeter(self._require_cost_model(), limits.max_num_seqs)

    def use_cost_model(self, cost_model, config) -> None:
        super().use_cost_model(cost_model, config)
        self.meter = ServiceMeter(cost_model, self.limits.max_num_seqs)

    def key(self, req: Request) -> float:
        return self.meter.prefill_slots(req) + (req.sampling.max_tokens - len(req.output_token_ids))
