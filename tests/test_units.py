"""Pure unit tests: KV block manager, FCFS policy, sampling parameters, device sampling,
detokenizer stop strings. No model involved."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve_jax.config import SCHEDULER_CHOICES, EngineConfig
from fastserve_jax.sampling_params import SamplingParams, sampler_seed
from fastserve_jax.detokenizer import IncrementalDetokenizer
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.request import Request
from fastserve_jax.sampling import SamplingArrays, sample
from fastserve_jax import sampling_draw
from fastserve_jax.sampling_draw import cut_logits
from fastserve_jax.scheduler import POLICIES, Limits, make_scheduler


def req(rid: str, prompt_len: int, t: float = 0.0, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), t)


# -- KV manager -------------------------------------------------------------------------------
def test_kv_allocates_per_token_not_per_max_len():
    kv = KVManager(num_blocks=10, block_size=4)
    a = req("a", 5)
    assert kv.blocks_needed(a, 5) == 2
    kv.allocate(a, 5)
    a.num_computed_tokens = 5
    assert kv.blocks_needed(a, 3) == 0 and kv.blocks_needed(a, 4) == 1
    kv.allocate(a, 4)
    assert len(kv.block_table(a)) == 3 and kv.num_free_blocks == 6
    assert 0 not in kv.block_table(a)  # the null block is never handed out
    kv.check_integrity()
    kv.free(a)
    assert kv.num_free_blocks == 9
    kv.check_integrity()


def test_kv_refuses_plan_that_does_not_fit():
    kv = KVManager(num_blocks=3, block_size=4)
    with pytest.raises(RuntimeError, match="does not fit"):
        kv.allocate(req("a", 12), 12)
    kv.check_integrity()


def test_kv_integrity_catches_double_ownership():
    kv = KVManager(num_blocks=5, block_size=4)
    a = req("a", 4)
    kv.allocate(a, 4)
    kv._free.append(kv.block_table(a)[0])
    with pytest.raises(AssertionError):
        kv.check_integrity()


# -- FCFS -------------------------------------------------------------------------------------
def _fcfs(num_blocks=100, block_size=4, seqs=4, budget=16):
    kv = KVManager(num_blocks, block_size)
    return make_scheduler("fcfs", Limits(seqs, budget), kv), kv


def _apply(plan, kv):
    for r in plan.preempted:
        kv.free(r)
        r.num_computed_tokens = 0
    for s in plan.scheduled:
        kv.allocate(s.request, s.num_tokens)
        s.request.num_computed_tokens += s.num_tokens
        if not s.request.is_prefilling and s.request.num_pending_tokens == 0:
            s.request.output_token_ids.append(7)


def test_fcfs_chunks_prefill_within_token_budget_in_arrival_order():
    sched, kv = _fcfs(budget=16)
    a, b = req("a", 20, 0.0), req("b", 3, 1.0)
    sched.add(a)
    sched.add(b)
    p1 = sched.schedule(0)
    assert [(s.request.request_id, s.num_tokens) for s in p1.scheduled] == [("a", 16)]
    _apply(p1, kv)
    p2 = sched.schedule(0)
    assert [(s.request.request_id, s.num_tokens) for s in p2.scheduled] == [("a", 4), ("b", 3)]
    _apply(p2, kv)
    p3 = sched.schedule(0)  # both decode now
    assert [(s.request.request_id, s.num_tokens) for s in p3.scheduled] == [("a", 1), ("b", 1)]


def test_fcfs_respects_max_num_seqs():
    sched, kv = _fcfs(seqs=2, budget=100)
    for i in range(3):
        sched.add(req(f"r{i}", 2, i))
    plan = sched.schedule(0)
    assert [s.request.request_id for s in plan.scheduled] == ["r0", "r1"]


def test_fcfs_preempts_latest_when_kv_runs_out():
    sched, kv = _fcfs(num_blocks=5, block_size=4, budget=100)  # 4 usable blocks
    a, b = req("a", 8, 0.0), req("b", 8, 1.0)
    sched.add(a)
    sched.add(b)
    _apply(sched.schedule(0), kv)        # both prefilled: 2 + 2 blocks, pool full
    assert kv.num_free_blocks == 0
    plan = sched.schedule(0)             # a's decode needs a third block: b loses its KV
    assert plan.preempted == [b]
    assert [s.request.request_id for s in plan.scheduled] == ["a"]
    _apply(plan, kv)
    kv.check_integrity()
    assert b.num_computed_tokens == 0 and list(sched.waiting) == [b]


# -- sampling params --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-2), "top_k"),
    (dict(logprobs=21), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop=5), "stop must be"),                  # a TypeError before
    (dict(stop=iter(["END"])), "stop must be"),      # accepted with its stops lost before
    (dict(stop={"END": 1}), "stop must be"),
    (dict(ignore_eos="no"), "ignore_eos"),           # accepted as true before
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=True), "top_p"),
    (dict(logprobs=True), "logprobs"),
    (dict(n=0), "n must be"),
    (dict(stop_token_ids=0), "stop_token_ids must be"),                  # no stop token before
    (dict(stop_token_ids=np.array([1, 2])), "stop_token_ids must be"),   # numpy's truth-value error before
    (dict(logit_bias=0), "logit_bias must"),                             # no bias before
    (dict(logit_bias=[]), "logit_bias must"),
    (dict(repetition_penalty=1e-300), "repetition_penalty must be"),     # 0 in float32: token 0 every step before
    (dict(temperature=1e300), "temperature must be"),                    # inf in float32
])
def test_sampling_params_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_take_numpy_scalars_as_pythons():
    """An integer or float from numpy (a config's array, a sweep's np.arange) is its Python
    value, as a token id in a prompt or a list already is; refused as not an integer before."""
    sp = SamplingParams(max_tokens=np.int64(5), n=np.int32(2), seed=np.uint64(7), top_k=np.int16(3),
                        temperature=np.float32(0.5), stop_token_ids=[np.int64(9)], logprobs=np.int8(1))
    assert (sp.max_tokens, sp.n, sp.seed, sp.top_k, sp.temperature, sp.stop_token_ids, sp.logprobs) == \
        (5, 2, 7, 3, 0.5, [9], 1)
    assert type(sp.max_tokens) is int and type(sp.temperature) is float and type(sp.stop_token_ids[0]) is int


@pytest.mark.parametrize("kwargs, match", [
    (dict(scheduler="skipjoin"), "unknown scheduler"),     # found only after load and warm-up before
    (dict(num_device_blocks=10.5), "num_device_blocks"),
    (dict(num_device_blocks=True), "num_device_blocks"),
    (dict(seed="x"), "seed"),
    (dict(seed=None), "seed"),
    (dict(block_size=100000), "block_size=100000 exceeds max_model_len=2048"),    # minutes per step before
    (dict(gpu_memory_utilization=0), r"gpu_memory_utilization must be a fraction in \(0, 1\]"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=True), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization="0.9"), "gpu_memory_utilization"),
    (dict(swap_space=-1), r"swap_space must be a number of GiB in \[0, 1048576\]"),
    (dict(swap_space=1e300), "swap_space"),          # an OverflowError while sizing the host pool before
    (dict(max_num_seqs=10**12, max_num_batched_tokens=10**12), "max_num_seqs must be at most 65536"),     # out of host memory before
    (dict(max_model_len=1), "max_model_len must be at least 2"),           # no request could ever run
    (dict(swap_space=float("inf")), "swap_space"),
    (dict(swap_space=True), "swap_space"),
    (dict(swap_space="4"), "swap_space"),
])
def test_engine_config_rejects_bad_values_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)
    assert sorted(SCHEDULER_CHOICES) == sorted(POLICIES)      # the names it checks are the policies'


def test_gpu_memory_utilization_sizes_the_device_pool_on_an_accelerator_only():
    """vLLM's fraction of each device's memory the engine may use: the auto-sized KV pool gets
    that less the weights and what is in use; on the CPU backend a fixed budget sizes the pool
    and the fraction changes nothing. An explicit num_device_blocks wins (device_pool_blocks)."""
    from types import SimpleNamespace
    from fastserve_jax.kv_sizing import auto_num_blocks, device_pool_blocks, kv_block_bytes
    from fastserve_jax.models.config import ModelConfig

    mcfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    gib = 1 << 30

    def layout(platform):
        stats = {"bytes_limit": 10 * gib, "bytes_in_use": gib}
        dev = SimpleNamespace(platform=platform, memory_stats=lambda: stats)
        return SimpleNamespace(devices=[dev], pp=1, tp=1, meshes=SimpleNamespace(tp_kv=1))

    def blocks(frac, platform, **kw):
        cfg = EngineConfig(max_num_seqs=1 << 16, max_num_batched_tokens=1 << 16, dtype="float32", gpu_memory_utilization=frac, **kw)
        return device_pool_blocks(mcfg, cfg, gib, layout(platform)), kv_block_bytes(mcfg, cfg)

    (half, per_block), (most, _) = blocks(0.5, "gpu"), blocks(0.9, "gpu")
    assert half == (5 * gib - gib - gib) // per_block and most == (9 * gib - gib - gib) // per_block
    assert EngineConfig().gpu_memory_utilization == 0.9                        # vLLM's default
    assert blocks(0.5, "cpu")[0] == blocks(0.9, "cpu")[0] == (4 * gib) // per_block
    assert blocks(0.5, "gpu", num_device_blocks=100)[0] == 100
    # nothing left for a block: refused as vLLM does (a 2-block pool, 16 tokens, was served until 2026-12-07)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.2 of the device's 10.0 GiB leaves no room"):
        auto_num_blocks(mcfg, EngineConfig(gpu_memory_utilization=0.2), gib, layout("gpu"))
    # placed weights are among the bytes in use: only those still to come are subtracted again
    cfg = EngineConfig(max_num_seqs=1 << 16, max_num_batched_tokens=1 << 16, dtype="float32", gpu_memory_utilization=0.5)
    assert auto_num_blocks(mcfg, cfg, 0, layout("gpu")) == (5 * gib - gib) // per_block


def test_pools_and_launches_past_the_memory_they_live_in_are_refused_at_start(monkeypatch):
    """The reference attention's largest prefill holds heads x tokens x keys float32 scores:
    with max_num_batched_tokens 65536 the demo model's server started, then every request
    failed asking 107 GB. An explicit host pool is held to 70% of the host's memory (vLLM's
    swap space rule); 10**12 blocks were taken."""
    from types import SimpleNamespace
    from fastserve_jax import kv_sizing
    from fastserve_jax.models.config import ModelConfig

    mcfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=2, num_kv_heads=2, head_dim=32, max_position_embeddings=2048)
    monkeypatch.setattr(kv_sizing, "_memory_of_host", lambda: 24 << 30)
    cpu = SimpleNamespace(devices=[SimpleNamespace(platform="cpu")], pp=1, tp=1, meshes=SimpleNamespace(tp_kv=1))

    def launch(budget, backend="reference"):
        cfg = EngineConfig(max_num_batched_tokens=budget, attention_backend=backend, dtype="float32").resolve()
        kv_sizing.check_prefill_scores(mcfg, cfg, cpu)

    launch(16384)                                       # 6.8 GiB by the rule; it served (10.7 GB RSS)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens=32768: the reference attention's largest prefill"):
        launch(32768)
    launch(65536, backend="pallas")                     # the kernels read the cache in tiles
    per = kv_sizing.host_block_bytes(mcfg, EngineConfig(dtype="float32"))
    cfg = EngineConfig(dtype="float32", num_host_blocks=int(0.7 * (24 << 30)) // per)
    assert kv_sizing.host_pool_blocks(mcfg, cfg, 100) == cfg.num_host_blocks
    with pytest.raises(ValueError, match=r"num_host_blocks=1000000000000 needs .* more than 70% of the host's 24.0"):
        kv_sizing.host_pool_blocks(mcfg, EngineConfig(dtype="float32", num_host_blocks=10**12), 100)


def test_the_engine_counts_the_weights_its_runner_still_copies_when_it_sizes_the_pool(monkeypatch, tmp_path):
    """An engine that owns its weights splits the stacked layer leaves in place, so the weights
    already in use are all it will hold: the auto-sized pool subtracts nothing more for them.
    Where the caller keeps the stacked leaves, the runner's per-layer copies come on top of
    them: their bytes are subtracted from the pool's share before it is allocated."""
    import jax
    import fastserve_jax.engine as engine_mod
    import fastserve_jax.prefix_cache as ledger_mod
    from fastserve_jax.models.config import ModelConfig
    from fastserve_jax.models.random_checkpoint import random_params, save_byte_tokenizer
    from fastserve_jax.models.tokenizer import load_tokenizer
    from fastserve_jax.sharding.layout import ModelLayout
    from fastserve_jax.sharding.parallel_config import ParallelConfig

    asked = []
    real = ledger_mod.device_pool_blocks               # the engine's pools are sized in prefix_cache.kv_manager
    monkeypatch.setattr(ledger_mod, "device_pool_blocks", lambda m, c, b, lay: asked.append(b) or real(m, c, b, lay))
    mcfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    save_byte_tokenizer(str(tmp_path), mcfg.vocab_size, None)
    tok = load_tokenizer(str(tmp_path))
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64, num_device_blocks=16)
    layout = ModelLayout(mcfg, ParallelConfig(1, 1))
    kept = layout.place_params(random_params(mcfg))                   # placed, and the caller keeps them
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(kept["layers"]))
    engine_mod.LLMEngine(mcfg, kept, tok, cfg, layout=layout)
    engine_mod.LLMEngine(mcfg, layout.place_params(random_params(mcfg)), tok, cfg, layout=layout, own_params=True)
    assert asked == [layer_bytes, 0] and layer_bytes > 0

