"""Host-side block tables for the paged KV cache on the device.

The device pool is `num_blocks` blocks of `block_size` token slots (see models.attention for
the array layout). Block 0 is the null block: padding writes land there and it is never
handed out, so the usable blocks are 1 .. num_blocks-1.

    free list:   [ 7, 3, 9, ... ]     (LIFO stack of block ids not owned by anyone)
    tables:      req-a -> [1, 4, 2]   (append-only while the request holds KV)
                 req-b -> [5, 6]

A request holds ceil(num_tokens_with_kv / block_size) blocks: memory follows its length,
not max_model_len.
"""

from __future__ import annotations

from fastserve_jax.request import Request

NULL_BLOCK = 0


class KVManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the device KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))
        self._tables: dict[str, list[int]] = {}

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, req: Request) -> list[int]:
        return self._tables.get(req.request_id, [])

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks `req` needs to hold K/V for `num_new_tokens` more tokens."""
        have = len(self._tables.get(req.request_id, ()))
        return max(0, self.blocks_for_tokens(req.num_computed_tokens + num_new_tokens) - have)

    # -- allocation (matching pairs: allocate / free) --------------------------------------
    def allocate(self, req: Request, num_new_tokens: int) -> None:
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"plan does not fit: {req.request_id} needs {need} blocks, {len(self._free)} free")
        table = self._tables.setdefault(req.request_id, [])
        for _ in range(need):
            table.append(self._free.pop())

    def free(self, req: Request) -> None:
        self._free.extend(reversed(self._tables.pop(req.request_id, [])))

    def check_integrity(self) -> None:
        """Every usable block is either free or owned by exactly one request."""
        owned = [b for t in self._tables.values() for b in t]
        seen = owned + self._free
        assert len(seen) == len(set(seen)), "a block is owned twice or both owned and free"
        assert set(seen) == set(range(1, self.num_blocks)), "blocks leaked or out of range"
        assert NULL_BLOCK not in seen
