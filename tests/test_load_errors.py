"""Loading a Hugging Face directory that is broken, and the converted-params cache when the
directory changes under it, is damaged, or is filled by two processes at once: every case fails
before serving with an error naming the file, or is converted again; never old or wrong weights."""

from __future__ import annotations

import gc
import glob
import json
import os
import shutil
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fastserve_jax.models.hf_files import INDEX_FILE
from fastserve_jax.models.loader import load_model
from fastserve_jax.models.random_checkpoint import make_random_checkpoint


def _checkpoint(tmp_path, arch: str, **kw) -> str:
    """A tiny random checkpoint of preset arch, built once per test under tmp_path/src."""
    d = tmp_path / "src" / "-".join([arch] + [f"{k}{v}" for k, v in sorted(kw.items())])
    return str(d) if d.is_dir() else make_random_checkpoint(str(d), arch, **kw)


def test_broken_files_are_named(tmp_path):
    """Each broken input fails before any weight is read, naming the file and what is wrong."""
    def copy(name: str, arch: str = "llama", **kw) -> str:
        d = tmp_path / name
        d.mkdir()
        src = _checkpoint(tmp_path, arch, **kw)
        for f in glob.glob(os.path.join(src, "*")):
            (d / os.path.basename(f)).write_bytes(open(f, "rb").read())
        return str(d)

    for arch in ("llama", "opt"):
        d = copy(f"trunc-{arch}", arch)
        with open(os.path.join(d, "model.safetensors"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) - 100)
        with pytest.raises(ValueError, match=r"cannot read weight file .*trunc-.*model\.safetensors.*truncated"):
            load_model(d, cache_dir="")
        d = copy(f"int-{arch}", arch)
        tensors = load_file(os.path.join(d, "model.safetensors"))
        emb = next(n for n in tensors if "embed_tokens" in n)
        tensors[emb] = tensors[emb].astype(np.int64)   # same shape, integer dtype: was cast into garbage
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"not floating-point \(1\): {emb}: I64"):
            load_model(d, cache_dir="")

    d = copy("index", max_shard_bytes=40000)
    index = os.path.join(d, INDEX_FILE)
    good = json.load(open(index))
    want = _embedding(load_model(d, cache_dir="")[2])
    # a stale entry no shard holds is left out, as transformers and vLLM leave it (refused until 2026-12-07)
    json.dump({**good, "weight_map": {**good["weight_map"], "model.extra.weight": "model-00001-of-00012.safetensors"}},
              open(index, "w"))
    np.testing.assert_array_equal(_embedding(load_model(d, cache_dir="")[2]), want)
    name, shard = next((n, s) for n, s in good["weight_map"].items() if s != "model-00001-of-00012.safetensors")
    json.dump({**good, "weight_map": {**good["weight_map"], name: "model-00001-of-00012.safetensors"}}, open(index, "w"))
    with pytest.raises(ValueError, match=rf"does not match its shards.*{name} \(index: model-00001.*found in: {shard}"):
        load_model(d, cache_dir="")
    open(index, "w").write("{")
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors\.index\.json': JSONDecodeError"):
        load_model(d, cache_dir="")
    json.dump({"metadata": {}}, open(index, "w"))
    with pytest.raises(ValueError, match=r"cannot read .*index\.json': KeyError: 'weight_map'"):
        load_model(d, cache_dir="")
    os.remove(index)        # shards without an index: every .safetensors file there (vLLM's; was refused)
    np.testing.assert_array_equal(_embedding(load_model(d, cache_dir="")[2]), want)

    d = copy("config")
    open(os.path.join(d, "config.json"), "w").write("{")
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON"):
        load_model(d, cache_dir="")
    cfg = json.load(open(os.path.join(_checkpoint(tmp_path, "llama"), "config.json")))
    json.dump({k: v for k, v in cfg.items() if k != "hidden_size"}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"config\.json' lacks 'hidden_size'"):
        load_model(d, cache_dir="")


# ---------------------------------------------------------------- the converted-params cache

def _embedding(params) -> np.ndarray:
    return np.asarray(params["embed_tokens"]["embedding"])


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """load(path) -> params through a cache under tmp_path/cache (tiny weights cached anyway)."""
    monkeypatch.setattr("fastserve_jax.models.loader.CACHE_MIN_BYTES", 0)
    return lambda path: load_model(path, cache_dir=str(tmp_path / "cache"))[2]


def test_cache_sees_new_weights_with_the_old_size_and_mtime(tmp_path, cached):
    d = _checkpoint(tmp_path, "llama")
    old = _embedding(cached(d))
    file, new_file = (os.path.join(p, "model.safetensors") for p in (d, _checkpoint(tmp_path, "llama", seed=1)))
    st = os.stat(file)
    open(file, "wb").write(open(new_file, "rb").read())    # as cp -p, tar or rsync -a leave it
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(file) == st.st_size
    served = _embedding(cached(d))
    assert not np.array_equal(served, old) and np.array_equal(served, _embedding(load_model(d, cache_dir="")[2]))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
