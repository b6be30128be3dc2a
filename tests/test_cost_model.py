"""The cost model: interpolation on literal tables, the shipped OPT-13B table, and profiling
a real (tiny) engine into a cached table."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib

import pytest

from fastserve_jax.cost_model import CostModel, plan_time, shipped_cost_models
from fastserve_jax.request import Request
from fastserve_jax.config import SamplingParams
from fastserve_jax.scheduler import ScheduledRequest

T = CostModel("t", prefill_tokens=(10, 100, 200), prefill_seconds=(1.0, 2.0, 4.0),
              decode_batch=(1, 4), decode_seconds=(0.5, 1.1), decode_context=0.01, prefill_context=0.001)


def test_interpolates_clamps_and_extrapolates():
    assert T.prefill_time(10) == 1.0 and T.prefill_time(55) == pytest.approx(1.5)
    assert T.prefill_time(3) == 1.0                      # below the table: clamped
    assert T.prefill_time(300) == pytest.approx(6.0)     # beyond: along the last segment
    assert T.prefill_time(0) == 0.0 and T.decode_time(0) == 0.0
    assert T.decode_time(2) == pytest.approx(0.7) and T.decode_time(2, 100) == pytest.approx(1.7)
    assert T.prefill_time(100, context=50) == pytest.approx(2.0 + 0.001 * 100 * 50)


def test_iteration_time_is_decode_launch_plus_one_packed_prefill_launch():
    # decode: 2 rows with contexts 5 and 15; prefill: chunks of 60 (after 40 cached) and 40 (fresh)
    t = T.iteration_time([5, 15], [(60, 40), (40, 0)])
    assert t == pytest.approx(0.7 + 0.01 * 20 + 2.0 + 0.001 * (60 * (40 + 30) + 40 * 20))

    def r(n, computed):
        q = Request("x", list(range(n)), SamplingParams(), 0.0)
        q.num_computed_tokens = computed
        return q
    assert plan_time(T, [ScheduledRequest(r(5, 4), 1), ScheduledRequest(r(100, 40), 60)]) == \
        pytest.approx(T.iteration_time([5], [(60, 40)]))


def test_a_profiled_table_is_not_charged_its_prefills_own_attention_twice():
    # a profile's prefill times measured each launch's attention over its own tokens, so one
    # chunk with nothing cached costs what the table says; a table of matmuls adds k^2/2 pairs
    prof = dataclasses.replace(T, prefill_self_attention=False)
    assert prof.iteration_time([], [(100, 0)]) == pytest.approx(2.0)
    assert T.iteration_time([], [(100, 0)]) == pytest.approx(2.0 + 0.001 * 100 * 50)
    assert prof.iteration_time([], [(60, 40), (40, 0)]) == pytest.approx(2.0 + 0.001 * 60 * 40)
    assert not CostModel.load("demo-cpu").prefill_self_attention        # profiled
    assert CostModel.load("opt-13b-a100").prefill_self_attention        # a roofline of matmuls


def test_prefill_chunks_past_max_prefill_seqs_take_launches_of_their_own():
    # the engine packs at most max_prefill_seqs prompts per prefill launch (split_prefill)
    three = dataclasses.replace(T, max_prefill_seqs=2, prefill_self_attention=False)
    chunks = [(10, 0), (40, 0), (50, 0)]
    assert three.iteration_time([], chunks) == pytest.approx(T.prefill_time(50) + T.prefill_time(50))
    assert dataclasses.replace(three, max_prefill_seqs=0).iteration_time([], chunks) == \
        pytest.approx(T.prefill_time(100))
    assert CostModel.load("demo-cpu").max_prefill_seqs == 8          # EngineConfig's, when profiled


def test_prefill_chunks_whose_blocks_pass_the_largest_block_bucket_take_launches_of_their_own():
    """As split_prefill packs them: 14 chunks of 15 tokens after 384 cached (25 blocks each, of
    16 tokens) fit 4 to a launch under a 104-block bucket, so 4 launches (4, 4, 4, 2 chunks), not
    the 2 that max_prefill_seqs 8 alone makes; without block buckets (a table of real kernels)
    only the count splits."""
    m = dataclasses.replace(T, max_prefill_seqs=8, prefill_self_attention=False, prefill_context=0.0,
                            block_size=16, block_buckets=(4, 8, 16, 32, 64, 104))
    launch = lambda n: T.prefill_time(n)      # noqa: E731
    assert m.iteration_time([], [(15, 384)] * 14) == pytest.approx(3 * launch(60) + launch(30) + m.decode_time(0))
    flat = dataclasses.replace(m, block_size=0, block_buckets=())
    assert flat.iteration_time([], [(15, 384)] * 14) == pytest.approx(launch(120) + launch(90))


def test_iteration_overhead_is_added_to_every_iteration_and_to_nothing_else():
    o = dataclasses.replace(T, iteration_overhead=0.25)
    assert o.iteration_time([5, 15], [(60, 40)]) == pytest.approx(T.iteration_time([5, 15], [(60, 40)]) + 0.25)
    assert o.iteration_time([], [(60, 0)]) == pytest.approx(1.0 + 50 / 90 + 0.001 * 60 * 30 + 0.25)
    assert o.iteration_time([5], []) == pytest.approx(0.5 + 0.05 + 0.25)
    # the launches alone, which the skip-join scheduler and the service meter read, stay the profile's
    assert o.prefill_time(60, 40) == T.prefill_time(60, 40) and o.decode_time(3, 9) == T.decode_time(3, 9)


# decode rows pad to 1, 2, 4; prefill tokens to 10, 100, 200; each row reads its blocks of 4 tokens
# padded to the launch's bucket of 1, 2, 4 or 8 (what the reference attention does)
P = dataclasses.replace(T, decode_row_buckets=(1, 2, 4), prefill_token_buckets=(10, 100, 200), block_size=4,
                        block_buckets=(1, 2, 4, 8))


def test_padded_launches_cost_their_bucket():
    # 3 rows run as 4 (1.1 s); the longest context, 13 tokens, is 4 blocks, so all 4 rows read
    # 4 - 1 blocks of 4 tokens more than at a 1-token context: 0.01 per padded token
    assert P.iteration_time([2, 3, 13], []) == pytest.approx(1.1 + 0.01 * 4 * 3 * 4)
    # the same 18 tokens of context spread evenly (6 each: 2 blocks) cost less: padding follows the longest
    assert P.iteration_time([6, 6, 6], []) == pytest.approx(1.1 + 0.01 * 4 * 1 * 4)
    assert T.iteration_time([2, 3, 13], []) == T.iteration_time([6, 6, 6], [])     # unpadded: the sum only
    assert P.iteration_time([1], []) == pytest.approx(0.5)                         # the table's own point
    # a 55-token prefill runs as the 100-token bucket
    assert P.iteration_time([], [(55, 0)]) == pytest.approx(2.0 + 0.001 * 55 * 27.5)
    # the floor: while rows x blocks stay within min_launch_blocks the launch pads up to it
    f = dataclasses.replace(P, min_launch_blocks=8)
    assert f.padded_read(4, 1) == 0 and f.padded_read(4, 5) == 0      # 4 rows pad to 2 blocks either way
    assert f.padded_read(4, 9) == 4 * (4 - 2) * 4 and f.padded_read(1, 9) == 0
    assert T.padded_read(4, 100) == 0


@pytest.mark.parametrize("bad, match", [
    (dict(block_size=4), "go together"),
    (dict(block_buckets=(2, 1), block_size=4), "strictly increasing"),
    (dict(decode_row_buckets=(0, 2)), "strictly increasing"),
    (dict(prefill_tokens=(10, 5), prefill_seconds=(1.0, 2.0)), "strictly increasing"),
    (dict(prefill_tokens=(10,), prefill_seconds=(1.0, 2.0)), "equally long"),
    (dict(decode_seconds=(0.0, 1.0)), "positive"),
    (dict(decode_context=-1.0), ">= 0"),
    (dict(iteration_overhead=-1e-3), "iteration_overhead must be finite and >= 0"),
    (dict(iteration_overhead=float("nan")), "iteration_overhead must be finite and >= 0"),
    # accepted before: a NaN or infinite time hung `simulate`, an infinite coefficient divided by zero
    (dict(decode_seconds=(float("nan"), 1.0)), "positive and finite"),
    (dict(prefill_seconds=(1.0, float("inf"))), "positive and finite"),
    (dict(decode_context=float("inf")), "finite and >= 0"),
    (dict(iteration_overhead=float("inf")), "finite and >= 0"),
    (dict(prefill_self_attention="no"), "true or false"),
    (dict(max_prefill_seqs=-1), "max_prefill_seqs"),
    # accepted before 2026-12-07: every iteration then failed (a server answered each request 500),
    # or the engine did not start
    (dict(min_launch_blocks=2.5), "min_launch_blocks is an integer >= 0, got 2.5"),
    (dict(kv_capacity_tokens="many"), "kv_capacity_tokens is an integer"),
    (dict(block_size=float("nan")), "block_size is an integer"),
    (dict(name=7), "name and source are strings"),
])
def test_rejects_bad_tables(bad, match):
    kw = dict(name="b", prefill_tokens=(10, 20), prefill_seconds=(1.0, 2.0), decode_batch=(1, 2),
              decode_seconds=(0.5, 1.0))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        CostModel(**kw)


def test_save_load_round_trip_and_helpful_errors(tmp_path):
    path = tmp_path / "m.json"
    T.save(str(path))
    assert CostModel.load(str(path)) == T
    o = dataclasses.replace(T, iteration_overhead=0.004)
    o.save(str(path))
    d = json.loads(path.read_text())
    assert d["iteration_overhead"] == 0.004 and CostModel.load(str(path)) == o
    del d["iteration_overhead"]                          # tables written before the key keep loading
    assert CostModel.from_json(d) == T
    T.save(str(path))
    with pytest.raises(ValueError, match="opt-13b-a100"):
        CostModel.load("no-such-model")
    d = json.loads(path.read_text())
    d["prefil_seconds"] = d.pop("prefill_seconds")
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unknown keys"):
        CostModel.load(str(path))


def test_shipped_opt13b_table_is_what_its_derivation_gives():
    assert "opt-13b-a100" in shipped_cost_models()
    cm = CostModel.load("opt-13b-a100")
    assert 0.015 < cm.decode_time(1) < 0.025 and cm.decode_time(16) > cm.decode_time(1)
    assert 0.10 < cm.prefill_time(1024) < 0.20 and 50_000 < cm.kv_capacity_tokens < 70_000
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_opt13b_cost_model.py"
    spec = importlib.util.spec_from_file_location("make_opt13b", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build() == cm


def test_opt13b_script_help_does_not_rewrite_the_shipped_table():
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_opt13b_cost_model.py"
    shipped = script.parents[1] / "fastserve_jax" / "cost_models" / "opt-13b-a100.json"
    before = shipped.read_bytes()
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "wrote" not in r.stdout
    assert shipped.read_bytes() == before


# -- profiling the real engine ------------------------------------------------------------------
@pytest.mark.slow   # about 25 s on 2 CPU cores: it compiles four launch shapes
def test_profile_engine_times_the_runner_and_caches(tiny_checkpoints, tmp_path, monkeypatch):
    from fastserve_jax import LLM, SamplingParams as SP
    from fastserve_jax import cost_profile

    llm = LLM(tiny_checkpoints("llama"), warmup=False, max_model_len=64, max_num_seqs=1,
              max_num_batched_tokens=32, block_size=8, num_device_blocks=24)
    eng = llm.engine
    monkeypatch.setattr(cost_profile, "NOISY", float("inf"))      # cached whatever else the cores ran
    cm = cost_profile.profile_engine(eng, cache_dir=str(tmp_path), repeats=1)
    assert cm.prefill_tokens == eng.cfg.prefill_token_buckets and cm.decode_batch == eng.cfg.decode_batch_buckets
    assert all(s > 0 for s in cm.prefill_seconds + cm.decode_seconds)
    assert cm.kv_capacity_tokens == eng.kv.num_usable_blocks * 8
    assert not cm.prefill_self_attention          # its prefill times hold their own attention
    assert cm.max_prefill_seqs == eng.cfg.max_prefill_seqs
    assert eng.kv.num_free_blocks == eng.kv.num_usable_blocks       # every borrowed block is back
    eng.kv.check_integrity()
    cached = list((tmp_path / "cost_models").glob("*.json"))
    assert len(cached) == 1 and CostModel.load(str(cached[0])) == cm

    def fail(*a, **k):
        raise AssertionError("measured again despite the cache")
    monkeypatch.setattr(cost_profile, "measure", fail)
    assert cost_profile.profile_engine(eng, cache_dir=str(tmp_path)) == cm
    eng.add_request([5, 6], SP(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        cost_profile.profile_engine(eng, cache_dir="")


@pytest.mark.parametrize("decode,cached", [((0.4e-3, 0.5e-3, 1.9e-3), True), ((2.45e-3, 1.42e-3, 1.9e-3), False)])
def test_a_profile_timed_beside_other_work_is_lowered_and_not_cached(tmp_path, monkeypatch, caplog, decode, cached):
    """Replicas starting together timed a 1-row decode above 2 rows' and a 32-token prefill
    above 64 tokens', and that profile served every later start (a probe, 2026-12-07). Each
    point is now at most a larger launch's time, and a profile that needed more than a 1.5x
    cut is used but not cached."""
    from fastserve_jax import cost_profile

    timed = CostModel("p", prefill_tokens=(32, 64), prefill_seconds=(1.6e-3, 1.7e-3) if cached else (11.6e-3, 1.7e-3),
                      decode_batch=(1, 2, 32), decode_seconds=decode)
    monkeypatch.setattr(cost_profile, "measure", lambda engine, repeats, sparse: timed)
    cm = cost_profile.profile_engine(_idle_engine(), cache_dir=str(tmp_path))
    assert list(cm.decode_seconds) == sorted(cm.decode_seconds) and list(cm.prefill_seconds) == sorted(cm.prefill_seconds)
    assert cm.decode_seconds[1:] == timed.decode_seconds[1:] and cm.prefill_seconds[1] == timed.prefill_seconds[1]
    assert len(list(tmp_path.glob("cost_models/*.json"))) == cached and ("not cached" in caplog.text) != cached


@pytest.mark.parametrize("decode,kept", [((1.0e-3, 0.9e-3, 1.9e-3), True), ((6.2e-3, 3.9e-3, 4.0e-3), False)])
def test_a_noisy_profile_cached_by_an_older_version_is_measured_again(tmp_path, monkeypatch, caplog, decode, kept):
    """Profiles cached before the noise check (2026-12-07) were read back as they were: after an
    upgrade a 1-row decode timed at 1.6x 32 rows' served every start (a probe). A cached profile
    now gets the same check as a measured one: a small cut is used lowered, a large one measured again."""
    from fastserve_jax import cost_profile

    old = CostModel("p", prefill_tokens=(32, 64), prefill_seconds=(1.6e-3, 1.7e-3), decode_batch=(1, 2, 32),
                    decode_seconds=decode)
    eng = _idle_engine()
    os.makedirs(tmp_path / "cost_models")
    old.save(cost_profile._cache_path(eng, str(tmp_path)))
    fresh = dataclasses.replace(old, decode_seconds=(0.4e-3, 0.5e-3, 1.9e-3))
    monkeypatch.setattr(cost_profile, "measure", lambda engine, repeats, sparse: fresh)
    cm = cost_profile.profile_engine(eng, cache_dir=str(tmp_path))
    assert cm.decode_seconds == ((0.9e-3, 0.9e-3, 1.9e-3) if kept else fresh.decode_seconds)
    assert ("profiling again" in caplog.text) != kept
    assert CostModel.load(cost_profile._cache_path(eng, str(tmp_path))) == (old if kept else fresh)


def test_the_profile_cache_key_ignores_the_policy_and_the_host_pool():
    """Engines that differ only in scheduling, host pool or swap settings share one profile;
    the launch shapes, the dtype and the device pool still tell profiles apart."""
    import dataclasses
    from types import SimpleNamespace

    from fastserve_jax.config import EngineConfig, SchedulerConfig
    from fastserve_jax.cost_profile import cost_cache_key

    def key(num_blocks=100, **kw):
        return cost_cache_key(SimpleNamespace(cfg=dataclasses.replace(EngineConfig(), **kw), model_cfg="m",
                                              kv=SimpleNamespace(num_blocks=num_blocks)))

    base = key()
    for kw in (dict(num_host_blocks=0), dict(swap_policy="recompute"), dict(swap_reserve_blocks=8),
               dict(scheduler="fcfs"), dict(scheduler_config=SchedulerConfig(base_quantum=0.5)), dict(seed=3),
               dict(tail_slowdown=0.0), dict(starvation_threshold=2.0)):
        assert key(**kw) == base, kw
    for kw in (dict(dtype="bfloat16"), dict(max_num_seqs=8), dict(block_size=8), dict(num_blocks=50)):
        assert key(**kw) != base, kw


def test_an_engine_whose_pool_holds_fewer_blocks_than_a_batch_profiles_and_serves(tiny_checkpoints, tmp_path):
    """Every running row holds a block, so with 4 usable blocks and max_num_seqs 8 no batch
    passes 4 rows (bucket 4). The profile used to build one probe request per row of the
    largest decode bucket and failed the engine's construction ("plan does not fit:
    __profile4"), and with max_model_len under the smallest prefill bucket it timed no
    prefill at all (`LLM(max_model_len=16)` raised). It now times the buckets a batch can
    reach: decode with at most one row per free block, prefill with prompts packed as a batch
    of short prompts fills the bucket."""
    from fastserve_jax import LLM, SamplingParams as SP

    llm = LLM(tiny_checkpoints("llama"), warmup=False, max_model_len=24, max_num_seqs=8, max_num_batched_tokens=32,
              block_size=8, num_device_blocks=5, decode_batch_buckets=(1, 2, 4, 8), compilation_cache_dir=str(tmp_path))
    eng = llm.engine
    assert eng.kv.num_usable_blocks == 4 and eng.cost_model is not None
    assert eng.cost_model.decode_batch[-1] == 4 and all(s > 0 for s in eng.cost_model.decode_seconds)
    smallest = eng.cfg.prefill_token_buckets[0]
    assert smallest > 24 and eng.cost_model.prefill_tokens[0] == smallest
    assert eng.kv.num_free_blocks == eng.kv.num_usable_blocks
    outs = llm.generate([[5, 6, 7]] * 6, SP(max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4] * 6


@pytest.mark.parametrize("text, says", [
    ("{}", "lacks the key(s) ['name'"),                    # a TypeError traceback before
    ("[1, 2]", "a JSON object, got list"),
    ('{"name": "x", "prefill_tokens": 5, "prefill_seconds": [1], "decode_batch": [1], "decode_seconds": [1]}',
     "wrong type"),
    ("{", "Expecting property name"),                       # the file was not named before
])
def test_a_malformed_cost_model_file_is_a_value_error_naming_the_file(tmp_path, text, says):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="cost model file .*bad.json") as e:
        CostModel.load(str(path))
    assert says in str(e.value)


def _idle_engine(**kw):
    """What profile_engine reads of an engine, for the cache's tests (nothing is measured)."""
    from types import SimpleNamespace

    from fastserve_jax.config import EngineConfig

    return SimpleNamespace(cfg=dataclasses.replace(EngineConfig(), **kw), model_cfg="m",
                           kv=SimpleNamespace(num_blocks=100), warmup_mode="full", has_unfinished=lambda: False)


