"""How many devices a model is split over: tensor parallel (tp) x pipeline parallel (pp).

Kept apart from mesh.py and free of jax, so that the engine's config validates its sizes
with this same class at construction without importing jax.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    def check_model(self, num_layers: int, num_heads: int, intermediate_size: int) -> None:
        """Raise if the model cannot be split this way (the vocabulary may be uneven: it is
        then replicated, see rules.py)."""
        problems = []
        if num_heads % self.tp:
            problems.append(f"num_heads={num_heads} is not a multiple of tensor_parallel_size={self.tp}")
        if intermediate_size % self.tp:
            problems.append(f"the MLP width {intermediate_size} is not a multiple of tensor_parallel_size={self.tp}")
        if num_layers % self.pp:
            fits = ", ".join(str(d) for d in range(1, num_layers + 1) if num_layers % d == 0)
            problems.append(f"num_layers={num_layers} is not a multiple of pipeline_parallel_size={self.pp} (the "
                            f"pipeline sizes that divide it: {fits})")
        if problems:
            raise ValueError("cannot shard this model: " + "; ".join(problems) +
                             "; pick sizes that divide them")
