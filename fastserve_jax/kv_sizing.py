"""How many KV blocks the pools hold: bytes per block, the device pool from an accelerator's
memory (gpu_memory_utilization) or a fixed CPU budget, the host pool from swap_space, each
checked against the memory it would live in. The ledger that uses them is kv_cache.py."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def kv_block_bytes(model_cfg, cfg) -> int:
    """Bytes of one block of K and V over all layers (a ModelConfig and an EngineConfig)."""
    import jax                       # here, so the simulator's imports stay free of jax

    itemsize = jax.numpy.dtype(cfg.for_platform(jax.default_backend()).dtype).itemsize
    return 2 * model_cfg.num_layers * cfg.block_size * model_cfg.num_kv_heads * model_cfg.head_dim * itemsize


def _accelerator_memory(layout) -> dict | None:
    """The first device's memory_stats() where it reports a bytes_limit (an accelerator), else None."""
    dev = layout.devices[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    return stats if stats and "bytes_limit" in stats else None


def _pool_shards(layout) -> int:
    """The devices one KV block splits over: the pp stages times the tp_kv KV-head shards."""
    return layout.pp * layout.meshes.tp_kv


def auto_num_blocks(model_cfg, cfg, param_bytes: int, layout, cpu_budget_bytes: int = 4 << 30) -> int:
    """Blocks that fit: on an accelerator, cfg.gpu_memory_utilization of one device's memory minus
    what is in use (the placed weights among it) and its share of `param_bytes`, weights still to
    be allocated (the runner's per-layer copies where the caller keeps the stacked ones), over
    its share of a block (a block splits over the pp stages and the tp_kv KV-head shards of the
    `ModelLayout`); on CPU, a fixed budget for the whole pool, whatever the fraction. Never more
    than max_num_seqs full-length sequences need."""
    per_block = kv_block_bytes(model_cfg, cfg)
    stats = _accelerator_memory(layout)
    if stats:
        avail = (int(stats["bytes_limit"] * cfg.gpu_memory_utilization) - param_bytes // len(layout.devices)
                 - stats.get("bytes_in_use", 0)) * _pool_shards(layout)
    else:
        avail = cpu_budget_bytes
    wanted = cfg.max_num_seqs * cfg.max_blocks_per_seq + 1
    if stats and avail // per_block < 2:     # vLLM's refusal; a 1-block pool cut every answer at 16 tokens
        raise ValueError(f"gpu_memory_utilization={cfg.gpu_memory_utilization} of the device's "
                         f"{stats['bytes_limit'] / 2**30:.1f} GiB leaves no room for a KV block beside the "
                         f"{(stats.get('bytes_in_use', 0) + param_bytes // len(layout.devices)) / 2**30:.1f} GiB "
                         "the weights and others take; raise it, or give num_device_blocks")
    return max(2, min(wanted, avail // per_block))


def _memory(layout) -> tuple[str, int]:
    """(where, bytes) of the memory one device's arrays live in: an accelerator's, else the host's."""
    stats = _accelerator_memory(layout)
    if stats:
        return "device", stats["bytes_limit"]
    return "host", _memory_of_host()


def check_prefill_scores(model_cfg, cfg, layout) -> None:
    """A ValueError where the reference attention's largest prefill launch could not fit: it
    holds float32 scores for every query head of a device, every packed token (the largest
    prefill_token_bucket) and every gathered key (the largest block_bucket's tokens), and XLA on
    the CPU asked for one buffer of 3x that (2-layer demo model, max_num_batched_tokens 32768 /
    65536: 27.5 GB / 107 GB; at 16384, 7.3 GB by this rule, it served at 10.7 GB RSS). Until
    2026-12-07 such an engine started, and the first long launch failed every request (or the
    warm-up failed the start)."""
    if cfg.attention_backend != "reference" or not cfg.prefill_token_buckets or not cfg.block_buckets:
        return
    heads = -(-model_cfg.num_heads // layout.tp)
    need = 3 * 4 * heads * cfg.prefill_token_buckets[-1] * cfg.block_buckets[-1] * cfg.block_size
    where, limit = _memory(layout)
    if need > limit:
        raise ValueError(f"max_num_batched_tokens={cfg.max_num_batched_tokens}: the reference attention's largest "
                         f"prefill launch ({cfg.prefill_token_buckets[-1]} tokens over "
                         f"{cfg.block_buckets[-1] * cfg.block_size} keys, {heads} heads) needs about "
                         f"{need / 2**30:.0f} GiB, more than the {limit / 2**30:.0f} GiB of {where} memory; lower "
                         "max_num_batched_tokens (or max_model_len)")


def device_pool_blocks(model_cfg, cfg, param_bytes: int, layout) -> int:
    """cfg.num_device_blocks, or auto_num_blocks where it is 0. A pool asked for that is larger
    than the memory it would live in (the devices', or the host's on CPU) is a ValueError here,
    not a MemoryError or an allocator's failure somewhere later."""
    if not cfg.num_device_blocks:
        return auto_num_blocks(model_cfg, cfg, param_bytes, layout)
    where, limit = _memory(layout)
    limit *= _pool_shards(layout) if where == "device" else 1
    need = cfg.num_device_blocks * kv_block_bytes(model_cfg, cfg)
    if need > limit:
        raise ValueError(f"num_device_blocks={cfg.num_device_blocks} needs {need / 2**30:.1f} GiB of KV cache, more "
                         f"than the {limit / 2**30:.1f} GiB of {where} memory; lower it, or leave it out to size the "
                         "pool from memory")
    return cfg.num_device_blocks


def host_block_bytes(model_cfg, cfg, layout=None) -> int:
    """Host memory one swapped-out block takes under a `ModelLayout` (None: one device): its K and
    V once where the host copy splits each KV head over the tp_rep devices that hold it, tp_rep
    times where the copy stays replicated (across processes, or where neither head_dim nor
    block_size divides: sharding/host_copy.py)."""
    per_block = kv_block_bytes(model_cfg, cfg)
    if layout is None:
        return per_block
    from fastserve_jax.sharding.host_copy import host_bytes

    shape = layout.cache_shape(1, cfg.block_size)
    return host_bytes(per_block, [layout.cache_sharding(s, shape) for s in range(layout.pp)], shape)


def auto_num_host_blocks(model_cfg, cfg, num_device_blocks: int, layout=None, budget_bytes: int | None = None) -> int:
    """As many host blocks as the device pool has, within `budget_bytes` of host memory as the
    host copies really take it (`host_block_bytes`). None: cfg.swap_space GiB per device of the
    layout (vLLM's swap space, 4 GiB per GPU by default; pinned host memory on CUDA is a capped
    pool, see JAX_NOTES)."""
    if budget_bytes is None:
        budget_bytes = int(cfg.swap_space * (1 << 30)) * (1 if layout is None else len(layout.devices))
    return max(0, min(num_device_blocks - 1, budget_bytes // host_block_bytes(model_cfg, cfg, layout)))


def host_pool_blocks(model_cfg, cfg, num_device_blocks: int, layout=None) -> int:
    """The host pool's blocks: none under the recompute policy, else cfg.num_host_blocks where
    given (it wins over swap_space), else auto_num_host_blocks. 0 leaves evictions to
    recomputation (swap_policy.SwapPolicy.swaps)."""
    if cfg.swap_policy == "recompute":
        if cfg.num_host_blocks or (cfg.num_host_blocks is None and cfg.swap_space not in (0, type(cfg).swap_space)):
            log.warning("num_host_blocks/swap_space unused: swap_policy 'recompute' keeps no host pool")
        return 0
    if cfg.num_host_blocks is None:
        n = auto_num_host_blocks(model_cfg, cfg, num_device_blocks, layout)
        if n == 0:
            log.warning("swap_policy %r without a host pool (swap_space %s GiB holds no block): preempted requests "
                        "are recomputed, as with swap_policy 'recompute'", cfg.swap_policy, cfg.swap_space)
        return n
    if cfg.num_host_blocks == 0:
        log.warning("swap_policy %r with num_host_blocks=0: preempted requests are recomputed, as with swap_policy "
                    "'recompute'", cfg.swap_policy)
    need, ram = cfg.num_host_blocks * host_block_bytes(model_cfg, cfg, layout), _memory_of_host()
    if need > 0.7 * ram:       # vLLM refuses a swap space past 70% of the host's memory; this one took 10**12 blocks
        raise ValueError(f"num_host_blocks={cfg.num_host_blocks} needs {need / 2**30:.1f} GiB of host memory, more "
                         f"than 70% of the host's {ram / 2**30:.1f} GiB; lower it, or give swap_space in GiB instead")
    return cfg.num_host_blocks


def _memory_of_host() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
