"""Tensor and pipeline parallelism on 8 virtual CPU devices: greedy outputs token-identical to
one device (with swapping forced), several batches in flight in pipeline mode, nothing
compiled after a full warm-up (test_parallel_layout.py: where weights, KV and collectives
land, and the rules table)."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from fastserve_jax.config import SamplingParams
from fastserve_jax.llm import LLM
from parallel_setup import KW, four_layer_checkpoints  # noqa: F401  (a fixture)
from tiny_engine import check_prompt_logprobs, hf_prompt_logprobs

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")

LAYOUTS = [(2, 1), (4, 1), (1, 2), (2, 2), (2, 4)]
PROMPTS = [[(7 * i + 3 * j) % 200 + 1 for j in range(5 + 3 * i)] for i in range(6)]
GREEDY = [SamplingParams(max_tokens=12 + 3 * i, temperature=0, ignore_eos=True) for i in range(6)]


@pytest.fixture(scope="module")
def four_layer(four_layer_checkpoints):
    """arch -> the 4-layer checkpoint and its single-device greedy outputs with ample KV memory."""
    out = {}
    for arch, path in four_layer_checkpoints.items():
        llm = LLM(path, warmup=False, num_device_blocks=96, **KW)
        out[arch] = (path, [o.token_ids for o in llm.generate(PROMPTS, GREEDY)])
    return out


# The default suite runs opt at (2, 1), (1, 2) and (2, 4) and llama at (4, 1); the other six
# pairs are marked slow (3-5 s each on 2 CPU cores) and run with `-m slow`. Llama at (2, 2) went
# there on 2026-12-06: tensor and pipeline parallelism together run in opt's (2, 4) here and in
# llama's (4, 2) full warm-up below, and llama's pipeline in test_pipeline_keeps_several_batches.
# Llama at tp=4 keeps each of its 2 KV heads on tp_rep = 2 devices, whose host copies split it
# (sharding/host_copy.py): the CPU's fused copies in the default suite, `device_put`'s with -m slow.
DEFAULT_MESH_CASES = {("opt", 2, 1), ("llama", 4, 1), ("opt", 1, 2), ("opt", 2, 4)}
MESH_CASES = [pytest.param(arch, tp, pp, "backend", marks=() if (arch, tp, pp) in DEFAULT_MESH_CASES else pytest.mark.slow)
              for tp, pp in LAYOUTS for arch in ("llama", "opt")]
MESH_CASES.append(pytest.param("llama", 4, 1, "device_put", marks=pytest.mark.slow))


@pytest.mark.parametrize("arch,tp,pp,copy_path", MESH_CASES)
def test_greedy_outputs_match_one_device_with_swapping_forced(four_layer, arch, tp, pp, copy_path):
    from fastserve_jax.kv_sizing import kv_block_bytes
    from fastserve_jax.runner.kv_transfer import forced_copy_path

    path, want = four_layer[arch]
    # 16 blocks of 8 tokens hold under half of what the 6 requests need at once: MLFQ's
    # rotation must swap KV out and back, shard by shard on every stage.
    with forced_copy_path(copy_path):
        llm = LLM(path, warmup=False, num_device_blocks=16, num_host_blocks=64, swap_policy="proactive",
                  tensor_parallel_size=tp, pipeline_parallel_size=pp, **KW)
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == want
    st = llm.engine.stats
    assert st.swap_out_blocks > 0 and st.swap_in_blocks > 0
    e = llm.engine
    t = e.runner.transfer
    assert t.fused_blocks_out == (st.swap_out_blocks if copy_path == "backend" else 0)
    assert t.host_block_bytes == kv_block_bytes(e.model_cfg, e.cfg)     # each block once in host memory, any mesh
    assert e.kv.num_used_blocks == 0 and e.kv.num_host_used_blocks == 0
    assert len(e.runner.stages) == pp and len({d for st in e.runner.stages for d in st.devices}) == tp * pp


def test_async_scheduling_matches_one_device_under_tensor_parallelism(four_layer):
    """Async scheduling at tp=4: the token box is replicated over the stage's mesh, and the
    decode rows that read their input tokens from it give one device's greedy tokens, with
    swapping forced."""
    path, want = four_layer["llama"]
    llm = LLM(path, warmup=False, num_device_blocks=16, num_host_blocks=64, swap_policy="proactive",
              tensor_parallel_size=4, async_scheduling=True, **KW)
    box = llm.engine.runner.token_box
    assert box is not None and len(box.box.sharding.device_set) == 4
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
    assert llm.engine.stats.swap_out_blocks > 0


@pytest.mark.parametrize("arch,tp,pp,kernel", [("llama", 4, 1, "triton"),
                                               pytest.param("opt", 2, 2, "triton", marks=pytest.mark.slow),
                                               # host callbacks per shard in interpret mode: ~40 s here
                                               pytest.param("llama", 4, 1, "mosaic", marks=pytest.mark.slow)])
def test_pallas_kernel_per_head_shard_matches_one_device(four_layer, arch, tp, pp, kernel, monkeypatch):
    """The Pallas kernels (in interpret mode) under tensor parallelism: each device attends
    its own query heads over its own KV-head shard of the cache (shard_map), with swapping
    forced. Llama at tp=4 keeps each of its 2 KV heads on 2 devices (tp_rep = 2), each with
    one query head of that head's group; greedy tokens equal one device's."""
    monkeypatch.setenv("FASTSERVE_JAX_PALLAS_KERNEL", kernel)
    if kernel == "mosaic":                  # host callbacks: jax.export cannot serialize them
        monkeypatch.setenv("FASTSERVE_JAX_EXPORT_CACHE", "off")
    n = 6 if kernel == "triton" else 2      # the TPU kernel's interpret mode is slow: two requests
    path, want = four_layer[arch]
    llm = LLM(path, warmup=False, num_device_blocks=16, num_host_blocks=64, swap_policy="proactive",
              tensor_parallel_size=tp, pipeline_parallel_size=pp, attention_backend="pallas", **KW)
    assert llm.engine.cfg.attention_backend == "pallas"
    assert [o.token_ids for o in llm.generate(PROMPTS[:n], GREEDY[:n])] == want[:n]
    assert llm.engine.stats.swap_out_blocks > 0 or n < 6


def test_pallas_kernel_where_a_device_holds_parts_of_several_groups(tmp_path):
    """12 query heads over 6 KV heads at tp=4: each KV head is on 2 devices, and a device holds
    3 KV heads and 3 query heads, e.g. heads 3-5 of groups 1, 2, 2, so its heads do not fall
    into GQA groups by themselves. shard_heads runs the kernel on all six query heads of its KV
    heads' groups, its own in place (HeadSharding.spread); the plain per-shard call gave other
    tokens here. Greedy tokens equal one device's, on the reference path."""
    from fastserve_jax.models.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(str(tmp_path), "llama", num_hidden_layers=2, hidden_size=96,
                                  num_attention_heads=12, num_key_value_heads=6, intermediate_size=128)
    want = [o.token_ids for o in LLM(path, warmup=False, num_device_blocks=96, **KW).generate(PROMPTS, GREEDY)]
    llm = LLM(path, warmup=False, num_device_blocks=96, tensor_parallel_size=4, attention_backend="pallas", **KW)
    assert llm.engine.runner.layout.head_sharding(0).spread == ("tp_rep",)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want