def test_swap_space_sizes_the_host_pool_in_gib_per_device_and_num_host_blocks_wins():
    """vLLM's swap_space: GiB of host memory per device (default 4) for swapped-out KV, counted
    in the bytes the host copies take; 0 is no host pool (evictions recompute, as with
    num_host_blocks=0); the pool holds at most as many blocks as the device pool; an explicit
    num_host_blocks wins, and the recompute policy keeps no host pool."""
    from fastserve_jax.kv_sizing import host_block_bytes, host_pool_blocks
    from fastserve_jax.models.config import ModelConfig
    from fastserve_jax.sharding.layout import ModelLayout
    from fastserve_jax.sharding.parallel_config import ParallelConfig

    mcfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    per_block = host_block_bytes(mcfg, EngineConfig(max_model_len=256, dtype="float32"))     # 8 KiB

    def pool(device_blocks=1000, layout=None, **kw):
        return host_pool_blocks(mcfg, EngineConfig(max_model_len=256, dtype="float32", **kw), device_blocks, layout)

    assert EngineConfig().swap_space == 4 and pool() == 999                      # 4 GiB hold them all
    assert pool(swap_space=10 * per_block / 2**30) == 10 and pool(swap_space=0) == 0
    assert pool(swap_space=0, num_host_blocks=7) == 7 == pool(swap_space=1, num_host_blocks=7)
    assert pool(num_host_blocks=7, swap_policy="recompute") == 0 == pool(swap_policy="recompute")
    assert pool(device_blocks=5) == 4                                            # the device pool's, at most
    tp2 = ModelLayout(mcfg, ParallelConfig(2, 1))      # a KV head per device: each holds half of a block
    assert host_block_bytes(mcfg, EngineConfig(max_model_len=256, dtype="float32"), tp2) == per_block
    assert pool(layout=tp2, swap_space=10 * per_block / 2**30) == 20


