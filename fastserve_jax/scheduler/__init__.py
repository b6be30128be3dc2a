"""Scheduling policies behind one interface (see base.py for the engine's side of it).

    fcfs            Orca-style iteration-level batching, run to completion (the paper's baseline)
    mlfq            multi-level feedback queues, every request enters the top queue
    skip-join-mlfq  FastServe: enter the queue whose quantum covers the prefill (default)
    gittins         Gittins index over output lengths learned online
    predictive      Gittins index of each request's own predicted output-length distribution
    srpt            oracle shortest remaining processing time (reads true lengths; benchmarks only)
"""

from __future__ import annotations

from fastserve_jax.config import SchedulerConfig
from fastserve_jax.cost_model import CostModel
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.scheduler.base import Limits, Plan, ScheduledRequest, Scheduler
from fastserve_jax.scheduler.fcfs import FCFSScheduler
from fastserve_jax.scheduler.gittins import GittinsScheduler
from fastserve_jax.scheduler.mlfq import MLFQScheduler
from fastserve_jax.scheduler.skip_join import SkipJoinMLFQScheduler
from fastserve_jax.scheduler.predictive import PredictiveScheduler
from fastserve_jax.scheduler.srpt import SRPTScheduler

POLICIES: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (FCFSScheduler, MLFQScheduler, SkipJoinMLFQScheduler, GittinsScheduler,
                              PredictiveScheduler, SRPTScheduler)}
DEFAULT_POLICY = SkipJoinMLFQScheduler.name


def make_scheduler(name: str, limits: Limits, kv: KVManager, config: SchedulerConfig | None = None,
                   cost_model: CostModel | None = None) -> Scheduler:
    """A policy by name. skip-join-mlfq, gittins, predictive and srpt need `cost_model`."""
    if name not in POLICIES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](limits, kv, config, cost_model)


__all__ = ["Limits", "Plan", "ScheduledRequest", "Scheduler", "make_scheduler", "POLICIES", "DEFAULT_POLICY"]