def test_a_damaged_cached_profile_is_measured_again_and_replaced(tmp_path, monkeypatch, caplog):
    """A cached profile that does not parse (zero bytes, cut short, another format) used to stop
    the engine from starting (ValueError from CostModel.load): it is measured again, with a warning."""
    from fastserve_jax import cost_profile

    eng = _idle_engine()
    measured = []
    monkeypatch.setattr(cost_profile, "measure", lambda engine, repeats, sparse: measured.append(1) or T)
    path = tmp_path / "cost_models" / f"{cost_profile.cost_cache_key(eng)}.json"
    path.parent.mkdir()
    for text in ("", '{"name": "t", "prefill_tok', '{"name": "t"}', "[]"):
        path.write_text(text)
        assert cost_profile.profile_engine(eng, cache_dir=str(tmp_path)) == T
        assert CostModel.load(str(path)) == T and "profiling again" in caplog.text
    assert len(measured) == 4
    assert cost_profile.profile_engine(eng, cache_dir=str(tmp_path)) == T and len(measured) == 4


def test_a_profile_that_cannot_be_cached_still_serves(tmp_path, monkeypatch, caplog):
    """A cache directory that cannot be written (full disk, read-only, a file in the way) used to
    stop the engine from starting with the OSError of CostModel.save; the profile is used
    uncached, with a warning, and no temporary file is left."""
    from fastserve_jax import cost_profile

    monkeypatch.setattr(cost_profile, "measure", lambda engine, repeats, sparse: T)
    (tmp_path / "cost_models").write_text("a file where the directory goes")
    assert cost_profile.profile_engine(_idle_engine(), cache_dir=str(tmp_path)) == T
    assert "could not cache" in caplog.text
    (tmp_path / "cost_models").unlink()
    (tmp_path / "cost_models").mkdir()

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(json, "dump", full)
    assert cost_profile.profile_engine(_idle_engine(), cache_dir=str(tmp_path)) == T
    assert os.listdir(tmp_path / "cost_models") == []


