"""A dense layer whose weight is stored (out, in), as torch.nn.Linear and Hugging Face
checkpoints store it, instead of Linen Dense's (in, out).

Why: XLA:CPU runs a dot against an (out, in) weight through YNNPACK faster than anything
it does with (in, out). The 125M Llama's matmuls for 32 decode rows took 49.9 ms against
69.9 ms, the best of (in, out) (Eigen; 83.9 ms on YNNPACK): 1.40x, 1.45x at 8 rows, 1.09x
at 1, 1.04x at 512 prompt tokens (scripts/bench_weight_layout.py, docs/performance.md
section 6). HF weights load without a transpose. On GPUs and TPUs XLA assigns a dot's
layouts itself; this is the layout torch serves with there (not measured here).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastserve_jax.models.config import ACTIVATIONS

# transformers' ACT2FN by name: "gelu" is the exact (erf) GELU, the tanh approximation has three
# names (gelu_new, gelu_pytorch_tanh, and gelu_fast with sqrt(2/pi) rounded to 0.7978845608).
_ACT = {"silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x)}
assert set(_ACT) == set(ACTIVATIONS)


def activation(name: str):
    """The MLP activation a config names (config.ACTIVATIONS)."""
    return _ACT[name]


def linear(x, weight):
    """x @ weight.T for a weight stored (out, in): the input's last axis against the weight's."""
    return jax.lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))


class Linear(nn.Module):
    """y = x @ weight.T (+ bias); weight (features, in)."""

    features: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(in_axis=-1, out_axis=-2),
                       (self.features, x.shape[-1]), self.param_dtype)
        y = linear(x.astype(self.dtype), w.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y
