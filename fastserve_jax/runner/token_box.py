"""The device-side token box of async scheduling: sampled tokens feed the next batch on the device.

With async scheduling (engine.py) the engine dispatches batch N+1 before it has read batch
N's sampled tokens, so a request that decodes in both does not know its next input token on
the host. Each batch's samplers write their tokens into this small device array, launch by
launch at fixed offsets; the next batch's decode launch takes each such row's token from it
(`Launch.src`) and every other row's from the host. Nothing waits for the device.

    box (size,) int32    [decode launch's rows | prefill launch 1's rows | ...]
    put(box, tokens (n,), offset) -> box      one per sampled launch, in dispatch order
    take(box, host (R, 1), src (R,)) -> (R, 1)    src[i] >= 0: box[src[i]], else host[i]
    patch(box, history (R, H), src (R,)) -> (R, H)  the pending token appended to row i's
        history (padded with -1) where src[i] >= 0, for the penalties (sampling.Penalties)

The device runs the programs in the order they are queued, so a batch's `take` reads the
previous batch's tokens before this batch's `put`s overwrite them. Every shape is compiled
once per logits-row count (put) and decode bucket (take, patch), by `compile_all` in a
full or background warm-up, so serving after a full one compiles nothing new.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding


def _put(box: jax.Array, tokens: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(box, tokens.astype(box.dtype), (offset,))


def _take(box: jax.Array, host: jax.Array, src: jax.Array) -> jax.Array:
    return jnp.where(src[:, None] >= 0, box[jnp.maximum(src, 0)][:, None], host)


def _patch(box: jax.Array, history: jax.Array, src: jax.Array) -> jax.Array:
    rows = jnp.arange(history.shape[0])
    col = jnp.minimum((history >= 0).sum(axis=1), history.shape[1] - 1)      # first padding entry
    return history.at[rows, col].set(jnp.where(src >= 0, box[jnp.maximum(src, 0)], history[rows, col]))


class TokenBox:
    """size: entries (the largest decode bucket plus two prefill launches' logits rows);
    sharding: where the sampler's tokens are (the last stage, replicated), which is where the
    first stage reads its input tokens when there is one stage."""

    def __init__(self, size: int, sharding: NamedSharding) -> None:
        self.size = size
        self.sharding = sharding
        # made on the devices, not put from the host: across processes a device_put checks the
        # value with the other processes (a collective the workers, still starting, would miss)
        self.box = jax.jit(lambda: jnp.zeros(size, jnp.int32), out_shardings=sharding)()
        # every argument replicated where the box is: across processes (a multi-host mesh) the
        # host arrays are then each process's own identical copy
        rep3 = (sharding, sharding, sharding)
        self._fns = {name: jax.jit(f, in_shardings=rep3, out_shardings=sharding)
                     for name, f in (("put", _put), ("take", _take), ("patch", _patch))}
        self._compiled: dict[tuple, object] = {}     # (name, argument shapes) -> compiled program
        self._offset = 0

    def start_batch(self) -> None:
        """The next puts belong to a new batch: they fill the box from its start."""
        self._offset = 0

    def put(self, tokens: jax.Array) -> int | None:
        """Queue a copy of one launch's sampled tokens into the box; returns the offset of its
        row 0, or None when the batch's launches have filled the box (its rows then wait for
        the host, see engine.py)."""
        n = tokens.shape[0]
        if self._offset + n > self.size:
            return None
        at, self._offset = self._offset, self._offset + n
        self.box = self._program("put", (n,), ())(self.box, tokens, np.int32(at))
        return at

    def take(self, host: np.ndarray, src: np.ndarray) -> jax.Array:
        """A decode launch's (R, 1) input tokens: the box's entries where src >= 0."""
        return self._program("take", host.shape, src.shape)(self.box, host, src)

    def patch(self, history: np.ndarray, src: np.ndarray) -> jax.Array:
        """A decode launch's penalty history with each src row's pending token appended."""
        return self._program("patch", history.shape, src.shape)(self.box, history, src)

    def _program(self, name: str, a: tuple, b: tuple):
        """The compiled `name` for int32 arguments of shapes a and b (() for put's offset)."""
        fn = self._compiled.get((name, a, b))
        if fn is None:
            args = [jax.ShapeDtypeStruct(shape, jnp.int32) for shape in (a, b)]
            fn = self._compiled[name, a, b] = self._fns[name].lower(self.box, *args).compile()
        return fn

    def compile_all(self, sampler_rows: list[int], decode_rows: list[int], history: int) -> None:
        """Every shape serving uses; `history`: the penalties' history length (max_model_len)."""
        for n in sampler_rows:
            self._program("put", (n,), ())
        for r in decode_rows:
            self._program("take", (r, 1), (r,))
            self._program("patch", (r, history), (r,))

    def run_once(self) -> None:
        """Run every compiled program once (a full warm-up: see Compiler.run_once). The puts
        write zeros at offset 0; no batch is in flight, so no entry is waiting to be read."""
        for (name, a, b), fn in self._compiled.items():
            out = fn(self.box, np.zeros(a, np.int32), np.zeros(b, np.int32) if b else np.int32(0))
            if name == "put":
                self.box = out
        self.box.block_until_ready()

    def count(self) -> int:
        """Executables compiled so far."""
        return len(self._compiled)
