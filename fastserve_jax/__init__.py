"""fastserve-jax: FastServe-style preemptive LLM serving on JAX/XLA.

The public names are imported lazily, so pure-host tools (the scheduler, the simulator,
`--help`) start without importing jax.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "fastserve_jax.llm",
    "LLMEngine": "fastserve_jax.engine",
    "RequestOutput": "fastserve_jax.engine",
    "EngineConfig": "fastserve_jax.config",
    "SamplingParams": "fastserve_jax.config",
    "SchedulerConfig": "fastserve_jax.config",
    "demo_model_path": "models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastserve_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
