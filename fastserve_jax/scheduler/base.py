"""The seam between the engine and scheduling policies. Pure Python; never imports jax.

Each iteration the engine asks the policy for a `Plan`: which requests run and with how
many tokens each (a prefill chunk, or 1 for decode), and which lose their KV to be
recomputed later. The policy sees the KV manager read-only (`blocks_needed`,
`num_free_blocks`); the engine applies the plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fastserve_jax.kv_cache import KVManager
from fastserve_jax.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_tokens: int


@dataclass
class Plan:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)   # KV dropped: recompute later

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int
    max_num_batched_tokens: int


class Scheduler(ABC):
    """A policy over the live requests. Method pairs: add/remove, schedule/(engine applies)."""

    name: str = ""

    def __init__(self, limits: Limits, kv: KVManager) -> None:
        self.limits = limits
        self.kv = kv

    @abstractmethod
    def add(self, req: Request) -> None:
        """A newly admitted request."""

    @abstractmethod
    def remove(self, req: Request) -> None:
        """A finished or aborted request leaves the policy."""

    @abstractmethod
    def schedule(self, now: float) -> Plan:
        """The next iteration's plan."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of live requests."""