def test_host_pool_settings_that_do_nothing_say_so(caplog):
    """A host pool asked for under the recompute policy, or a swapping policy left without one,
    was taken without a word (the second recomputes as 'recompute' does)."""
    from fastserve_jax.kv_sizing import host_pool_blocks
    from fastserve_jax.models.config import ModelConfig

    mcfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)

    def said(**kw):
        caplog.clear()
        host_pool_blocks(mcfg, EngineConfig(max_model_len=256, dtype="float32", **kw), 1000)
        return caplog.text

    with caplog.at_level("WARNING", logger="fastserve_jax.kv_sizing"):
        assert "unused: swap_policy 'recompute' keeps no host pool" in said(swap_policy="recompute", num_host_blocks=100)
        assert "unused" in said(swap_policy="recompute", swap_space=8)
        assert said(swap_policy="recompute") == "" == said(swap_policy="recompute", swap_space=0)
        assert "'proactive' without a host pool" in said(swap_policy="proactive", swap_space=0)
        assert "'reactive' with num_host_blocks=0: preempted requests are recomputed" in said(swap_policy="reactive",
                                                                                            num_host_blocks=0)
        assert said(swap_policy="proactive") == ""


def test_a_context_shorter_than_the_default_block_still_takes_the_default_block():
    assert EngineConfig(max_model_len=8).block_size == 16    # refused only past max(max_model_len, 16)


