"""Hugging Face safetensors weight files: finding them, reading tensors block by block, writing them.

A model directory holds one `model.safetensors`, or shards named by
`model.safetensors.index.json`. Reading never loads a whole tensor unless asked to: the
headers give names and shapes, and `WeightReader.read` reads one block. Dtypes the installed
safetensors cannot hand to numpy (bfloat16, float8) are read through a memory map of the file.
What the names mean for our param tree is hf_params.py's business.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import struct
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes, for reading tensors this numpy/safetensors pair cannot.
_ST_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
              "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}
# The dtypes safetensors hands to numpy itself; others are memory-mapped and read by us.
_NUMPY_NATIVE = {"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL"}


# A Hugging Face repo id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def local_model_dir(model: str, what: str = "model") -> str:
    """`model` where it exists here; else, where it reads as a Hugging Face repo id, that repo's
    snapshot in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE), as vLLM serves a cached
    model offline; until 2026-12-07 an id was "not a model directory". Nothing is downloaded:
    a repo the cache lacks is a ValueError saying so. `what` names the argument in it."""
    if os.path.exists(model) or not _REPO_ID.fullmatch(model):
        return model
    from huggingface_hub import constants, snapshot_download
    try:
        return snapshot_download(model, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, a malformed cache entry
        raise ValueError(f"{what} {model!r} is not a directory here, and the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) has no snapshot of it ({type(e).__name__}); fastserve-jax "
                         f"downloads nothing: fetch it first (`hf download {model}`), then pass the same id or "
                         "the directory") from None


def weight_files(path: str) -> list[str]:
    """The safetensors files of a model directory: model.safetensors, else the shards its index
    names, else every *.safetensors file there (vLLM's reading; until 2026-12-07 shards without
    an index were refused as if there were no safetensors file)."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.lexists(single):                 # there, but a dangling link or a directory
        _check_regular([single])
    if os.path.isfile(index):
        shards = sorted(set(index_weight_map(path).values()))
        outside = [s for s in shards if os.path.basename(s) != s or s in ("", ".", "..")]
        if outside:         # vLLM and transformers read shards in the directory only; these were opened
            raise ValueError(f"{INDEX_FILE} in {path!r} names shard files outside the directory: {outside[:4]}")
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {path!r} names shard files that are not there: {missing}")
        return [os.path.join(path, s) for s in shards]
    found = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if found:
        _check_regular(found)
        return found
    raise ValueError(f"no .safetensors file in {path!r}; only safetensors checkpoints are "
                     "supported (re-save a PyTorch .bin checkpoint with save_pretrained(safe_serialization=True))")


def _check_regular(files: list[str]) -> None:
    """A ValueError naming the first of `files` that is no readable file: a link to nothing (an
    interrupted download in a hub cache's snapshot) or a directory; until 2026-12-07 a
    FileNotFoundError traceback or "No such device"."""
    for f in files:
        if not os.path.isfile(f):
            kind = "a link to nothing (an interrupted download?)" if os.path.islink(f) else "not a regular file"
            raise ValueError(f"weight file {f!r} is {kind}; download the checkpoint again")


def index_weight_map(path: str) -> dict[str, str] | None:
    """{tensor name: shard file name} of the directory's index; None without one (or with a
    single model.safetensors, which wins over it)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(os.path.join(path, SINGLE_FILE)) or not os.path.isfile(index):
        return None
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' is not an object of shard file names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {index!r}: {type(e).__name__}: {e}") from None
    return weight_map


def _raw_header(file: str) -> tuple[int, dict]:
    """(offset of the data section, JSON header) of a safetensors file: an 8-byte little-endian
    header length, the JSON header, then the tensors' bytes."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _raw_view(file: str, data_start: int, info: dict) -> np.ndarray:
    """A read-only memory map of one tensor (no bytes are read until it is indexed)."""
    dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    shape = tuple(info["shape"])
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    start, _ = info["data_offsets"]
    return np.memmap(file, dtype=dtype, mode="r", offset=data_start + start, shape=shape)


def read_raw_tensor(file: str, name: str) -> np.ndarray:
    """Read one tensor straight from the safetensors layout; used for dtypes (bfloat16, float8)
    that the installed safetensors may not hand to numpy."""
    data_start, header = _raw_header(file)
    return np.array(_raw_view(file, data_start, header[name]))


class WeightReader:
    """Name -> tensor over all weight files, each opened once (closed with `stack`). Shapes come
    from the headers; `read` reads only the requested block of a tensor. `rename` maps a stored
    name to the one callers ask for (e.g. adding a missing `model.` prefix)."""

    def __init__(self, files: list[str], stack: contextlib.ExitStack, rename: Callable[[str], str] = str,
                 weight_map: dict[str, str] | None = None):
        self._where: dict[str, tuple[str, object, str]] = {}  # name -> (file, handle, stored name)
        self._raw: dict[str, tuple[int, dict]] = {}           # file -> _raw_header(file), when needed
        for file in files:
            try:
                handle = stack.enter_context(safe_open(file, framework="numpy"))
            except Exception as e:  # SafetensorError: truncated, empty or not a safetensors file
                raise ValueError(f"cannot read weight file {file!r} (truncated or corrupted? download it again): "
                                 f"{e}") from None
            for stored in handle.keys():
                name = rename(stored)
                if name in self._where:
                    raise ValueError(f"tensor {stored!r} is stored twice, in {self._where[name][0]!r} and {file!r}")
                self._where[name] = (file, handle, stored)
        if weight_map is not None:  # the index must agree with the shards' headers where both name a tensor
            # (one the index lists and no shard holds, e.g. a stale rotary inv_freq, is left out, as
            # transformers and vLLM leave it; a needed one is then missing by name)
            where = {stored: os.path.basename(f) for f, _, stored in self._where.values()}
            wrong = sorted(f"{n} (index: {s}, found in: {where[n]})"
                           for n, s in weight_map.items() if n in where and where[n] != s)
            if wrong:
                index = os.path.join(os.path.dirname(files[0]), INDEX_FILE) if files else INDEX_FILE
                raise ValueError(f"{index!r} does not match its shards; tensors not where it says "
                                 f"({len(wrong)}): {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        _, handle, stored = self._where[name]
        return tuple(handle.get_slice(stored).get_shape())

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype code ("F32", "BF16", "I64", ...)."""
        _, handle, stored = self._where[name]
        return handle.get_slice(stored).get_dtype()

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index] (index in the stored (HF) axis order), reading only that block."""
        file, handle, stored = self._where[name]
        sl = handle.get_slice(stored)
        if sl.get_dtype() in _NUMPY_NATIVE:
            return sl[index]
        if file not in self._raw:  # bfloat16 / float8: memory-map the file and slice on the host
            self._raw[file] = _raw_header(file)
        data_start, header = self._raw[file]
        return np.array(_raw_view(file, data_start, header[stored])[index])


def write_weight_files(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int | None = None) -> None:
    """Write {HF name: array} as `model.safetensors`, or, with max_shard_bytes, as
    `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json` (a tensor larger
    than the limit gets a shard of its own). Weight files already in out_dir are replaced."""
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "model*.safetensors")) + glob.glob(os.path.join(out_dir, INDEX_FILE)):
        os.remove(old)
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata=meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
