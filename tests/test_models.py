"""Model definitions and checkpoint loading against `transformers` (the reference), on CPU.

Every tiny preset of `models.random_checkpoint` (Llama untied, Llama-3 rope scaling, Qwen2
QKV bias + tied embeddings, Mistral GQA, OPT pre-LN, OPT post-LN with project_in/out) is
checked for logit parity in the dense path and in the paged path (multi-chunk packed
prefill, then decode), and for greedy-generation parity.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fastserve_jax.kv_cache import NULL_BLOCK
from fastserve_jax.models import build_model, param_shapes
from fastserve_jax.models.attention import AttnBatch, KVCache, dense_batch
from fastserve_jax.models.checkpoint import restore_params, save_params
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.hf_files import INDEX_FILE, read_raw_tensor
from fastserve_jax.models.hf_params import load_hf_params
from fastserve_jax.models.loader import CACHE_ENV, cache_key, load_model, save_hf_checkpoint
from fastserve_jax.models.random_checkpoint import TINY_PRESETS, make_random_checkpoint

TOL = 1e-4
SEQ = 32  # dense test rows are (2, SEQ); greedy generation reuses the same compiled shape


@dataclasses.dataclass
class Loaded:
    path: str
    cfg: ModelConfig
    params: dict
    dense: object  # jitted (params, tokens (R, Q)) -> logits (R*Q, V)
    paged: object  # jitted (params, tokens, AttnBatch, KVCache) -> (logits, KVCache)


def _jit_fns(module):
    dense = jax.jit(lambda p, t: module.apply({"params": p}, t, dense_batch(t.shape))[0])
    paged = jax.jit(lambda p, t, b, c: module.apply({"params": p}, t, b, c))
    return dense, paged


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, **kw) -> directory of a random HF checkpoint, built once per session."""
    made: dict = {}

    def get(arch: str, **kw) -> str:
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_random_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoint):
    cache: dict = {}

    def get(arch: str) -> Loaded:
        if arch not in cache:
            path = checkpoint(arch)
            cfg, module, params = load_model(path, cache_dir="")
            cache[arch] = Loaded(path, cfg, params, *_jit_fns(module))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def hf_model():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def get(path: str):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _tokens(cfg: ModelConfig, shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, shape).astype(np.int32)


def _tree_equal(a: dict, b: dict) -> bool:
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    return ([p for p, _ in la] == [p for p, _ in lb]
            and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                    for (_, x), (_, y) in zip(la, lb)))


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("arch", TINY_PRESETS)
def test_dense_logits_match_transformers(arch, loaded, hf_model):
    m = loaded(arch)
    tokens = _tokens(m.cfg, (2, SEQ))
    ours = np.asarray(m.dense(m.params, jnp.asarray(tokens))).reshape(2, SEQ, -1)
    ref = _hf_logits(hf_model(m.path), tokens)
    assert np.abs(ours - ref).max() < TOL