def test_vllm_spellings_a_ported_script_uses():
    """SamplingParams(2) set max_tokens (vLLM's first field is n): keywords only now; dtype
    "float" is vLLM's float32; scheduling_policy "fcfs" (vLLM's default) is taken with a
    warning, "priority" refused (both were "unknown LLM arguments")."""
    from fastserve_jax.vllm_options import llm_keywords

    with pytest.raises(TypeError):
        SamplingParams(2)
    assert EngineConfig(dtype="float").dtype == "float32"
    with pytest.raises(ValueError, match="float16 is not a serving dtype"):
        EngineConfig(dtype="half")
    assert llm_keywords({"scheduling_policy": "fcfs", "max_num_seqs": 4}) == {"max_num_seqs": 4}
    with pytest.raises(ValueError, match="scheduling_policy priority: request priorities are not implemented"):
        llm_keywords({"scheduling_policy": "priority"})
    # vLLM keywords at their defaults (each "unknown LLM arguments" until 2026-12-07), refused at others
    assert llm_keywords(dict(task="generate", skip_tokenizer_init=False, hf_overrides=None, enable_sleep_mode=False,
                             tokenizer_revision=None, max_num_seqs=4)) == {"max_num_seqs": 4}
    assert llm_keywords(dict(task="auto", hf_overrides={})) == {}
    for kw, why in ((dict(task="embed"), "only text generation"), (dict(skip_tokenizer_init=True), "detokenizes"),
                    (dict(enable_sleep_mode=True), "sleep mode"), (dict(hf_overrides={"a": 1}), "config.json"),
                    (dict(tokenizer_revision="main"), "revisions"), (dict(skip_tokenizer_init=0), "detokenizes")):
        with pytest.raises(ValueError, match=f"^{next(iter(kw))}=.*{why}"):
            llm_keywords(kw)


