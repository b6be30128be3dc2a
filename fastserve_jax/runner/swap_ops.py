"""The engine's swap operations on the runner's stage caches, mirrored to other processes.

Order within an iteration (kv_plan.py): swap_out, swap_in_now, the step's dispatch, then
the swap policy's moves ahead of need (swap_out, start_swap_in), which overlap the step;
an upload lands (`land`) in a later iteration, before the step that reads it.

Every operation takes plain (request id, device blocks) moves, which is also what the
other processes of a multi-host deployment replay (fastserve_jax/multihost.py): `mirror`
sends each operation to them before it is issued here.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fastserve_jax.kv_cache import SwapCopy
from fastserve_jax.runner.kv_transfer import KVTransfer
from fastserve_jax.sharding.pipeline import Stage

Moves = list[tuple[str, tuple[int, ...]]]


def moves_of(copies: list[SwapCopy]) -> Moves:
    return [(c.request.request_id, c.device_blocks) for c in copies]


def _wire(moves: Moves) -> list:
    return [[rid, np.asarray(blocks, np.int32)] for rid, blocks in moves]


def moves_from_wire(wire: list) -> Moves:
    return [(rid, tuple(int(b) for b in blocks)) for rid, blocks in wire]


class SwapOps:
    """Swap copies on the stages' caches (each stage holds its own cache; uploads and
    on-demand swap-ins replace it with the donated, updated one)."""

    def __init__(self, transfer: KVTransfer, stages: list[Stage], mirror: Callable[[dict], None]) -> None:
        self.transfer = transfer
        self._stages = stages
        self._mirror = mirror

    def _caches(self):
        return [st.cache for st in self._stages]

    def _set_caches(self, caches) -> None:
        for st, c in zip(self._stages, caches):
            st.cache = c

    def swap_out(self, moves: Moves) -> None:
        """Issue the device-to-host copies (returns at once)."""
        self._mirror({"op": "swap_out", "moves": _wire(moves)})
        for rid, blocks in moves:
            self.transfer.swap_out(self._caches(), rid, tuple(blocks))

    def swap_in_now(self, moves: Moves) -> None:
        """Copies the next step needs: issued and scattered before it (the step waits for them)."""
        self._mirror({"op": "swap_in_now", "moves": _wire(moves)})
        for rid, blocks in moves:
            self._set_caches(self.transfer.swap_in_now(self._caches(), rid, tuple(blocks)))

    def start_swap_in(self, moves: Moves) -> None:
        """Issue uploads ahead of need; each lands with `land`."""
        self._mirror({"op": "start_swap_in", "moves": _wire(moves)})
        for rid, blocks in moves:
            self.transfer.start_swap_in(rid, tuple(blocks))

    def land(self, request_id: str) -> None:
        self._mirror({"op": "land_swap_in", "request_id": request_id})
        self._set_caches(self.transfer.land_swap_in(self._caches(), request_id))

    def discard(self, request_id: str) -> None:
        """Forget a request's host copy or pending upload (it finished, or its KV was dropped)."""
        self._mirror({"op": "discard", "request_id": request_id})
        self.transfer.discard(request_id)

    def replay(self, msg: dict) -> None:
        """Apply one mirrored operation (on a multi-host worker)."""
        op = msg["op"]
        if op in ("swap_out", "swap_in_now", "start_swap_in"):
            getattr(self, op)(moves_from_wire(msg["moves"]))
        elif op == "land_swap_in":
            self.land(msg["request_id"])
        elif op == "discard":
            self.discard(msg["request_id"])
        else:
            raise ValueError(f"unknown swap operation {op!r} from the leader (versions differ?)")
