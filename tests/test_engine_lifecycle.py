"""The engine loop's lifecycle behind the server's AsyncEngine, over a stand-in engine (no
model, no compile): what the front end sees when the loop itself dies."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from fastserve_jax.config import SamplingParams
from fastserve_jax.serve.async_engine import AsyncEngine


class StandInEngine:
    """Just what EngineLoop reads of an LLMEngine; add_request raises what `add_error` holds."""

    def __init__(self, add_error: BaseException | None = None) -> None:
        self.add_error = add_error
        self.kv = SimpleNamespace(num_usable_blocks=64)
        self.cfg = SimpleNamespace(scheduler="fcfs", max_model_len=64)
        self.context_limit = 64
        self.profile_provisional = False
        self.runner = SimpleNamespace(compiler=SimpleNamespace(background_done=lambda: True),
                                      shapes_pending=lambda: False, ran=set(), run_pending=lambda s: False)
        self.closed = False

    def has_unfinished(self) -> bool:
        return False

    def add_request(self, *args, **kwargs):
        raise self.add_error

    def close(self) -> None:
        self.closed = True


def test_an_engine_thread_that_dies_fails_its_requests_and_reports_it():
    """An exception the loop does not expect (here from add_request) ended the engine thread
    silently: the request waited forever and /health stayed 200. As with a dead engine
    process, the front end now fails what was live, marks the engine lost and calls on_fatal."""
    ae, deltas, fatal = _one_request(lambda: StandInEngine(RuntimeError("a broken tokenizer")))
    assert len(deltas) == 1 and "a broken tokenizer" in deltas[0][1].error
    assert ae.health.lost and "RuntimeError" in ae.health.lost and fatal and ae.num_pending == 0


def _one_request(build):
    """Start an AsyncEngine over build(), submit one request, read its deltas, stop: (the
    engine, the deltas, on_fatal's calls)."""
    fatal = []

    async def scenario():
        ae = AsyncEngine(lambda stopping: build(), max_pending=8)
        ae.on_fatal = lambda: fatal.append(1)
        ae.start()
        while not ae.health.ready:
            await asyncio.sleep(0.01)
        group = ae.submit([([1, 2, 3], SamplingParams(max_tokens=4))], 0.0)
        deltas = await asyncio.wait_for(_all(group), 5)
        await ae.stop(5)
        return ae, deltas

    return (*asyncio.run(scenario()), fatal)


async def _all(group):
    return [item async for item in group]


class LosesItsWorker(StandInEngine):
    """A multi-host leader whose worker is gone: every step fails on the plan channel."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[str] = set()

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def add_request(self, ids, params, request_id, arrival_time):
        self.live.add(request_id)

    def abort(self, request_id: str) -> None:
        from fastserve_jax.sharding.distributed import ChannelClosed
        raise ChannelClosed("PlanChannel: worker 1 is gone")

    def step(self):
        from fastserve_jax.sharding.distributed import ChannelClosed
        raise ChannelClosed("PlanChannel: worker 1 is gone")


def test_a_lost_multihost_worker_makes_the_engine_lost_not_failing():
    """With a worker gone no step can run again: the loop used to count it as one more faulty
    iteration, kept /health at "engine failing ... until an iteration succeeds" and spun through
    failing steps (the abort of the failed request fails too, leaving it unfinished). Now the
    engine is lost: the request fails naming the worker, and on_fatal stops the server."""
    ae, deltas, fatal = _one_request(LosesItsWorker)
    assert len(deltas) == 1 and "worker 1 is gone" in deltas[0][1].error
    assert ae.health.lost and "worker 1 is gone" in ae.health.lost and fatal


def test_a_timing_observer_that_raises_loses_no_delta():
    """The metrics' observer ran before each delta was handed on: one that raised dropped that
    delta and the rest of its batch, and a dropped final delta hung its request (a probe,
    2026-12-07). Deltas now go out first, and the observer's error is logged."""
    from fastserve_jax.serve.engine_loop import Delta

    ae = AsyncEngine(lambda stopping: StandInEngine(), max_pending=8)
    queues = [asyncio.Queue(), asyncio.Queue()]
    for i, q in enumerate(queues):
        ae._live[f"r{i}"] = (SimpleNamespace(queue=q, request_ids=["r0", "r1"], n=1), i)

    def observer(rid, delta, prompt):
        raise RuntimeError("a metrics bug")

    ae.on_timing = observer
    ae._deliver([(f"r{i}", i, Delta("x", [5], None, finish_reason="stop")) for i in range(2)])
    assert [q.qsize() for q in queues] == [1, 1] and not ae._live