def test_default_policy_options_beside_a_scheduler_config_are_refused():
    """They set the default config; beside a scheduler_config they were ignored without a word."""
    from fastserve_jax.config import SchedulerConfig

    for kw in (dict(starvation_threshold=0.05), dict(protect_decodes=False), dict(tail_slowdown=0.0),
               dict(prompt_neighbors=0)):
        EngineConfig(**kw)
        with pytest.raises(ValueError, match=f"{next(iter(kw))} set the default policy config"):
            EngineConfig(scheduler_config=SchedulerConfig(), **kw)


def test_sampler_seed_keeps_32_bit_seeds_and_hashes_the_rest():
    assert [sampler_seed(s) for s in (0, 7, 2**32 - 1)] == [0, 7, 2**32 - 1]
    wide = [sampler_seed(s) for s in (2**32, 2**40, -1, -(2**32), 2**64)]
    assert len(set(wide) | {0, 7, 2**32 - 1}) == 8 and all(0 <= s < 2**32 for s in wide)


def test_engine_config_buckets_cover_limits():
    cfg = EngineConfig(max_model_len=300, max_num_seqs=12, max_num_batched_tokens=100, block_size=16).resolve()
    assert cfg.decode_batch_buckets == (1, 2, 4, 8, 12)
    assert cfg.prefill_token_buckets[-1] == 100
    assert cfg.block_buckets[-1] >= cfg.max_blocks_per_seq
    with pytest.raises(ValueError, match="must reach"):
        EngineConfig(max_num_seqs=8, decode_batch_buckets=(1, 2, 4)).resolve()
    # past the largest launch: never run, yet profiled and compiled (1,000,000 rows ran the cost
    # profile out of memory with a traceback): a list ends at the first that reaches its limit
    assert EngineConfig(max_num_seqs=12, decode_batch_buckets=(4, 16)).resolve().decode_batch_buckets == (4, 16)
    assert EngineConfig(decode_batch_buckets=(1, 32, 1000000)).resolve().decode_batch_buckets == (1, 32)
    cfg = EngineConfig(max_num_batched_tokens=100, prefill_token_buckets=(64, 256, 512, 4096)).resolve()
    assert cfg.prefill_token_buckets == (64, 256)
    need = EngineConfig().max_prefill_blocks      # block buckets were refused as too much memory for the token budget
    assert EngineConfig(block_buckets=(4, need, 1000000)).resolve().block_buckets == (4, need)


def test_a_token_budget_below_the_batch_is_refused_as_in_vllm():
    """Each sequence's decode takes a token of the budget, so a budget of 4 served batches of 4
    however many sequences were asked for, without a word; vLLM refuses it at start."""
    from fastserve_jax.sim_config import SimConfig

    for make in (EngineConfig, SimConfig):
        with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4\) must be >= max_num_seqs \(8\)"):
            make(max_num_seqs=8, max_num_batched_tokens=4)
        make(max_num_seqs=8, max_num_batched_tokens=8)


def test_block_buckets_scale_with_the_models_weight_to_kv_ratio():
    from fastserve_jax.runner.keys import DecodeKey, PrefillKey
    from fastserve_jax.runner.launch import LaunchBuilder
    cfg = EngineConfig(max_model_len=2048, max_num_seqs=128, max_num_batched_tokens=2048)
    full = LaunchBuilder(cfg.resolve()).launch_keys()
    # an 8B-like model: 16 GB of weights, 2 MiB per KV block: small launches pad to the
    # blocks whose reads are an eighth of the weights'
    big = LaunchBuilder(cfg.resolve(16 << 30, 2 << 20, platform="gpu"))
    assert big.cfg.min_launch_blocks == 1024
    assert [big.floor(r, decode=True) for r in big.cfg.decode_batch_buckets] == [128, 128, 128, 128, 64, 32, 16, 8]
    assert len(big.launch_keys()) < len(full) / 2
    assert big.decode_key(1, 3) == DecodeKey(1, 128) and big.decode_key(64, 3) == DecodeKey(64, 16)
    for t in cfg.resolve().prefill_token_buckets:        # prefill rows pad the same way
        rows, low = big.prefill_shape(t)[0], min(k.blocks for k in big.launch_keys() if k == PrefillKey(t, k.blocks))
        assert low == big.floor(rows) and (rows * low <= 1024 or low == big.cfg.block_buckets[0])
        above = big.cfg.block_buckets[big.cfg.block_buckets.index(low) + 1:]
        assert not above or rows * above[0] > 1024
    # a model whose KV outweighs its weights keeps every bucket; 0 turns the rule off
    assert len(LaunchBuilder(cfg.resolve(1 << 20, 64 << 10, platform="gpu")).launch_keys()) == len(full)
    # on CPU the block gather costs more than the weights it is weighed against: every bucket
    assert len(LaunchBuilder(cfg.resolve(16 << 30, 2 << 20, platform="cpu")).launch_keys()) == len(full)
    fixed = dataclasses.replace(cfg, launch_kv_fraction=0.125).resolve(16 << 30, 2 << 20, platform="cpu")
    assert fixed.min_launch_blocks == 1024
    off = dataclasses.replace(cfg, launch_kv_fraction=0.0).resolve(16 << 30, 2 << 20, platform="gpu")
    assert len(LaunchBuilder(off).launch_keys()) == len(full)
    with pytest.raises(ValueError, match="launch_kv_fraction"):
        EngineConfig(launch_kv_fraction=1.5)