def test_a_damaged_cache_entry_is_converted_again(tmp_path, cached, caplog):
    d = _checkpoint(tmp_path, "opt")
    want = _embedding(cached(d))
    (entry,) = glob.glob(str(tmp_path / "cache" / "params" / "*"))
    data = max((os.path.join(r, f) for r, _, fs in os.walk(entry) for f in fs), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    assert np.array_equal(_embedding(cached(d)), want)
    assert "unreadable" in caplog.text
    assert np.array_equal(_embedding(cached(d)), want)    # the entry was rebuilt: restores cleanly
    gc.collect()    # orbax's abandoned reads are reported here, under this test's filter, not in a later test's
    for name in os.listdir(entry):                        # emptied (a half-copied cache): the same
        (shutil.rmtree if os.path.isdir(os.path.join(entry, name)) else os.remove)(os.path.join(entry, name))
    assert np.array_equal(_embedding(cached(d)), want)


def test_two_processes_filling_one_cache_entry(tmp_path, cached, monkeypatch):
    """Another process saves the entry while this one converts: no crash, the first entry stays,
    no temporary directory is left behind."""
    import fastserve_jax.models.loader as loader

    d = _checkpoint(tmp_path, "llama")
    convert = loader.load_hf_params

    def convert_while_another_saves(path, *a, **k):
        params = convert(path, *a, **k)
        loader.save_params(str(tmp_path / "cache" / "params" / loader.cache_key(path, "float32")), params)
        return params

    monkeypatch.setattr(loader, "load_hf_params", convert_while_another_saves)
    want = _embedding(cached(d))
    assert len(os.listdir(tmp_path / "cache" / "params")) == 1
    monkeypatch.setattr(loader, "load_hf_params", convert)
    assert np.array_equal(_embedding(cached(d)), want)


def test_a_killed_fills_directory_is_removed_once_stale(tmp_path, cached):
    """A fill killed mid-write left its `*.partial` directory (up to a copy of the weights) for
    good; a later load removes it once nothing was written in it for STALE_FILL_S, and keeps a
    fill that is still writing (another process's)."""
    import fastserve_jax.models.loader as loader

    d = _checkpoint(tmp_path, "llama")
    params_dir = tmp_path / "cache" / "params"
    stale, live = (params_dir / f"{loader.cache_key(d, 'float32')}.{n}-0000.partial" for n in (7, 8))
    older = params_dir / f"{loader.cache_key(d, 'float32')}.orbax-checkpoint-tmp"   # an older version's fill
    for work in stale, live, older:
        os.makedirs(work / "entry" / "d")
        (work / "entry" / "d" / "chunk").write_bytes(b"x" * 100)
    old = time.time() - loader.STALE_FILL_S - 60
    for p in (w / sub for w in (stale, older) for sub in ("", "entry", "entry/d", "entry/d/chunk")):
        os.utime(p, (old, old))
    os.utime(live, (old, old))                             # an old directory, a file written just now
    want = _embedding(load_model(d, cache_dir="")[2])
    assert np.array_equal(_embedding(cached(d)), want)
    assert sorted(os.listdir(params_dir)) == sorted([loader.cache_key(d, "float32"), live.name])
    assert np.array_equal(_embedding(cached(d)), want)    # restored, live fill untouched
    assert live.exists()


def test_a_cache_that_orbax_cannot_write_still_loads(tmp_path, cached, monkeypatch, caplog):
    """orbax reports a full disk as tensorstore's ValueError (RESOURCE_EXHAUSTED), not an
    OSError: load_model let it out after converting, so the engine did not start, and the
    `.orbax-checkpoint-tmp` directory it had half filled stayed in the cache, holding the space."""
    import fastserve_jax.models.loader as loader

    d = _checkpoint(tmp_path, "llama")

    def full_disk(path, params, **k):
        os.makedirs(path + ".orbax-checkpoint-tmp")        # where orbax was writing
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "layers/0.0" in OCDBT database: No space left on device')

    monkeypatch.setattr(loader, "save_params", full_disk)
    assert np.array_equal(_embedding(cached(d)), _embedding(load_model(d, cache_dir="")[2]))
    assert "could not cache converted params" in caplog.text
    assert os.listdir(tmp_path / "cache" / "params") == []


def test_a_broken_tokenizer_fails_before_the_weights_load(tmp_path, monkeypatch):
    from fastserve_jax.config import EngineConfig
    from fastserve_jax.engine import LLMEngine

    d = tmp_path / "model"
    shutil.copytree(_checkpoint(tmp_path, "opt"), d)
    (d / "tokenizer.json").write_text("{")

    def no_load(*a, **k):
        raise AssertionError("the weights loaded before the tokenizer was checked")

    monkeypatch.setattr("fastserve_jax.models.loader.load_model", no_load)
    with pytest.raises(ValueError, match=r"cannot load the tokenizer of .*model'"):
        LLMEngine.from_pretrained(str(d), EngineConfig())


def test_a_tied_config_with_a_stored_head_unlike_its_embedding_is_logged(tmp_path, caplog, monkeypatch):
    """qwen2 ties its head to the embedding. A checkpoint that still stores an lm_head.weight
    of other values is served with the embedding, as vLLM serves it (transformers would use
    the stored head): that was silent, and the log now says so. A stored copy of the embedding
    says nothing."""
    monkeypatch.setattr("fastserve_jax.models.loader.CACHE_MIN_BYTES", 0)   # tiny weights: cached anyway
    d = _checkpoint(tmp_path, "qwen2")
    file = os.path.join(d, "model.safetensors")
    tensors = load_file(file)
    embed = tensors["model.embed_tokens.weight"]
    want = _embedding(load_model(d, cache_dir="")[2])
    for head, warned in ((embed.copy(), False), (embed[::-1].copy(), True)):
        save_file({**tensors, "lm_head.weight": head}, file)
        for cache in ("", str(tmp_path / "cache"), str(tmp_path / "cache")):   # converted, cached, restored
            caplog.clear()
            with caplog.at_level("WARNING"):
                params = load_model(d, cache_dir=cache)[2]
            assert ("stores an lm_head.weight that differs from it" in caplog.text) == warned
            assert np.array_equal(_embedding(params), want) and "lm_head" not in params
