"""Host-side ledger of the paged KV cache: block tables on the device, block counts on the host.

The device pool is `num_blocks` blocks of `block_size` token slots (see models.attention for
the array layout). Block 0 is the null block: padding writes land there and it is never
handed out, so the usable blocks are 1 .. num_blocks-1.

    free list:   [ 7, 3, 9, ... ]     (LIFO stack of block ids not owned by anyone)
    tables:      req-a -> [1, 4, 2]   (append-only while the request holds KV)
                 req-b -> [5, 6]

A request holds ceil(num_tokens_with_kv / block_size) blocks: memory follows its length,
not max_model_len.

The host pool holds the KV of requests swapped out of the device: `num_host_blocks` blocks
of the same size. The runner keeps a swapped request's blocks as host arrays in the device
pool's block layout (kv_transfer.py), so the host side needs no block ids, only a budget:

    host:        req-c -> 3 blocks, req-d -> 5 blocks     free: num_host_blocks - 8

Where a request's KV lives (one place at a time, or in flight between two):

    NONE --allocate--> DEVICE --swap_out--> SWAPPING_OUT --finish_swap_out--> HOST
                         ^                                                      |
                         +--finish_swap_in-- SWAPPING_IN <------swap_in---------+
                                            (also straight from SWAPPING_OUT)
    free(): from any place back to NONE (the request finished, or is dropped for recomputation)

During SWAPPING_OUT the device blocks are already free: the copy was issued before any later
step that may overwrite them, and the device runs work in issue order. During SWAPPING_IN
the device blocks are already allocated and the host blocks are released only when the copy
has landed, so a request in flight holds both.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Container, Mapping

from fastserve_jax.request import Request

NULL_BLOCK = 0


def power_of_two_runs(n: int) -> list[int]:
    """Run lengths, largest first, that add up to n (its binary digits): a swap copies a request's
    blocks in such runs (runner/kv_transfer.py)."""
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


class KVLocation(enum.Enum):
    NONE = "none"
    DEVICE = "device"
    SWAPPING_OUT = "swapping_out"
    HOST = "host"
    SWAPPING_IN = "swapping_in"


ON_HOST = (KVLocation.HOST, KVLocation.SWAPPING_OUT)


@dataclass(frozen=True)
class SwapCopy:
    """One request's blocks moving between the pools: `device_blocks` are the blocks read
    (swap-out) or written (swap-in), in the request's block-table order. In a swap-in, NULL_BLOCK
    stands where the device already holds that block's tokens (prefix caching: the block is
    shared, not copied)."""

    request: Request
    device_blocks: tuple[int, ...]
    fill: bool = False      # a swap-out into the runs a host copy lacks (prefix_cache.py's pins)

    @property
    def num_blocks(self) -> int:
        """Blocks the copy moves."""
        return len(self.device_blocks) - self.device_blocks.count(NULL_BLOCK)


# the ledger's counters (prefix_cache.py's included), which start_over keeps
_COUNTERS = ("queries", "hits", "requeries", "rehits", "evictions", "swap_in_shared", "swap_out_pinned")


class KVManager:
    caching = False          # prefix caching (prefix_cache.PrefixCachingKVManager): apply_plan matches prompts
    queries = hits = 0       # its counters, in tokens (requests looked up, tokens found); 0 without
    requeries = rehits = 0   # of those, requests dropped and prefilled again (vLLM counts them apart)
    swap_in_shared = 0       # blocks swap-ins found on the device (prefix_cache.py); 0 without
    swap_out_pinned = 0      # blocks swap-outs left on the device, others holding them (prefix_cache.py)

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        if num_blocks < 2:
            raise ValueError(f"the device KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_host_blocks = num_host_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))
        self._tables: dict[str, list[int]] = {}
        self._host: dict[str, int] = {}                 # request id -> host blocks held
        self._host_free = num_host_blocks
        self._where: dict[str, KVLocation] = {}         # absent: NONE
        self._uploading: dict[str, int] = {}            # request id -> blocks its swap-in in flight copies
        self._swapping_in = 0                           # their sum
        self._fills: list[SwapCopy] = []                # copies owed to host copies (prefix_cache.py's pins)

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_host_free_blocks(self) -> int:
        return self._host_free

    @property
    def num_host_used_blocks(self) -> int:
        return self.num_host_blocks - self._host_free

    @property
    def num_kv_requests(self) -> int:
        """Requests whose KV is kept anywhere (has_kv)."""
        return len(self._where)

    @property
    def num_host_requests(self) -> int:
        """Requests holding host blocks (on the host or in flight either way)."""
        return len(self._host)

    @property
    def num_swapping_in_blocks(self) -> int:
        """Blocks that swap-ins still in flight copy (the upload link's backlog)."""
        return self._swapping_in

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def location(self, req: Request) -> KVLocation:
        return self._where.get(req.request_id, KVLocation.NONE)

    @property
    def where(self) -> Mapping[str, KVLocation]:
        """Request id -> where its KV is, for loops over many requests (`location` per
        request costs a Python call; `kv.where.get(rid, KVLocation.NONE)` does not). Read only."""
        return self._where

    def has_kv(self, req: Request) -> bool:
        """True when the request's computed tokens are kept somewhere (device, host or in flight)."""
        return req.request_id in self._where

    def block_table(self, req: Request) -> list[int]:
        """The request's device blocks (empty while its KV is on the host)."""
        return self._tables.get(req.request_id, [])

    def host_blocks(self, req: Request) -> int:
        return self._host.get(req.request_id, 0)

    def freeable_blocks(self, req: Request, shared: Container[int] = (),
                        evicted: dict[int, int] | None = None) -> list[int]:
        """Device blocks that taking `req`'s KV away frees (prefix caching: those it alone holds,
        less `shared`, which others are counted on to take; with `evicted`, a plan's count of
        the holders it takes away from blocks several requests hold, updated here, also the
        blocks whose last holder this is)."""
        return self._tables.get(req.request_id, [])

    def cached_prefix(self, req: Request, released: Container[int] = ()) -> tuple[int, list[int]]:
        """Tokens a request without KV would find in the prefix cache now, and the blocks of
        them that requests hold (not in `released`), which it would share (none: no caching)."""
        return 0, []

    def swap_in_shares(self, req: Request, released: Container[int] = ()) -> tuple[int, list[int]]:
        """For KV on the host: how many of its blocks a swap-in would find on the device now (prefix
        caching; it copies the rest), and those of them that requests hold, less `released` (it
        would share them: it needs no free block for them). None without caching."""
        return 0, []

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Device blocks `req` must gain to run `num_new_tokens` more tokens (for KV on the host:
        all of them, since it has to come back first)."""
        table = self._tables.get(req.request_id)
        need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - (0 if table is None else len(table))
        return need if need > 0 else 0

    # -- device allocation (matching pairs: allocate / free) -------------------------------
    def allocate(self, req: Request, num_new_tokens: int) -> None:
        rid = req.request_id
        where = self._where.get(rid, KVLocation.NONE)
        need = self.blocks_needed(req, num_new_tokens)
        if need == 0 and where is KVLocation.DEVICE:
            return                    # most decodes: the last block has room (the simulator's hot path)
        assert where in (KVLocation.NONE, KVLocation.DEVICE), f"{rid}: allocate while its KV is {where.value}"
        if need > self.num_free_blocks:
            raise RuntimeError(f"plan does not fit: {rid} needs {need} blocks, {self.num_free_blocks} free")
        self._tables.setdefault(rid, []).extend(self._take(need))
        self._where[rid] = KVLocation.DEVICE

    def free(self, req: Request) -> None:
        """Release the request's KV wherever it is (device, host, or both while in flight)."""
        rid = req.request_id
        table = self._tables.pop(rid, [])
        if self._where.pop(rid, None) is KVLocation.SWAPPING_IN:
            self._swapping_in -= self._uploading.pop(rid)
        self._release(table)
        self._host_free += self._host.pop(rid, 0)

    def _take(self, n: int) -> list[int]:
        """`n` free blocks, now owned."""
        return [self._free.pop() for _ in range(n)]

    def _release(self, table: list[int]) -> None:
        """A request's blocks, no longer its own (the first block is handed out again last)."""
        self._free.extend(reversed(table))

    def _check_blocks(self) -> None:
        owned = [b for t in self._tables.values() for b in t]
        seen = owned + self._free
        assert len(seen) == len(set(seen)), "a block is owned twice or both owned and free"
        assert set(seen) == set(range(1, self.num_blocks)), "blocks leaked or out of range"
        assert NULL_BLOCK not in seen

    # -- swapping (matching pairs: swap_out / finish_swap_out, swap_in / finish_swap_in) ----
    def can_swap_out(self, req: Request, host_blocks_promised: int = 0) -> bool:
        """The request's device KV fits in the host pool next to `host_blocks_promised` more."""
        return (self.location(req) is KVLocation.DEVICE and
                len(self._tables[req.request_id]) + host_blocks_promised <= self._host_free)

    def swap_out(self, req: Request, borrow: int = 0) -> SwapCopy:
        """Move the ledger entry to the host; the device blocks are free at once (see module doc).

        `borrow`: host blocks that swap-ins of the same iteration are about to release may be
        used already (their copies leave the host before these land)."""
        rid = req.request_id
        assert self.location(req) is KVLocation.DEVICE, f"{rid}: swap_out while its KV is {self.location(req).value}"
        table = self._tables.pop(rid)
        if len(table) > self._host_free + borrow:
            self._tables[rid] = table
            raise RuntimeError(f"host pool full: {rid} needs {len(table)} blocks, {self._host_free} free")
        self._host_free -= len(table)
        self._host[rid] = len(table)
        self._release(table)
        self._where[rid] = KVLocation.SWAPPING_OUT
        return SwapCopy(req, tuple(table))

    def take_fills(self) -> list[SwapCopy]:
        """Swap-out copies owed to host copies since the last call, to issue with the next batch
        of copies (before its swap-ins and its step): with prefix caching, the blocks a swapped-out
        request left on the device while others held them, copied once they no longer do."""
        fills, self._fills = self._fills, []
        return fills

    def finish_swap_out(self, req: Request) -> None:
        if self._where.get(req.request_id) is KVLocation.SWAPPING_OUT:
            self._where[req.request_id] = KVLocation.HOST

    def swap_in(self, req: Request) -> SwapCopy:
        """Allocate device blocks for the request's host KV; the host blocks stay held until
        finish_swap_in."""
        rid = req.request_id
        assert self.location(req) in ON_HOST, f"{rid}: swap_in while its KV is {self.location(req).value}"
        table, written = self._restore(req, self._host[rid])
        self._tables[rid] = table
        self._where[rid] = KVLocation.SWAPPING_IN
        copy = SwapCopy(req, tuple(written))
        self._uploading[rid] = copy.num_blocks
        self._swapping_in += copy.num_blocks
        return copy

    def _restore(self, req: Request, n: int) -> tuple[list[int], list[int]]:
        """The device blocks a swap-in of `n` blocks takes, and those its copy writes."""
        self._fits_swap_in(req, n)
        table = self._take(n)
        return table, table

    def _fits_swap_in(self, req: Request, need: int) -> None:
        if need > self.num_free_blocks:
            raise RuntimeError(f"plan does not fit: swapping {req.request_id} in needs {need} blocks, "
                               f"{self.num_free_blocks} free")

    def finish_swap_in(self, req: Request) -> None:
        rid = req.request_id
        assert self._where.get(rid) is KVLocation.SWAPPING_IN, f"{rid}: finish_swap_in without swap_in"
        self._host_free += self._host.pop(rid)
        self._where[rid] = KVLocation.DEVICE
        self._swapping_in -= self._uploading.pop(rid)

    def start_over(self) -> None:
        """The ledger made anew, every block free and no prefix cached, its counters kept: for
        an engine with no live request after an exception that may have landed in the middle of
        an update (a caller's signal handler that raised inside a step), where the ledger could
        keep leaked blocks or reference counts off for good (3 of the 8 blocks of a tight pool,
        in 2 of 150 trials of a probe, 2026-12-07)."""
        counters = {k: getattr(self, k) for k in _COUNTERS if hasattr(self, k)}
        type(self).__init__(self, self.num_blocks, self.block_size, self.num_host_blocks)
        for k, v in counters.items():
            setattr(self, k, v)

    def check_integrity(self) -> None:
        """Every usable device block is free or owned by exactly one request; host blocks add
        up; each request's ledger entries match its location."""
        self._check_blocks()
        assert self._host_free >= 0, "host pool over-committed (a borrow was not paid back)"
        assert self._host_free + sum(self._host.values()) == self.num_host_blocks, \
            "host blocks leaked or over-committed"
        for rid, where in self._where.items():
            on_dev, on_host = rid in self._tables, rid in self._host
            expect = {KVLocation.DEVICE: (True, False), KVLocation.SWAPPING_OUT: (False, True),
                      KVLocation.HOST: (False, True), KVLocation.SWAPPING_IN: (True, True)}[where]
            assert (on_dev, on_host) == expect, f"{rid}: ledger does not match location {where.value}"
            if on_dev and on_host:
                assert len(self._tables[rid]) == self._host[rid], f"{rid}: swap-in allocated the wrong block count"
        assert set(self._tables) | set(self._host) <= set(self._where), "ledger entry without a location"
        assert set(self._uploading) == {r for r, w in self._where.items() if w is KVLocation.SWAPPING_IN} and \
            self._swapping_in == sum(self._uploading.values()), "in-flight swap-in count is off"


# -- pool sizing --------------------------------------------------------------------------