def test_pipeline_keeps_several_batches_in_flight(four_layer):
    """... and computes prompt logprobs on its last stage (one request of the k = 2 run asks)."""
    path, want = four_layer["llama"]
    held = {}
    for k in (1, 2):
        llm = LLM(path, warmup=False, num_device_blocks=96, pipeline_parallel_size=2, batches_in_flight=k, **KW)
        act = llm.engine.runner.activity
        params = GREEDY[:5] + [dataclasses.replace(GREEDY[5], prompt_logprobs=2)] if k == 2 else GREEDY
        outs = llm.generate(PROMPTS, params)
        got = [o.token_ids for o in outs]
        assert got == want
        if k == 2:
            check_prompt_logprobs(outs[5].prompt_logprobs, PROMPTS[5], hf_prompt_logprobs(path, PROMPTS[5:])[0], 2)
        s = act.summary()
        assert s["stages"] == 2 and len(s["occupancy"]) == 2
        held[k] = s["held_in_flight_max"]
        # the record is complete: every launch the engine ran, with each stage's readiness
        assert len(act.launches) == sum(llm.engine.stats.launches.values())
        assert all(t is not None for r in act.launches for t in r.ready)
    assert held[1] == 1 and held[2] == 2


def test_abort_while_in_flight_frees_everything(four_layer):
    path, want = four_layer["llama"]
    llm = LLM(path, warmup=False, num_device_blocks=96, pipeline_parallel_size=2, **KW)
    e = llm.engine
    reqs = [e.add_request(p, sp) for p, sp in zip(PROMPTS, GREEDY)]
    e.step()
    in_flight = [r for r in reqs if r.in_flight]
    assert in_flight, "the first step leaves its batch in flight"
    victim = in_flight[0]
    e.abort(victim.request_id)
    while e.has_unfinished():
        e.step()
        e.kv.check_integrity()
    e.step()                                      # nothing left to dispatch: drains what is in flight
    assert victim.finish_reason == "abort"
    for r, w in zip(reqs, want):
        if r is not victim:
            assert r.output_token_ids == w
    assert e.kv.num_used_blocks == 0


# and on the Pallas kernel per head shard (interpret mode: -m slow)
@pytest.mark.parametrize("backend", ["reference", pytest.param("pallas", marks=pytest.mark.slow)])
def test_nothing_compiles_after_warmup_in_pipeline_mode_with_swapping(four_layer, backend):
    from fastserve_jax.runner.compile_guard import CompileCounter

    path, want = four_layer["llama"]
    # tp=4 over 2 KV heads: tp_rep = 2, so the swaps' warm-up jobs are those of split host copies
    llm = LLM(path, warmup="full", num_device_blocks=16, num_host_blocks=64, tensor_parallel_size=4, pipeline_parallel_size=2,
              attention_backend=backend, **KW)
    with CompileCounter(this_thread=True) as cc:
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == want
    assert llm.engine.stats.swap_out_blocks > 0
    assert cc.count == 0


def test_stage_activity_watchers_end_with_their_engine():
    """Every pipeline engine starts one watcher thread per stage (StageActivity). They held
    the record, and each the last output it stamped, for the life of the process: three
    dropped pp=2 engines left 6 threads and 9 device arrays (on an accelerator, a stage's
    activations and the last stage's logits each). They now end once the record is dropped."""
    import gc
    import threading
    import weakref

    import jax.numpy as jnp

    from fastserve_jax.sharding.pipeline import StageActivity

    before = set(threading.enumerate())
    act = StageActivity(2)
    watchers = [t for t in threading.enumerate() if t not in before and t.name.startswith("stage-activity")]
    rec = act.begin(0)
    out = jnp.ones(3)
    for s in range(2):
        act.output(rec, s, out)
    act.wait()
    assert len(watchers) == 2 and all(t is not None for t in rec.ready)
    gone = weakref.ref(act)
    del act
    gc.collect()
    assert gone() is None
    for t in watchers:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in watchers)
