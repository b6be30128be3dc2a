"""The simulator's settings (sim.py): the engine's limits and pools, the swap policy, predicted
output lengths, and how the engine's host work and async loop are modelled."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from fastserve_jax.config import SchedulerConfig, check_budget, check_positive_ints
from fastserve_jax.cost_model import CostModel
from fastserve_jax.sim_prediction import NoisyLengthOracle, sigma_for_tau
from fastserve_jax.swap_policy import SWAP_POLICIES
from fastserve_jax.workload import TraceRequest

PREDICTION_AT = ("prefill", "arrival")     # SimConfig.prediction_at


@dataclass(frozen=True)
class SimConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_capacity_tokens: int = 0          # 0: the cost model's
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    host_kv_capacity_tokens: int = 0     # host pool for swapped KV (0: none, so evictions recompute)
    swap_policy: str = "proactive"
    swap_reserve_blocks: int = 0
    max_iterations: int = 10_000_000     # a policy that cannot finish the trace fails instead of spinning
    # Predicted output lengths (sim_prediction.py): log-normal noise of this sigma on the true
    # length (0 = exact), or the sigma that gives this Kendall's tau on the trace's lengths
    # (in (0, 1]); None for both: no predictions. Noise draws come from prediction_seed.
    prediction_sigma: float | None = None
    prediction_tau: float | None = None
    prediction_seed: int = 0
    # When a request gets its first prediction: "prefill" (its first token, as the engine's
    # predictor, which reads the prefill's hidden states) or "arrival" (a prompt-only predictor).
    prediction_at: str = "prefill"
    # Add to each iteration this multiple of the wall-clock seconds this process spent in the
    # policy's own calls (scheduling, applying the plan to the KV ledger, the swap policy's
    # planning and both per-iteration updates): the same code the engine's thread runs between
    # its launches, at the same number of live requests (a multiple, because there it shares the
    # cores with the launches). The profile times the launches alone, so without it a policy
    # whose scheduling costs more host time looks faster than the engine runs it. 0: not
    # charged; above 0 the run is not deterministic (scripts/sim_fidelity.py uses it). The time
    # is recorded either way (metrics' policy_host_seconds, unscaled).
    host_time_scale: float = 0.0
    # The engine's async scheduling (EngineConfig.async_scheduling): the host work of an
    # iteration (the cost model's iteration_overhead, the charged policy time, issuing swap
    # copies, and the previous iteration's updates) runs while the device runs the launch
    # dispatched before, so in a busy period an iteration takes the longer of the two instead of
    # their sum, and an iteration's first tokens and finishes are read during the next one, once
    # its launch is done (sim.read_later). False: the synchronous loop.
    # async_overlap: the share of the shorter of the two that the longer hides (1: all, as on an
    # accelerator; on a CPU of N cores the host's thread takes one from the launch: 1 - 1/N).
    async_scheduling: bool = False
    async_overlap: float = 1.0
    # Output lengths a previous run saved, restored into a policy that learns lengths, as the
    # engine does on a restart (policy_state.py; a prior, scheduler/length_window.py).
    prior_lengths: tuple[int, ...] = ()
    # The cost model the policy sees (skip-join's entry levels, the service it charges, see
    # Scheduler.service) where it is not the one the clock runs on: the engine's own profile,
    # while scripts/sim_fidelity.py runs the clock on one calibrated to a run. None: the same.
    policy_cost: CostModel | None = None
    # Prefix caching (EngineConfig.enable_prefix_caching; the engine's own ledger, prefix_cache.py).
    # Requests then get token ids of their own, but for their first shared_prefix_tokens (at most
    # all but the last prompt token), which trace request i shares with the others of its group
    # i % prefix_groups: a system prompt per tenant, say. Lengths stay the trace's.
    enable_prefix_caching: bool = False
    shared_prefix_tokens: int = 0
    prefix_groups: int = 1

    def __post_init__(self) -> None:
        check_positive_ints(self, ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_iterations"))
        check_budget(self)
        for name in ("kv_capacity_tokens", "host_kv_capacity_tokens", "swap_reserve_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.swap_policy not in SWAP_POLICIES:
            raise ValueError(f"unknown swap_policy {self.swap_policy!r}; choose one of {list(SWAP_POLICIES)}")
        s, t = self.prediction_sigma, self.prediction_tau
        if s is not None and t is not None:
            raise ValueError("give prediction_sigma or prediction_tau, not both")
        if s is not None and not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
            raise ValueError(f"prediction_sigma must be a finite number >= 0 (0 = exact lengths), got {s!r}")
        if t is not None and not (isinstance(t, (int, float)) and 0 < t <= 1):
            raise ValueError(f"prediction_tau must be in (0, 1] (1 = exact lengths), got {t!r}")
        if not (isinstance(self.async_overlap, (int, float)) and 0 <= self.async_overlap <= 1):
            raise ValueError(f"async_overlap must be in [0, 1], got {self.async_overlap!r}")
        if not (isinstance(self.host_time_scale, (int, float)) and math.isfinite(self.host_time_scale)
                and self.host_time_scale >= 0):
            raise ValueError(f"host_time_scale must be a finite number >= 0 (0: not charged), got "
                             f"{self.host_time_scale!r}")
        if self.prediction_at not in PREDICTION_AT:
            raise ValueError(f"prediction_at must be one of {list(PREDICTION_AT)}, got {self.prediction_at!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if not (isinstance(self.shared_prefix_tokens, int) and self.shared_prefix_tokens >= 0):
            raise ValueError(f"shared_prefix_tokens must be an integer >= 0, got {self.shared_prefix_tokens!r}")
        if not (isinstance(self.prefix_groups, int) and self.prefix_groups >= 1):
            raise ValueError(f"prefix_groups must be an integer >= 1, got {self.prefix_groups!r}")

    def oracle(self, trace: Sequence[TraceRequest]) -> NoisyLengthOracle | None:
        """The run's predictor, None without predictions."""
        if self.prediction_tau is not None:
            return NoisyLengthOracle(sigma_for_tau([t.output_tokens for t in trace], self.prediction_tau,
                                                   self.prediction_seed))
        return None if self.prediction_sigma is None else NoisyLengthOracle(self.prediction_sigma)

    def prompt_ids(self, i: int, t: TraceRequest) -> Sequence[int]:
        """Token ids for trace request i: without caching any will do (0, 1, ...); with it, -1 - g
        for the tokens its group g shares, then i + 1 (a block's key chains every block before
        it, so repeating one id is enough to make each request's own blocks its own)."""
        if not self.enable_prefix_caching:
            return range(t.prompt_tokens)
        shared = min(self.shared_prefix_tokens, t.prompt_tokens - 1)
        return [-1 - i % self.prefix_groups] * shared + [i + 1] * (t.prompt_tokens - shared)

    def num_host_blocks(self) -> int:
        return self.host_kv_capacity_tokens // self.block_size

    def num_blocks(self, cost: CostModel) -> int:
        tokens = self.kv_capacity_tokens or cost.kv_capacity_tokens
        if tokens <= 0:
            raise ValueError(f"cost model {cost.name!r} does not say how many KV tokens the device holds; "
                             "give kv_capacity_tokens (--kv-capacity-tokens)")
        if tokens < self.block_size:
            raise ValueError(f"a device KV of {tokens} tokens holds no block of {self.block_size} tokens; give "
                             f"kv_capacity_tokens (--kv-capacity-tokens) >= block_size")
        return tokens // self.block_size + 1          # + the null block
