"""Skip-join's joins on predicted service (SchedulerConfig.prompt_neighbors; beyond the
FastServe paper). Pure Python and numpy.

The paper's skip-join places a request by its prefill time, the part of its service known at
arrival, so that it is not demoted through queues it would overrun at once. Where prompt
lengths are seen to rank answer lengths (templated traffic: prompt_lengths.py's gate), the
answer is known in part too, and a request predicted to run long skips the queues it would
be demoted from: it joins the highest queue whose quantum covers its prefill plus its
predicted median answer at the decode time of a full batch of such requests. FIFO within a
queue, demotion and starvation promotion are skip-join's as before. Azure trace, bursts of
1.5x / 3x / 8x with full device KV: latency per token 1.47x / 1.47x / 1.45x better than
fcfs's became 2.19x / 2.30x / 1.93x, mean JCT 0.92-1.02x fcfs's became 0.81-0.83x; at 0.95x
of capacity mean JCT 1.24x became 0.97x (docs/scheduling_log.md, "Skip-join joins on
predicted service"). Traffic whose answers do not follow its prompts never opens the gate,
and there every decision is the paper's join.
"""

from __future__ import annotations

from typing import Callable, Iterable

from fastserve_jax.cost_model import CostModel
from fastserve_jax.request import Request
from fastserve_jax.scheduler.prompt_lengths import PromptLengthModel, running_pairs


class PredictedJoins:
    """The (prompt, length) pairs of finished requests, and the queue each live request joined
    on its predicted service (only those that arrived, or were placed again, with the gate open)."""

    def __init__(self, window: int, neighbours: int) -> None:
        self.model = PromptLengthModel(window, neighbours)
        self.levels: dict[str, int] = {}        # request id -> the queue its predicted service picked
        self.finishes = 0                       # since the model was last refreshed

    def ranks(self) -> bool:
        return self.model.ranks()

    def place(self, reqs: list[Request], quanta: list[float], cost: CostModel, seqs: int) -> list[int]:
        """Each request's queue (indices into `quanta`, in seconds) by its predicted service, and
        remember it."""
        preds = self.model.predict_many([r.num_prompt_tokens for r in reqs], [0] * len(reqs))
        out, level_of = [], {}          # prompt length -> queue: one prediction per length (predict_many)
        for req, pred in zip(reqs, preds):
            n = req.num_prompt_tokens
            level = level_of.get(n)
            if level is None:
                answer = pred.median()
                t = cost.prefill_time(n) + answer * cost.decode_time(seqs, int(seqs * (n + answer)))
                level = level_of[n] = next((i for i, q in enumerate(quanta) if q >= t), len(quanta) - 1)
            self.levels[req.request_id] = level
            out.append(level)
        return out

    def finished(self, req: Request, length: int) -> None:
        self.model.observe(req.num_prompt_tokens, length)
        self.finishes += 1

    def refresh(self, live: Iterable[Request], joined: Callable[[Request], int], quanta: list[float],
                cost: CostModel, seqs: int) -> list[tuple[Request, int]]:
        """Refresh the model (running requests as censored lengths) and, where it ranks, place
        again the live requests that have not started and still sit in the queue they joined
        (`joined(req)`; not promoted): in a burst most arrive before the first finishes.
        Returns the (request, queue) moves."""
        self.finishes = 0
        live = list(live)
        self.model.refresh(running_pairs(live))
        if not self.model.ranks():
            return []
        waiting = [r for r in live if not r.num_computed_tokens and r.queue_level == joined(r)]
        return [(r, level) for r, level in zip(waiting, self.place(waiting, quanta, cost, seqs))
                if r.queue_level != level]