# -- device sampling --------------------------------------------------------------------------
# jitted once: the sampler run op by op (its bisection loops and conds each dispatched) took
# 4.8 s over test_sampling_top_k_and_seed's 62 calls
_jsample = jax.jit(sample, static_argnames=("greedy", "with_logprobs"))


def _arrays(n, temp=1.0, top_k=-1, top_p=1.0, seed=0, step=0, min_p=0.0):
    f = lambda v, dt: jnp.full((n,), v, dt)
    return SamplingArrays(f(temp, jnp.float32), f(top_k, jnp.int32), f(top_p, jnp.float32), f(min_p, jnp.float32),
                          f(seed, jnp.uint32), f(step, jnp.int32))


def test_sampling_greedy_and_degenerate_filters_agree():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    want = np.argmax(np.asarray(logits), -1)
    assert (np.asarray(_jsample(logits, _arrays(4), greedy=True, with_logprobs=False).tokens) == want).all()
    assert (np.asarray(_jsample(logits, _arrays(4, temp=0.0), greedy=False, with_logprobs=False).tokens) == want).all()
    assert (np.asarray(_jsample(logits, _arrays(4, top_k=1), greedy=False, with_logprobs=False).tokens) == want).all()
    assert (np.asarray(_jsample(logits, _arrays(4, top_p=1e-6), greedy=False, with_logprobs=False).tokens) == want).all()


def test_sampling_top_k_and_seed():
    logits = jnp.zeros((1, 10), jnp.float32).at[0, :3].set(5.0)
    seen = set()
    for step in range(60):
        out = _jsample(logits, _arrays(1, top_k=3, seed=1, step=step), greedy=False, with_logprobs=False)
        seen.add(int(out.tokens[0]))
    assert seen == {0, 1, 2}
    a = _jsample(logits, _arrays(1, seed=5, step=3), greedy=False, with_logprobs=False).tokens
    b = _jsample(logits, _arrays(1, seed=5, step=3), greedy=False, with_logprobs=False).tokens
    assert int(a[0]) == int(b[0])


def _draws(logits, n=64, **kw):
    """The tokens n rows of one logits row draw, row i with seed i."""
    rows = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
    s = _arrays(n, **kw)._replace(seed=jnp.arange(n, dtype=jnp.uint32))
    return np.asarray(_jsample(rows, s, greedy=False, with_logprobs=False).tokens)


def test_top_p_applies_to_the_top_k_distribution():
    """vLLM and transformers apply top-p to what top-k kept, renormalized: with probabilities
    (0.4, 0.3, 0.2, 0.1), top_k=2 leaves (0.57, 0.43) and top_p=0.5 then only token 0. Over the
    whole vocabulary token 1 would stay (0.4 above it < 0.5) and be drawn 43% of the time."""
    got = _draws(np.log([0.4, 0.3, 0.2, 0.1]), top_k=2, top_p=0.5)
    assert set(got.tolist()) == {0}


def test_top_k_keeps_the_tokens_tied_with_the_kth():
    """vLLM and transformers cut top-k below the k-th largest logit, so tokens tied with it
    stay (ties are common in bf16 logits); keeping exactly k, by index, drew token 0 only."""
    got = _draws([1.0, 2.0, 2.0, 2.0, 0.0], top_k=1)
    assert set(got.tolist()) == {1, 2, 3}
    assert set(_draws([3.0, 2.0, 2.0, 0.0], top_k=2).tolist()) == {0, 1, 2}


