"""A dense layer whose weight is stored (out, in), as torch.nn.Linear and Hugging Face
checkpoints store it, instead of Linen Dense's (in, out).

Why: XLA:CPU's matmul is up to 1.7x faster with the weight's contracted axis minor. On the
2-core VM, the 125M Llama's matmuls for 32 decode rows took 52.6 ms with (out, in) weights
against 89.8 ms with (in, out) (1.46x at 8 rows, 1.14x at 1, 1.03x at 512 prompt tokens;
docs/performance.md). A decode step streams every weight once, and with (in, out) XLA:CPU
reads it in the slower order. GPUs and TPUs take either layout at the same speed (cuBLAS's
preferred GEMM is this one), and HF weights load without a transpose.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
        y = jax.lax.dot_general(x.astype(self.dtype), w.astype(self.dtype), (((x.ndim - 1,), (1,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y