def _paged_rows(rows, q_len: int, nb: int, bs: int):
    """rows: per row, a list of segments (block_table, start position, tokens) packed in order.
    Returns tokens (R, Q) and the AttnBatch, padding to Q tokens and NB blocks."""
    r = len(rows)
    toks, pos, slots = (np.zeros((r, q_len), np.int32) for _ in range(3))  # padding writes null-block slots
    seg = np.full((r, q_len), -1, np.int32)
    bids = np.full((r, nb), NULL_BLOCK, np.int32)
    bseg = np.full((r, nb), -2, np.int32)
    bpos = np.zeros((r, nb), np.int32)
    for i, segments in enumerate(rows):
        t = b = 0
        for s, (table, start, chunk) in enumerate(segments):
            n = len(chunk)
            p = np.arange(start, start + n)
            toks[i, t:t + n], pos[i, t:t + n], seg[i, t:t + n] = chunk, p, s
            slots[i, t:t + n] = table[p // bs] * bs + p % bs
            used = -(-(start + n) // bs)  # blocks holding positions 0 .. start+n-1
            bids[i, b:b + used], bseg[i, b:b + used], bpos[i, b:b + used] = table[:used], s, np.arange(used) * bs
            t, b = t + n, b + used
    batch = AttnBatch(*(jnp.asarray(a) for a in (pos, seg, slots, bids, bseg, bpos)))
    return jnp.asarray(toks), batch


@pytest.mark.parametrize("arch", TINY_PRESETS)
def test_paged_prefill_and_decode_match_transformers(arch, loaded, hf_model):
    """Sequences A (27 tokens) and B (20) over shuffled, non-contiguous blocks of 4 tokens:
    a prefill launch packing both in one row (the other row all padding), a launch with one
    chunk per row, then three decode steps; every token's logits against the HF full forward.
    All launches share one shape (R=2, Q=16, NB=8): one compile per model."""
    m = loaded(arch)
    c, bs = m.cfg, 4
    seqs = [_tokens(c, 27, seed=1), _tokens(c, 20, seed=2)]
    refs = [_hf_logits(hf_model(m.path), s[None])[0] for s in seqs]
    order = np.random.default_rng(3).permutation(np.arange(1, 16))
    tables = [order[:7], order[7:12]]  # 27 and 20 tokens need 7 and 5 blocks
    cache = KVCache(*(jnp.zeros((c.num_layers, 16, bs, c.num_kv_heads, c.head_dim), jnp.float32) for _ in range(2)))
    # per launch, per row: the (sequence, lo, hi) chunks packed into it
    launches = [[[(0, 0, 10), (1, 0, 6)], []],
                [[(0, 10, 24)], [(1, 6, 17)]]]
    launches += [[[(0, 24 + i, 25 + i)], [(1, 17 + i, 18 + i)]] for i in range(3)]
    for launch in launches:
        rows = [[(tables[k], lo, seqs[k][lo:hi]) for k, lo, hi in row] for row in launch]
        tokens, batch = _paged_rows(rows, q_len=16, nb=8, bs=bs)
        logits, cache = m.paged(m.params, tokens, batch, cache)
        logits = np.asarray(logits).reshape(2, 16, -1)
        for r, row in enumerate(launch):
            t = 0
            for k, lo, hi in row:
                assert np.abs(logits[r, t:t + hi - lo] - refs[k][lo:hi]).max() < TOL, (k, lo, hi)
                t += hi - lo


@pytest.mark.parametrize("arch", TINY_PRESETS)
def test_greedy_generation_matches_transformers(arch, loaded, hf_model):
    import torch

    m = loaded(arch)
    prompt_len, new = 8, 8
    prompts = _tokens(m.cfg, (2, prompt_len), seed=4)
    rows = np.zeros((2, SEQ), np.int32)  # right padding never reaches earlier positions (causal)
    rows[:, :prompt_len] = prompts
    for cur in range(prompt_len, prompt_len + new):
        logits = np.asarray(m.dense(m.params, jnp.asarray(rows))).reshape(2, SEQ, -1)
        rows[:, cur] = logits[:, cur - 1].argmax(-1)
    hf = hf_model(m.path).generate(torch.tensor(prompts, dtype=torch.long), attention_mask=torch.ones(2, prompt_len),
                                   max_new_tokens=new, do_sample=False).numpy()
    eos = set(m.cfg.eos_token_id)
    for i in range(2):
        ours = list(rows[i, prompt_len:prompt_len + new])
        stop = next((j + 1 for j, t in enumerate(ours) if t in eos), new)  # HF pads after EOS
        assert list(hf[i, prompt_len:prompt_len + stop]) == ours[:stop]


def test_parity_is_sensitive_to_rope_scaling_and_qkv_bias(loaded):
    """The features parity covers change the logits far beyond TOL (so parity really tests them)."""
    m = loaded("llama3")
    tokens = jnp.asarray(_tokens(m.cfg, (2, SEQ)))
    base = np.asarray(m.dense(m.params, tokens))
    no_scaling = build_model(dataclasses.replace(m.cfg, rope_scaling=None))
    assert np.abs(np.asarray(_jit_fns(no_scaling)[0](m.params, tokens)) - base).max() > 100 * TOL

    q = loaded("qwen2")
    base = np.asarray(q.dense(q.params, tokens))
    attn = q.params["layers"]["attn"]
    no_bias = {**q.params, "layers": {**q.params["layers"], "attn": {
        k: {**v, "bias": jnp.zeros_like(v["bias"])} if "bias" in v else v for k, v in attn.items()}}}
    assert np.abs(np.asarray(q.dense(no_bias, tokens)) - base).max() > 100 * TOL


# ---------------------------------------------------------------- safetensors layout

def test_save_hf_checkpoint_inverts_load(loaded, tmp_path):
    """load -> save writes the very tensors (names, shapes, values) that were read."""
    for arch in ("qwen2", "opt-postln"):
        m = loaded(arch)
        with open(os.path.join(m.path, "config.json")) as f:
            save_hf_checkpoint(json.load(f), m.params, str(tmp_path / arch))
        orig, again = load_file(os.path.join(m.path, "model.safetensors")), load_file(str(tmp_path / arch / "model.safetensors"))
        assert sorted(orig) == sorted(again)
        assert all(np.array_equal(orig[k], again[k]) for k in orig)
        if arch == "qwen2":
            assert "lm_head.weight" not in again  # tied
        else:
            assert {"model.decoder.project_in.weight", "model.decoder.project_out.weight"} <= set(again)
            assert "model.decoder.final_layer_norm.weight" not in again  # post-LN


def test_sharded_checkpoint_loads_identically(loaded, tmp_path):
    m = loaded("llama")
    with open(os.path.join(m.path, "config.json")) as f:
        cfg_dict = json.load(f)
    save_hf_checkpoint(cfg_dict, m.params, str(tmp_path), max_shard_bytes=100_000)
    shards = sorted(glob.glob(str(tmp_path / "model-*-of-*.safetensors")))
    assert len(shards) > 2 and not os.path.exists(tmp_path / "model.safetensors")
    with open(tmp_path / INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == [os.path.basename(s) for s in shards]
    assert _tree_equal(load_hf_params(str(tmp_path), m.cfg), m.params)


def test_sharded_checkpoint_loads_in_transformers(loaded, hf_model, tmp_path):
    m = loaded("mistral")
    with open(os.path.join(m.path, "config.json")) as f:
        save_hf_checkpoint(json.load(f), m.params, str(tmp_path), max_shard_bytes=50_000)
    tokens = _tokens(m.cfg, (1, 16))
    assert np.array_equal(_hf_logits(hf_model(str(tmp_path)), tokens), _hf_logits(hf_model(m.path), tokens))


def test_decoder_prefix_and_stored_tied_lm_head_load(loaded, tmp_path):
    """facebook/opt-* store `decoder.*` (no `model.`) and some tied checkpoints keep lm_head.weight."""
    m = loaded("opt")
    tensors = load_file(os.path.join(m.path, "model.safetensors"))
    renamed = {k.removeprefix("model."): v for k, v in tensors.items()}
    renamed["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"]
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert _tree_equal(load_hf_params(str(tmp_path), m.cfg), m.params)


# ---------------------------------------------------------------- orbax and the load_model cache

def test_orbax_round_trip_into_target_sharding(loaded, tmp_path):
    m = loaded("qwen2")
    save_params(str(tmp_path / "ckpt"), m.params)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), param_shapes(m.cfg))
    restored = restore_params(str(tmp_path / "ckpt"), target)
    assert _tree_equal(restored, m.params)
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored))
    with pytest.raises(ValueError, match="already exists"):
        save_params(str(tmp_path / "ckpt"), m.params)
    save_params(str(tmp_path / "zstd"), m.params, compress=True)
    assert _tree_equal(restore_params(str(tmp_path / "zstd"), m.params), m.params)  # target: arrays


