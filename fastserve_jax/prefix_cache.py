"""Automatic prefix caching: a request whose first tokens match KV already computed takes those
blocks instead of prefilling them again (vLLM's `--enable-prefix-caching`).

A full block's key is a hash chain over the token ids up to its end,

    key[i] = blake2b(key[i-1] + tokens[i*bs : (i+1)*bs])        (16 bytes)

so one key names one exact prefix; a request's `cache_salt` (SamplingParams) starts its chain
from the salt's digest instead, so it shares blocks only with requests of the same salt. Blocks
are reference counted: several requests share a prefix's blocks, and a block whose count falls
to 0 while it has a key is kept as cached (free, but matchable) until its slot is needed:

    free list:   [ 7, 3 ]                   no key: handed out first
    cached:      { 9: k9, 4: k4, ... }      count 0, has a key: handed out least recently freed first
    shared:      req-a -> [1, 2, 5]         count 2 for 1 and 2 (req-b's prefix too)
                 req-b -> [1, 2, 6]

`num_free_blocks` counts both free and cached blocks. The policies (scheduler/batch.fill_batch,
fcfs) ask `cached_prefix` what a request without KV would find: those tokens stay out of the
iteration's token budget (ScheduledRequest.cached), and the blocks of them that requests hold
are ones it shares, not ones it takes from the free count. `freeable_blocks` counts the blocks a
request alone holds, which an eviction frees. Within one plan no block is counted both ways
(Plan.kv_shared, Plan.kv_released): a start does not count on sharing a block that an eviction
of the same plan frees, nor does an eviction count as freed a block a start counts on sharing.
Otherwise a hit takes no more free blocks than the policy counted.

When blocks get keys (`register`, from kv_plan.apply_plan): a block whose tokens are all known
on the host gets its key as soon as the request whose step writes it is applied, before the
rest of the plan. Every later step is issued after that one, and the device runs work in issue
order; within the step, the runner puts the decode launch first and the prefill chunks in plan
order, and a launch writes its K/V before any of its rows reads (models.attention). So a
request that matches the block, later in the same plan or in a later one, reads it after it is
written: a burst's requests behind a new prefix that start in one step compute it once. But a
1-token chunk runs in the decode launch, before every prefill launch: a request that would be
left with 1 token matches one block fewer (its chunk then runs in a prefill launch, after the
writer's), and an on-demand swap-in takes none of the blocks the step's prefills write
(`_written`).
Positions still pending (async scheduling's tokens on the device) never get keys, so a
finished request's stray row in the next batch writes only to its last, keyless block.

When a request matches (`match_prefix`, from kv_plan.apply_plan): whenever a step is about to
compute tokens of a request that has none on the device yet, or that is still prefilling, it
takes the cached blocks that follow, up to the block before the chunk's last token, so that the
step still computes that token (and samples from it where the chunk ends the prompt). The
policy planned the chunk without knowing: its entry in the plan shrinks, and the chunk's end
stays where the policy put it, so a long prompt whose first chunk the policy cut short finds
the rest of its prefix when its next chunk is planned. A request that wants prompt logprobs
never matches (the skipped tokens would have none), like vLLM. Recomputation after a preemption matches too, over prompt
and output tokens, so a dropped request whose blocks were not handed out since runs again
without prefilling. A swap-out leaves on the device the leading blocks that other requests
there hold, as a pin ("pins" below), and copies the rest; when it comes back it takes its pins
and the blocks of its KV that the device still holds under their keys (shared again, not
copied: `_restore`), and the rest into blocks of its own, which get keys again.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from typing import Container

import numpy as np

from fastserve_jax.kv_cache import NULL_BLOCK, KVLocation, KVManager, SwapCopy
from fastserve_jax.kv_sizing import device_pool_blocks, host_pool_blocks
from fastserve_jax.request import Request


def salt_key(salt: str | None) -> bytes:
    """The chain's start: empty for unsalted requests, else the salt's own digest, so that no
    salted chain meets an unsalted one or one of another salt (SamplingParams.cache_salt)."""
    return b"" if salt is None else hashlib.blake2b(b"salt\0" + salt.encode(), digest_size=16).digest()


class PrefixCachingKVManager(KVManager):
    caching = True

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        super().__init__(num_blocks, block_size, num_host_blocks)
        self._ref = [0] * num_blocks
        self._cached: OrderedDict[int, bytes] = OrderedDict()   # count 0 with a key, oldest first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._chains: dict[str, list[bytes]] = {}      # request id -> its full blocks' keys so far
        self._registered: dict[str, int] = {}          # request id -> leading table blocks registered
        # blocks keyed while a plan is applied, which its step writes: not yet safe for a decode row (`_written`)
        self._unwritten: set[int] = set()
        self.queries = self.hits = 0        # tokens of requests looked up; of those, taken from the cache
        self.requeries = self.rehits = 0    # the same of requests dropped and prefilled again (vLLM's preempted_*)
        self.evictions = 0      # cached blocks handed out for other content
        self.swap_in_shared = 0  # blocks swap-ins found on the device instead of copying
        # a swapped-out request's leading blocks that others held: kept on the device, not copied
        self._pins: dict[str, tuple[Request, list[int]]] = {}
        self._pinned = [0] * num_blocks            # pins per block (counted in _ref too)
        self.swap_out_pinned = 0                   # blocks swap-outs left on the device

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a key (matchable), held by requests or not."""
        return len(self._key_of)

    def freeable_blocks(self, req: Request, shared: Container[int] = (),
                        evicted: dict[int, int] | None = None) -> list[int]:
        ref, out = self._ref, []
        for b in self._tables.get(req.request_id, ()):
            if b in shared:
                continue
            held = ref[b] - self._pinned[b]           # pins go when the last table holder does
            if held == 1:
                out.append(b)
            elif evicted is not None:                 # held by several: freed with its last holder
                gone = evicted[b] = evicted.get(b, 0) + 1
                if gone == held:
                    out.append(b)
        return out

    # -- keys ------------------------------------------------------------------------------
    def _chain(self, req: Request, num_blocks: int) -> list[bytes]:
        """The keys of the request's first `num_blocks` blocks (made once, kept until it is freed)."""
        chain = self._chains.setdefault(req.request_id, [])
        have, bs = len(chain), self.block_size
        if have < num_blocks:
            n_prompt = req.num_prompt_tokens
            lo, hi = have * bs, num_blocks * bs
            toks = req.prompt_token_ids[lo:hi] if hi <= n_prompt else \
                req.prompt_token_ids[lo:] + req.output_token_ids[max(lo - n_prompt, 0):hi - n_prompt]
            arr = np.asarray(toks, np.int32)
            key = chain[-1] if chain else salt_key(req.sampling.cache_salt)
            for i in range(num_blocks - have):
                key = hashlib.blake2b(key + arr[i * bs:(i + 1) * bs].tobytes(), digest_size=16).digest()
                chain.append(key)
        return chain

    def _written(self, blocks: list[int]) -> list[int]:
        """The leading blocks of `blocks` that no step still to be issued writes. The runner puts
        the decode launch before the prefill launches, and a 1-token chunk (a start whose prompt
        is cached but for its last token, as the second of two identical prompts is; a swap-in's
        decode) runs in it: reading a block that a prefill of the same step writes, it read the
        block before it was written (wrong tokens, found by fuzzing the engine, 2026-12-06)."""
        unwritten = self._unwritten
        if not unwritten:
            return blocks
        return next((blocks[:i] for i, b in enumerate(blocks) if b in unwritten), blocks)

    def plan_issued(self) -> None:
        """The plan whose blocks were keyed since the last call is applied: its step comes before
        anything a later ledger call sets up (kv_plan.apply_plan calls this last)."""
        self._unwritten.clear()

    def _found(self, req: Request, first: int, limit: int) -> list[int]:
        """The cached blocks that hold the request's blocks first, first + 1, ... (before `limit`),
        up to the first one not cached. Keys are made a few blocks at a time as the walk needs
        them, so an unshared prompt is hashed no further than its first block or so."""
        found, block_of, i = [], self._block_of, first
        while i < limit:
            chain = self._chain(req, min(limit, max(i + 1, 2 * i)))
            while i < len(chain) and i < limit:
                b = block_of.get(chain[i])
                if b is None:
                    return found
                found.append(b)
                i += 1
        return found

    def cached_prefix(self, req: Request, released: Container[int] = ()) -> tuple[int, list[int]]:
        """What `match_prefix` would give a request without KV now, up to its last token (the
        policies leave it out of the iteration's token budget), and the blocks of it that
        requests hold, less `released` (a start shares them: it needs no free block for them).
        Takes nothing (the request's keys are made once and kept until it is freed)."""
        limit = (req.num_known_tokens - 1) // self.block_size
        if limit <= 0 or req.sampling.prompt_logprobs is not None:
            return 0, []
        found = self._found(req, 0, limit)
        ref = self._ref
        return len(found) * self.block_size, [b for b in found if ref[b] and b not in released]

    def match_prefix(self, req: Request, num_tokens: int, counted: int = 0) -> int:
        """Let `req`, about to compute `num_tokens` more tokens, take the cached blocks that
        follow what it has computed: at most up to the block before its chunk's last token, so
        that the step still computes that token (and samples from it where the chunk ends the
        prompt). A request with no KV starts from its first block; a prefill that goes on from
        the middle of a block hands that block back for the cached one that holds the same
        tokens and more. Where the chunk left (num_tokens less the tokens taken, or less
        `counted`, the tokens the policy counted as cached, if more) would be 1 token and read
        blocks this plan's step writes, it takes one block fewer, or, where that still leaves 1
        token, none of those blocks (`_written`). Advances num_computed_tokens; returns the
        tokens taken."""
        rid, bs, start = req.request_id, self.block_size, req.num_computed_tokens
        table = self._tables.get(rid)
        if table is None:
            assert rid not in self._where and start == 0, f"{rid}: match_prefix with KV that is not on the device"
            if req.sampling.prompt_logprobs is None:    # vLLM counts no lookup for those (they skip it)
                self.queries += req.num_known_tokens
                self.requeries += req.num_known_tokens if req.num_preemptions else 0
        elif self._where[rid] is not KVLocation.DEVICE or len(table) != -(-start // bs):
            return 0
        first, limit = start // bs, (min(start + num_tokens, req.num_known_tokens) - 1) // bs
        if limit <= first or req.sampling.prompt_logprobs is not None:
            return 0
        got = self._found(req, first, limit)
        if got and num_tokens - max((first + len(got)) * bs - start, counted) == 1 and \
                any(b in self._unwritten for b in got):
            # one block fewer leaves a chunk of bs + 1 tokens, which runs in a prefill launch
            # after the writer's; if the policy counted it as cached, the chunk stays 1 token
            fewer = (first + len(got) - 1) * bs - start
            got = got[:-1] if counted <= fewer else self._written(got)
        if not got:
            return 0
        self._share(got)
        if table is None:
            self._tables[rid] = table = []
            self._where[rid] = KVLocation.DEVICE
        elif start % bs:                                # its own partial block: the same tokens, fewer
            self._release(table[first:])
            del table[first:]
        table += got
        self._registered[rid] = len(table)
        req.num_computed_tokens = len(table) * bs
        hit = req.num_computed_tokens - start
        self.hits += hit
        self.rehits += hit if req.num_preemptions else 0
        return hit

    def register(self, req: Request, num_new_tokens: int) -> None:
        """Key the request's full blocks that the step about to run completes (tokens known on the
        host). A key a held block has stays there; an unheld cached copy's moves here (that copy
        is freed): kept there until 2026-12-07, the request took the copy back as free space."""
        rid = req.request_id
        full = min(req.num_computed_tokens + num_new_tokens, req.num_known_tokens) // self.block_size
        done = self._registered.get(rid, 0)
        if full <= done:
            return
        chain, table = self._chain(req, full), self._tables[rid]
        key_of, block_of = self._key_of, self._block_of
        for i in range(done, full):
            b, key = table[i], chain[i]
            old = block_of.get(key)
            if b in key_of or old is not None and old not in self._cached:
                continue
            if old is not None:
                del self._cached[old], key_of[old]
                self._free.append(old)
            key_of[b], block_of[key] = key, b
            self._unwritten.add(b)
        self._registered[rid] = full

    def reset(self) -> None:
        """Forget every key (the blocks' contents are no longer trusted); held blocks stay held."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._key_of.clear()
        self._block_of.clear()
        self._chains.clear()
        self._registered.clear()
        self._unwritten.clear()

    # -- ownership -------------------------------------------------------------------------
    def _share(self, blocks: list[int]) -> None:
        """Hold cached blocks (found by key) as well as whoever holds them already."""
        ref, cached = self._ref, self._cached
        for b in blocks:
            if ref[b] == 0:
                del cached[b]
            ref[b] += 1

    def _take(self, n: int) -> list[int]:
        free, cached, ref, out = self._free, self._cached, self._ref, []
        for _ in range(n):
            if free:
                b = free.pop()
            else:                                   # the least recently freed cached block
                b, key = cached.popitem(last=False)
                del self._key_of[b], self._block_of[key]
                self.evictions += 1
            ref[b] = 1
            out.append(b)
        return out

    def _release(self, table: list[int]) -> None:
        ref, key_of, pinned, orphaned = self._ref, self._key_of, self._pinned, False
        for b in reversed(table):          # a request's last blocks are handed out again first
            ref[b] -= 1
            if ref[b] == 0:
                key = key_of.get(b)
                if key is None:
                    self._free.append(b)
                else:
                    self._cached[b] = key
            elif ref[b] == pinned[b]:
                orphaned = True
        if orphaned:
            self._unpin_orphans()

    def free(self, req: Request) -> None:
        rid = req.request_id
        if self._fills:                             # its host copy goes: nothing is owed to it
            self._fills = [c for c in self._fills if c.request.request_id != rid]
        if rid in self._pins:
            self._unpin(rid)
        super().free(req)
        self._chains.pop(rid, None)
        self._registered.pop(rid, None)

    # -- pins: a swapped-out request's shared prefix stays on the device ------------------------
    # A swap-out leaves on the device the leading blocks of the request's KV that other requests
    # hold (keyed and written: the runner copies the rest, KVTransfer.swap_out), holding them as a
    # pin instead of copying them; its swap-in takes them back. When the last request
    # that holds one on the device lets it go, its pinned copies are owed (`take_fills`: the
    # blocks are copied then, before anything can write them, and the pins let go): the device
    # never holds blocks for host copies alone, and the policies count them as the requests'.
    def swap_out(self, req: Request, borrow: int = 0) -> SwapCopy:
        table, ref, pinned, key_of = self._tables.get(req.request_id, []), self._ref, self._pinned, self._key_of
        k = next((i for i, b in enumerate(table) if b not in key_of or b in self._unwritten or
                  ref[b] - pinned[b] < 2), len(table))
        copy = super().swap_out(req, borrow)        # others hold the first `k`: they stay held
        if not k:
            return copy
        pins = table[:k]
        for b in pins:
            ref[b] += 1
            pinned[b] += 1
        self._pins[req.request_id] = (req, pins)
        self.swap_out_pinned += k
        return SwapCopy(req, (NULL_BLOCK,) * k + copy.device_blocks[k:])

    def _unpin(self, rid: str, release: bool = True) -> list[int]:
        pins = self._pins.pop(rid)[1]
        for b in pins:
            self._pinned[b] -= 1
        if release:
            self._release(pins)
        return pins

    def _unpin_orphans(self) -> None:
        """Copy out and let go the pins of blocks no table holds any more (see above)."""
        for rid, (req, pins) in list(self._pins.items()):
            if rid in self._pins and any(self._ref[b] == self._pinned[b] for b in pins):
                self._fills.append(SwapCopy(req, tuple(pins) + (NULL_BLOCK,) * (self._host[rid] - len(pins)), fill=True))
                self._unpin(rid)

    def _on_device(self, req: Request) -> list[int]:
        """The device blocks that hold the first full blocks of a swapped-out request's KV: its
        pins, then those under their keys (another request's, or cached), up to the first one not there."""
        pins = self._pins.get(req.request_id, (None, []))[1]
        full = min(self._host.get(req.request_id, 0), min(req.num_computed_tokens, req.num_known_tokens) // self.block_size)
        return pins + (self._found(req, len(pins), full) if full > len(pins) else [])

    def swap_in_shares(self, req: Request, released: Container[int] = ()) -> tuple[int, list[int]]:
        found = self._on_device(req)
        ref = self._ref
        return len(found), [b for b in found if ref[b] and b not in released]

    def _restore(self, req: Request, n: int) -> tuple[list[int], list[int]]:
        """A swap-in takes its pins and the full blocks of its KV that the device still holds under
        their keys (another holder's, or cached) as they are, and copies only the rest: a shared
        prefix comes back shared. The copy writes NULL_BLOCK in their place (nothing lands there
        that is read)."""
        pinned = len(self._pins.get(req.request_id, (None, []))[1])      # old blocks, written whatever their keys
        found = self._on_device(req)
        found = found[:pinned] + self._written(found[pinned:])   # an on-demand one runs in this plan's step
        ref = self._ref
        self._fits_swap_in(req, n - sum(1 for b in found if ref[b]))     # held ones take no free block
        self._share(found)                          # first: the blocks taken below must not evict them
        if req.request_id in self._pins:            # its pins (first in `found`) are now its table's
            for b in self._unpin(req.request_id, release=False):
                ref[b] -= 1
        own = self._take(n - len(found))
        self._registered[req.request_id] = 0        # its copied blocks get keys again as it runs
        self.swap_in_shared += len(found)
        return found + own, [NULL_BLOCK] * len(found) + own

    def _check_blocks(self) -> None:
        pins = Counter(b for _, p in self._pins.values() for b in p)
        assert all(self._pinned[b] == pins.get(b, 0) for b in range(self.num_blocks)), "pin counts are off"
        assert all(self._ref[b] > n for b, n in pins.items()), "a block held by pins alone"
        refs = Counter(b for t in self._tables.values() for b in t) + pins
        assert all(self._ref[b] == refs.get(b, 0) for b in range(self.num_blocks)), "reference counts are off"
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free) and not free & cached and not (free | cached) & set(refs), \
            "a block is both free and held, or free twice"
        assert free | cached | set(refs) == set(range(1, self.num_blocks)), "blocks leaked or out of range"
        assert NULL_BLOCK not in free | cached | set(refs)
        assert len(self._block_of) == len(self._key_of) and \
            all(self._block_of[k] == b for b, k in self._key_of.items()), "the key maps disagree"
        assert all(self._key_of.get(b) == k for b, k in self._cached.items()), "a cached block without its key"
        assert not free & set(self._key_of), "a free block keeps a key (it could be matched, then overwritten)"
        # (_chains also holds waiting requests' keys, made when a policy looked them up)
        assert set(self._registered) <= set(self._where), "registration kept for a request without KV"


def kv_manager(model_cfg, cfg, pending_bytes: int, layout) -> KVManager:
    """The engine's KV ledger: pools sized by kv_sizing.device_pool_blocks / host_pool_blocks
    (`pending_bytes`: weight copies still to be placed), with prefix caching if cfg asks."""
    num_blocks = device_pool_blocks(model_cfg, cfg, pending_bytes, layout)
    num_host = host_pool_blocks(model_cfg, cfg, num_blocks, layout)
    return (PrefixCachingKVManager if cfg.enable_prefix_caching else KVManager)(num_blocks, cfg.block_size, num_host)
