"""What the scheduling policy learns while serving, kept across restarts.

- The output lengths that gittins and predictive learn (scheduler/learned.py), and that
  skip-join MLFQ learns to protect decodes (scheduler/skip_join.py): the window of finished
  lengths is written when the engine closes (serve's shutdown) or switches policy, and the
  next of these policies on the same model and dtype starts from it instead of cold. One
  JSON file per model (config and weights) and dtype in `<cache>/lengths/`, or $FASTSERVE_JAX_LENGTHS_DIR
  ("off" keeps nothing). A torn or foreign file is ignored with a warning. The restored lengths
  are a prior: once as many of the new run's own requests have finished as a cold start
  learns from, they are dropped (scheduler/length_window.py), so traffic that changed is
  learned afresh.
- predictive's length predictor (predictor.py), which keeps its own state.

Learning from a cold start, gittins' mean JCT is within 1.05x of the better of fcfs and
skip-join in every full-KV burst of scripts/repro_fastserve.py's grid (docs/scheduling.md);
a warm start gives it the distribution before the first request.
"""

from __future__ import annotations

import json
import logging
import os

from fastserve_jax.runner.persistent_cache import beside_cache, save_state

log = logging.getLogger(__name__)


def lengths_path(engine) -> str | None:
    """A file per model (its config and weights: `LLMEngine.weights_id`) and dtype: the lengths
    a model writes depend on it, not on the policy."""
    return beside_cache("lengths", "FASTSERVE_JAX_LENGTHS_DIR",
                        f"{engine.model_cfg!r}/{engine.weights_id}/{engine.cfg.dtype}/1", ".json")


def save_lengths(engine) -> None:
    """Write the engine's learned lengths, if its policy learns them and has seen any."""
    sched, path = getattr(engine, "scheduler", None), lengths_path(engine)
    if not hasattr(sched, "learned_lengths") or path is None:
        return
    state = sched.learned_lengths()
    if not state["pooled"]:
        return

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(state, f)
    save_state(path, write, "the learned output lengths")


def attach(engine, name: str) -> None:
    """After set_scheduler made `engine.scheduler` (policy `name`): restore learned lengths, and
    make or close predictive's length predictor."""
    path = lengths_path(engine)
    if hasattr(engine.scheduler, "restore_lengths") and path is not None and os.path.exists(path):
        try:
            with open(path) as f:
                state = json.load(f)
            if not isinstance(state, dict):
                raise ValueError("not an object of learned lengths")
            # 10**12 passed once (the policy's tables then took TiB); lengths past max_model_len
            # are another replica's with a longer one, sharing the file (until 2026-12-07 they
            # threw away the whole prior at every start, with a warning)
            dropped = _drop_past(state, engine.cfg.max_model_len)
            engine.scheduler.restore_lengths(state)
            log.info("%s starts from %d output lengths learned before (%s)%s", name, len(state["pooled"]), path,
                     f"; {dropped} past max_model_len={engine.cfg.max_model_len} left out" if dropped else "")
        except (OSError, ValueError, AttributeError, TypeError, RecursionError) as e:   # torn, foreign, other
            # buckets, nested past Python's stack (a start failed on that until 2026-12-07): start cold
            log.warning("ignoring the learned output lengths in %s: %s", path, e)
    if (name == "predictive") != (engine.predictor is not None):
        from fastserve_jax.predictor import EXTRA, LengthPredictor, default_path
        engine.predictor = (LengthPredictor(2 * engine.model_cfg.hidden_size + EXTRA, warm=True,
                                            path=default_path(engine.model_cfg, engine.cfg.dtype,
                                                                      engine.weights_id))
                            if name == "predictive" else engine.predictor.close())


def _drop_past(state: dict, limit: int) -> int:
    """Leave out of `state` every learned length (and prompt-length pair) past `limit`; how
    many of the pooled lengths were left out."""
    def within(xs):
        return [x for x in xs if not _past(x, limit)] if isinstance(xs, list) else xs
    pooled = state.get("pooled")
    state.update({k: within(state[k]) for k in ("pooled", "prompts") if k in state})
    if isinstance(history := state.get("history"), list):
        state["history"] = [within(xs) for xs in history]
    return len(pooled) - len(state["pooled"]) if isinstance(pooled, list) else 0


def _past(x, limit: int) -> bool:
    """Whether an integer in `x` (nested lists) is greater than `limit`: no length is."""
    if isinstance(x, list):
        return any(_past(v, limit) for v in x)
    return isinstance(x, int) and x > limit


def save(engine) -> None:
    """Everything above (LLMEngine.close)."""
    if engine.predictor is not None:
        engine.predictor.save()
    save_lengths(engine)
