"""The plan channel's frames (sharding/distributed.py's PlanChannel), with no pickle: a network
port must never execute code.

`b"FSP1" | u32 header length | u64 payload length | JSON header | payload`. The header is the
message with each numpy array replaced by `{"a": [dtype.str, shape, offset, nbytes]}` (into the
payload, 16-byte aligned; numpy scalars: "s"), dicts as `{"d": {...}}` (str keys) or
`{"m": [[key, value], ...]}` (int keys), lists and tuples as lists. Received arrays are writable
views of one buffer per message.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

_MAGIC, _PREFIX, _ALIGN, _MAX_HEADER = b"FSP1", struct.Struct("!4sIQ"), 16, 64 << 20


def encode(msg: Any) -> bytes:
    """One frame for `msg`; a TypeError naming the offending path for anything not encodable."""
    chunks: list[bytes] = []
    size = 0

    def enc(x: Any, path: str) -> Any:
        nonlocal size
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"d": {k: enc(v, f"{path}[{k!r}]") for k, v in x.items()}}
            if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in x):
                return {"m": [[k, enc(v, f"{path}[{k!r}]")] for k, v in x.items()]}
            raise TypeError(f"{path}: dict keys must be str or int")
        if isinstance(x, (np.ndarray, np.generic)):
            a = np.asarray(x)  # tobytes() writes C order whatever the strides
            if a.dtype.kind not in "biufc" or a.dtype.fields is not None:
                raise TypeError(f"{path}: cannot encode array of dtype {a.dtype}")
            pad = -size % _ALIGN
            chunks.append(b"\0" * pad + a.tobytes())
            ref = [a.dtype.str, list(a.shape), size + pad, a.nbytes]
            size += pad + a.nbytes
            return {"s" if isinstance(x, np.generic) else "a": ref}
        raise TypeError(f"{path}: cannot encode object of type {type(x).__name__} "
                        "(allowed: dict, list, str, int, float, bool, None, numpy arrays)")

    header = json.dumps(enc(msg, "msg"), separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(_MAGIC, len(header), size), header, *chunks])


def decode(header: bytes, payload: bytearray) -> Any:
    """Inverse of `encode`, given a frame's header and payload (arrays are views of `payload`)."""

    def array(ref: list[Any]) -> np.ndarray:
        dtype, shape, offset, nbytes = np.dtype(ref[0]), tuple(ref[1]), int(ref[2]), int(ref[3])
        if dtype.kind not in "biufc" or any(d < 0 for d in shape) or offset < 0 \
                or offset + nbytes > len(payload) or nbytes != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"corrupt array reference {ref}")
        return np.frombuffer(payload, dtype, nbytes // dtype.itemsize, offset).reshape(shape)

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        ((tag, v),) = x.items()
        if tag in ("d", "m"):
            return {k: dec(w) for k, w in (v.items() if tag == "d" else v)}
        if tag not in ("a", "s"):
            raise ValueError(f"unknown tag {tag!r} in PlanChannel header")
        return array(v) if tag == "a" else array(v)[()]

    return dec(json.loads(header))
