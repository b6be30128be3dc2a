"""fastserve-jax: FastServe-style preemptive LLM serving on JAX/XLA.

The public names are imported lazily, so pure-host tools (the scheduler, the simulator,
`--help`) start without importing jax.
"""

from __future__ import annotations

import importlib
import os

# We use transformers for tokenizers and configs only; its advice that PyTorch is missing
# means nothing to a user of a JAX engine (a user's own setting wins).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# models/, sharding/ and serve/ sit beside this package at the top of the repository (the
# design card's layout); an install maps them to fastserve_jax.models/.sharding/.serve
# (pyproject's package-dir). A source-tree run (PYTHONPATH=.) finds them the same way
# through the repository root on this package's search path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(__file__), "models")) and all(
        os.path.isfile(os.path.join(_ROOT, sub, "__init__.py")) for sub in ("models", "sharding", "serve")):
    __path__.append(_ROOT)  # noqa: F821 (a package's __path__)

# The Azure conversation trace shipped with the package (traces/README.md): simulate's and bench's default workload
AZURE_TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces", "azure_conv_2023.csv")

_EXPORTS = {
    "LLM": "fastserve_jax.llm",
    "LLMEngine": "fastserve_jax.engine",
    "RequestOutput": "fastserve_jax.request",
    "CompletionOutput": "fastserve_jax.request",
    "EngineConfig": "fastserve_jax.config",
    "SamplingParams": "fastserve_jax.sampling_params",
    "SchedulerConfig": "fastserve_jax.config",
    "TextPrompt": "fastserve_jax.prompts",
    "TokensPrompt": "fastserve_jax.prompts",
    "demo_model_path": "fastserve_jax.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastserve_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