def test_top_p_1_keeps_the_whole_tail():
    """float32's cumulative sum reaches 1 before a long tail ends, so `before < 1` dropped the
    last tokens of a 152k vocabulary (vLLM skips top-p at 1); top_p 0.9 still cuts."""
    logits = jnp.sort(jax.random.normal(jax.random.key(1), (1, 152_064)) * 8, axis=-1)[:, ::-1]
    kept = lambda p: int(jnp.isfinite(cut_logits(logits, jnp.asarray([-1]), jnp.asarray([p], jnp.float32))).sum())
    assert kept(1.0) == 152_064 and kept(0.9) < 152_064


def test_a_cut_is_the_same_found_among_the_candidates_or_by_bisection(monkeypatch):
    """Each filter is a cut on the logit value, taken from a row's top CANDIDATES logits where
    it lies among them and found by bisecting the float32 order otherwise (a flat top-p, a
    large top-k): both keep the same tokens, and every token tied at top-p's cut stays."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 300)).astype(np.float32) * np.float32([[0.3], [1], [3], [3], [8], [1]])
    x[5, :40] = 2.0
    args = (jnp.asarray(x), jnp.asarray([-1, 7, -1, 120, 30, 25]), jnp.asarray([0.9, 1, 0.5, 0.8, 0.95, 0.3], jnp.float32),
            jnp.asarray([0, 0, 0.01, 0, 0.02, 0], jnp.float32))
    kept = []
    for candidates in (300, 4):
        monkeypatch.setattr(sampling_draw, "CANDIDATES", candidates)
        kept.append(np.isfinite(np.asarray(jax.jit(lambda *a: cut_logits(*a))(*args))))
    assert (kept[0] == kept[1]).all()
    assert 4 < kept[0][0].sum() < 300 and kept[0][1].sum() == 7 and kept[0][5, :40].all()


def test_a_seeded_row_draws_the_same_whichever_way_its_batch_is_cut(monkeypatch):
    """The batch decides whether the sampler orders any logits (not when no row filters), takes
    the top candidates, or bisects (a row with a flat top-p or a top-k past the candidates); a
    seeded row draws the same tokens alone and beside rows that take the other ways."""
    rng = np.random.default_rng(4)
    peaked, flat = rng.standard_normal(1000) * 4, rng.standard_normal(1000) * 0.1
    rows = [(peaked, {}), (peaked, dict(top_p=0.9)), (peaked, dict(top_k=40, temp=0.7)), (flat, dict(top_p=0.9)),
            (flat, dict(top_k=600, min_p=0.5))]
    steps = 4
    fn = jax.jit(sample, static_argnames=("greedy", "with_logprobs"))

    def tokens(which):
        pick = [rows[i] for i in which for _ in range(steps)]
        f = lambda key, default, dt: jnp.asarray([kw.get(key, default) for _, kw in pick], dt)
        s = SamplingArrays(f("temp", 1.0, jnp.float32), f("top_k", -1, jnp.int32), f("top_p", 1.0, jnp.float32),
                           f("min_p", 0.0, jnp.float32), jnp.asarray([i for i in which for _ in range(steps)], jnp.uint32),
                           jnp.asarray(list(range(steps)) * len(which), jnp.int32))
        logits = jnp.asarray(np.stack([r for r, _ in pick]), jnp.float32)
        return np.asarray(fn(logits, s, greedy=False, with_logprobs=False).tokens).reshape(len(which), steps)

    together = tokens(range(len(rows)))
    for i in range(len(rows)):
        assert (tokens([i]) == together[i]).all(), i
    assert len(set(together.ravel().tolist())) > 10
    # off the CPU nothing is skipped (no lax.cond: XLA:GPU reads its predicate back to the
    # host); each row still takes its own cut, so the tokens are the same
    monkeypatch.setattr(sampling_draw, "_only_if", lambda pred, expensive, placeholder: expensive())
    fn = jax.jit(lambda *a, **k: sample(*a, **k), static_argnames=("greedy", "with_logprobs"))   # traced anew
    assert (tokens(range(len(rows))) == together).all() and (tokens([0]) == together[0]).all()


def test_huge_tied_logits_are_drawn_alike():
    """Two tokens biased alike by 1e8 tie in float32; the Gumbel noise was added to the raw
    logits, where it rounds away at that size, so the lower id won every draw (vLLM's softmax
    subtracts the row's max first: half each, 2026-12-07)."""
    got = _draws([1e8, 1e8, 0.0, -1.0], n=400).tolist()
    assert set(got) == {0, 1} and 140 < got.count(0) < 260


def test_a_tiny_temperature_samples_the_argmax():
    """Logits over a tiny temperature overflowed to +inf, ties the sort broke by index (token
    0 drawn, not the argmax 1): the sampler takes the argmax below 1e-5. SamplingParams raises
    a temperature in (0, 0.01) to 0.01, as vLLM does (with a warning), so only 0 is greedy
    there (1e-6 was greedy here and samples at 0.01 in vLLM, 2026-12-07)."""
    assert set(_draws([24.0, 25.0, 0.0, -1.0], temp=5e-38).tolist()) == {1}
    for t in (1e-6, 1e-5, 0.005):
        p = SamplingParams(temperature=t)
        assert p.temperature == 0.01 and not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0.02).temperature == 0.02