def test_the_profile_cache_key_names_the_machine_and_the_compiler(monkeypatch):
    """On the CPU every device kind is 'cpu': a profile measured on a 2-core VM was loaded on
    any other machine sharing the cache (a shared home, a cache baked into an image), and
    after a jax upgrade or under other XLA flags. The key now names the processor and the
    cores this process may use, the jax and jaxlib versions and XLA_FLAGS."""
    from fastserve_jax import cost_profile

    eng = _idle_engine()
    base = cost_profile.cost_cache_key(eng)
    monkeypatch.setattr(cost_profile.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cost_profile.cost_cache_key(eng) != base
    monkeypatch.undo()
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=true")
    assert cost_profile.cost_cache_key(eng) != base
    monkeypatch.undo()
    assert cost_profile.cost_cache_key(eng) == base


def test_a_small_pool_times_the_decode_context_at_rows_whose_contexts_pass_the_smallest_block_bucket(
        tiny_checkpoints, tmp_path, monkeypatch):
    """67 free blocks of 16 tokens and 16 rows give each row a 63-token context, read as the
    1-token rows' 4-block bucket: timed there, the context cost was noise and came out 0, and
    the simulator ran such an engine 2.5-3x faster than it served. On a fake device whose decode
    costs 1 ms plus 1 us per padded token read, the profile finds the 1 us."""
    from fastserve_jax import LLM, cost_profile

    def fake_time(self, items, repeats):
        bs, buckets = 16, self.engine.cfg.block_buckets
        ctx = max(s.request.num_computed_tokens + 1 for s in items)
        blocks = next((b for b in buckets if b * bs >= ctx), buckets[-1])
        self.release()
        return 1e-3 + 1e-6 * 16 * blocks * len(items) if all(s.num_tokens == 1 for s in items) else 1e-3

    monkeypatch.setattr(cost_profile._Probe, "time", fake_time)
    monkeypatch.setattr(cost_profile._Probe, "keys", lambda self, items: self.release() or [])   # nothing runs
    llm = LLM(None, warmup=False, scheduler="fcfs", max_model_len=1024, max_num_seqs=16,   # fcfs: no profile at start
              max_num_batched_tokens=512, block_size=16, num_device_blocks=68, compilation_cache_dir=str(tmp_path))
    cm = cost_profile.measure(llm.engine, repeats=1)   # 2 rows of 527 tokens: 64-block bucket against 4
    assert cm.block_buckets[0] == 4 and cm.decode_context == pytest.approx(1e-6, rel=1e-6)     # 0 before
