"""A request's entry into the engine and its exit (LLMEngine.add_request and _finish), each
safe against an exception in the middle of it: a caller's own signal handler (a timeout's
SIGALRM) can land anywhere, and a bug in a policy's bookkeeping raises there too.

- Entry is all or nothing: a request the scheduler or the swap policy failed to take is
  taken back out and the error raised, so the caller never holds a request the engine
  counts as live but the caller never learned of (an orphan kept `has_unfinished()` true
  for good: `set_scheduler` refused, and the repair of a lost KV cache, which waits for an
  idle engine, never ran; found by a probe, 2026-12-07).
- Exit may be tried again: the request leaves the live set only once every release ran.
  Where one raises, it stays live and an abort runs them again (each is idempotent: a
  request the policy, the KV pools or the copies no longer hold is a no-op). It used to
  leave the request live without its detokenizer, so every later abort raised KeyError and
  the request held its KV and failed every step of a server (the same probe).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from fastserve_jax.request import Request, RequestStatus, stop_reason

# `engine` below is the LLMEngine (engine.py imports this module, so it is not imported here)

if TYPE_CHECKING:
    from fastserve_jax.detokenizer import IncrementalDetokenizer


def register_request(engine, req: Request, detok: IncrementalDetokenizer) -> None:
    """Make `req` live: the engine's request and detokenizer tables, the policy, the swap policy."""
    rid = req.request_id
    try:
        engine.scheduler.add(req)
        engine.swap.on_arrival(req, req.arrival_time)
        engine._detok[rid] = detok
        engine._requests[rid] = req
    except BaseException:       # also one that came between the policies and the tables: the policy
        engine._requests.pop(rid, None)     # held a request the engine did not (a KeyError at the next step)
        engine._detok.pop(rid, None)
        for undo in (engine.scheduler.remove, engine.swap.forget):
            with contextlib.suppress(Exception):
                undo(req)
        raise


def finish_request(engine, req: Request, reason: str, now: float) -> None:
    """`req` is done (finished, or aborted): its text flushed and every resource it held
    released, then it leaves the live set."""
    detok = engine._detok.pop(req.request_id, None)     # None: tried before, and a release raised
    if detok is not None:           # the text it held back (an output ending inside a character)
        req.output_text, hit = detok.flush(req.output_text, reason != "abort")
        req.status, req.finish_reason = RequestStatus.FINISHED, "stop" if hit else reason
        req.stop_reason = stop_reason(req, detok.matched, engine.tokenizer.eos_token_id)
    if req.finish_reason is None:   # the flush raised the first time
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
    req.metrics.finish_time = now
    engine.scheduler.remove(req)
    if engine.predictor is not None:
        engine.predictor.on_finish(req)
    engine.kv.free(req)
    engine.copies.forget(req)
    engine.swap.forget(req)
    del engine._requests[req.request_id]


def recover_after_fault(engine, in_step: bool = True) -> bool:
    """After an exception, once its requests are aborted (LLM.generate's, the server's failed
    step): with no request left, a KV cache the failed step took (donated) is made anew and
    the ledger starts over, as the exception may have landed in the middle of an update
    (blocks leaked for good); with requests left, a step's prefix keys are forgotten (it may
    have given them to blocks it never wrote). `in_step`: the exception came from inside a
    step (a Ctrl-C taken between steps keeps the ledger and the cache). Returns whether the
    KV cache was lost."""
    idle = not engine.has_unfinished()
    lost = idle and engine.runner.restore_lost_caches()
    if idle and (lost or in_step):
        engine.kv.start_over()
    elif engine.kv.caching and in_step:
        engine.kv.reset()
    return lost