def test_sampling_logprobs():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.25] + [1e-9] * 30], jnp.float32))
    out = _jsample(logits, _arrays(1), greedy=True, with_logprobs=True)
    assert int(out.tokens[0]) == 0
    assert abs(float(out.logprob[0]) - np.log(0.5)) < 1e-4
    assert int(out.top_ids[0, 0]) == 0 and abs(float(out.top_logprobs[0, 1]) - np.log(0.25)) < 1e-4


# -- detokenizer ------------------------------------------------------------------------------
class _CharTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_detokenizer_stops_and_trims_stop_string():
    d = IncrementalDetokenizer(_CharTok(), [ord("x")], stop=["END"])
    text, hit = "", False
    for ch in "abcEN":
        text, hit = d.push(ord(ch), text)
        assert not hit
    text, hit = d.push(ord("D"), text)
    assert hit and text == "abc"


def test_a_compile_counter_for_this_thread_leaves_out_compilations_on_other_threads():
    """The "nothing compiles after a full warm-up" tests count the serving thread's
    compilations only: one of them counted 1 compilation once in a full run (and passed alone
    and in later runs); the likely source is another engine's background warm-up, left running
    by an earlier test in the same xdist worker, compiling on its own thread."""
    import threading

    import jax
    import jax.numpy as jnp
    from fastserve_jax.runner.compile_guard import CompileCounter

    with CompileCounter(this_thread=True) as mine, CompileCounter() as every:
        t = threading.Thread(target=lambda: jax.jit(lambda x: x * 3 + 1)(jnp.ones(3)).block_until_ready())
        t.start()
        t.join()
    assert mine.count == 0 and every.count >= 1
    with CompileCounter(this_thread=True) as mine:
        jax.jit(lambda x: x * 5 + 2)(jnp.ones(4)).block_until_ready()
    assert mine.count >= 1


def test_max_tokens_none_fills_a_device_pool_smaller_than_max_model_len():
    """max_tokens=None (vLLM's: the rest of the context) was sized by max_model_len, so where the
    device pool holds fewer tokens it was refused ("can need 128 KV blocks") instead of running
    to the pool's end (admission.context_limit, which LLMEngine.add_request fills)."""
    from fastserve_jax.admission import validate_request

    kv = KVManager(num_blocks=8, block_size=16)         # 7 usable blocks: 112 tokens for one request
    check = lambda n, max_tokens: validate_request(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens),
                                                   None, 1000, 1024, kv, frozenset())
    assert check(100, None)[1] == list(range(1, 101))
    # a max_tokens past the pool ends there, as one past max_model_len ends at it (LLMEngine.add_request);
    # until 2026-12-07 it was refused ("can need 13 KV blocks ...; lower max_tokens")
    assert check(100, 100)[1] == list(range(1, 101))
    for max_tokens in (None, 1):     # the prompt is what is too long, and the message says so
        with pytest.raises(ValueError, match="prompt has 112 tokens but the device pool holds 112 for one request "
                                             r"\(max_model_len 1024\).*at most 111 tokens or raise num_device_blocks"):
            check(112, max_tokens)


def test_a_text_prompt_with_ids_beyond_the_models_vocabulary_is_refused():
    """A tokenizer with more tokens than the model's embedding: a text prompt that uses them was
    accepted (a token-id prompt was refused), read NaN out of the embedding and answered
    garbage, and the next request given its blocks answered NaN too."""
    from fastserve_jax.admission import validate_request
    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.tokenizer import load_tokenizer

    tok, kv = load_tokenizer(demo_model_path()), KVManager(num_blocks=8, block_size=16)
    ids = tok.encode("count from 3 to 5:")
    assert validate_request("count from 3 to 5:", SamplingParams(), tok, max(ids) + 1, 64, kv)[1] == ids
    with pytest.raises(ValueError, match=rf"token ids \[{max(ids)}\] beyond the model's vocabulary of {max(ids)}"):
        validate_request("count from 3 to 5:", SamplingParams(), tok, max(ids), 64, kv)
