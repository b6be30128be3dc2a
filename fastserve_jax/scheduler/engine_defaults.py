"""The policies' defaults fitted to one engine: SchedulerConfig's seconds, tuned on the
paper's setup in the simulator, scaled to the engine's own cost model."""

from __future__ import annotations

from fastserve_jax.config import SchedulerConfig

# SchedulerConfig's seconds are tuned in the simulator on the paper's setup, OPT-13B on an A100 at
# batch 16, where one decode iteration takes this long (cost_models/opt-13b-a100.json; a test
# keeps the two in step).
REFERENCE_ITERATION_SECONDS = 0.02055


def engine_policy_config(cost_model, max_num_seqs: int, starvation_threshold: float | None = None,
                         **knobs) -> SchedulerConfig:
    """SchedulerConfig's defaults for an engine with this cost model (None: the plain
    defaults): one decode step as the base quantum (FastServe's "about one decode step"), and
    the starvation limits stretched to as many full-batch decode iterations as the defaults'
    seconds last on the reference setup. A model that decodes 5x faster than OPT-13B waits
    2 s, not 10, before promotion and the tail guard; at 10 s the demo model's bursts end
    before either acts. `starvation_threshold`: seconds that replace skip-join's scaled limit
    (gittins' stays scaled)."""
    d = SchedulerConfig
    quantum, scale = d.base_quantum, 1.0
    if cost_model is not None:
        quantum = cost_model.decode_time(1)
        # (a noisy profile's line may fall below its batch-1 time when stretched past its last batch)
        scale = max(quantum, cost_model.decode_time(max_num_seqs)) / REFERENCE_ITERATION_SECONDS
    return SchedulerConfig(
        base_quantum=quantum,
        starvation_threshold=d.starvation_threshold * scale if starvation_threshold is None else starvation_threshold,
        gittins_starvation_threshold=d.gittins_starvation_threshold * scale, **knobs)