def test_load_model_restores_from_cache(checkpoint, tmp_path, monkeypatch):
    path = checkpoint("opt-postln")
    monkeypatch.setattr("fastserve_jax.models.loader.CACHE_MIN_BYTES", 0)   # tiny weights: cache them anyway
    cfg, _, converted = load_model(path, cache_dir=str(tmp_path))
    cached = tmp_path / "params" / cache_key(path, "float32")
    assert cached.is_dir()

    def no_conversion(*a, **k):
        raise AssertionError("the cached params should have been restored")

    monkeypatch.setattr("fastserve_jax.models.loader.load_hf_params", no_conversion)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # the env var names the same root
    cfg2, module, restored = load_model(path)
    assert cfg2 == cfg and _tree_equal(restored, converted)
    assert module.cfg == cfg
    assert cache_key(path, "bfloat16") != cache_key(path, "float32")
    st = os.stat(os.path.join(path, "model.safetensors"))
    os.utime(os.path.join(path, "model.safetensors"), ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_key(path, "float32") != cached.name  # new weights, new key


# ---------------------------------------------------------------- bfloat16

def test_bfloat16_checkpoint_and_params(checkpoint, loaded):
    path = checkpoint("llama", dtype="bfloat16")
    file = os.path.join(path, "model.safetensors")
    from safetensors import safe_open

    with safe_open(file, framework="numpy") as f:  # the raw reader (fallback for old safetensors) agrees
        for name in f.keys():
            t = f.get_tensor(name)
            assert t.dtype == jnp.bfloat16 and np.array_equal(read_raw_tensor(file, name), t)

    cfg = ModelConfig.from_pretrained(path)
    p16 = load_hf_params(path, cfg, "bfloat16")
    assert p16["layers"]["attn"]["q_proj"]["weight"].dtype == jnp.bfloat16
    assert p16["embed_tokens"]["embedding"].dtype == jnp.bfloat16 and p16["lm_head"]["weight"].dtype == jnp.bfloat16
    p32 = load_hf_params(path, cfg, "float32")  # the same bf16 values, widened
    assert p32["lm_head"]["weight"].dtype == jnp.float32

    tokens = jnp.asarray(_tokens(cfg, (2, SEQ)))
    ref = np.asarray(loaded("llama").dense(p32, tokens))
    out = np.asarray(_jit_fns(build_model(cfg, "bfloat16"))[0](p16, tokens))
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


# ---------------------------------------------------------------- errors

def test_errors_are_clear(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path), cache_dir="")

    src = checkpoint("llama")
    with open(os.path.join(src, "config.json")) as f:
        cfg_dict = json.load(f)
    tensors = load_file(os.path.join(src, "model.safetensors"))

    def write(name: str, cfg: dict, ts: dict | None) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        if ts is not None:
            save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})
        return str(d)

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(write("gpt2", {**cfg_dict, "model_type": "gpt2"}, tensors), cache_dir="")
    with pytest.raises(ValueError, match="no .safetensors file"):
        load_model(write("empty", cfg_dict, None), cache_dir="")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(write("missing", cfg_dict, missing), cache_dir="")
    extra = {**tensors, "model.layers.0.mlp.up_proj.bias": np.zeros(128, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.0\.mlp\.up_proj\.bias"):
        load_model(write("extra", cfg_dict, extra), cache_dir="")
    # rotary buffers some checkpoints carry (ColossalAI's cos/sin tables) are recomputed, not refused
    buffers = {**tensors, **{f"model.layers.0.self_attn.rotary_emb.{b}": np.zeros(8, np.float32)
                             for b in ("inv_freq", "cos_cached", "sin_cached")}}
    load_model(write("buffers", cfg_dict, buffers), cache_dir="")
    with pytest.raises(ValueError, match=r"wrong shapes .*q_proj\.weight: checkpoint has \(64, 64\), config wants \(32, 64\)"):
        load_model(write("shape", {**cfg_dict, "num_attention_heads": 2, "head_dim": 16}, tensors), cache_dir="")
