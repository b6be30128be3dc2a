"""Scheduling policies behind one interface (see base.py)."""

from __future__ import annotations

from fastserve_jax.kv_cache import KVManager
from fastserve_jax.scheduler.base import Limits, Plan, ScheduledRequest, Scheduler
from fastserve_jax.scheduler.fcfs import FCFSScheduler

POLICIES: dict[str, type[Scheduler]] = {FCFSScheduler.name: FCFSScheduler}


def make_scheduler(name: str, limits: Limits, kv: KVManager) -> Scheduler:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](limits, kv)


__all__ = ["Limits", "Plan", "ScheduledRequest", "Scheduler", "make_scheduler", "POLICIES"]
