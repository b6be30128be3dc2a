"""A model directory as users point `serve --model` and `LLM(model=...)` at it: what is judged
before anything loads (and before serve's port opens: exit 2, one line), damaged weight files
and indexes named, and repo ids served from the local Hugging Face cache, never downloaded."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fastserve_jax.llm import engine_config
from fastserve_jax.models.hf_files import INDEX_FILE, local_model_dir, weight_files
from fastserve_jax.models.tokenizer import load_tokenizer


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_sizes_the_mesh_cannot_split_and_missing_weights_are_refused_before_loading(tiny_checkpoints, tmp_path,
                                                                                   capsys):
    """Found as the engine started, after serve's port opened, until 2026-12-07: serve exited 1."""
    from fastserve_jax.serve.cli import main

    llama = tiny_checkpoints("llama")           # 4 heads, 2 layers
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of tensor_parallel_size=3"):
        engine_config(llama, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="num_layers=2 is not a multiple of pipeline_parallel_size=4"):
        engine_config(llama, pipeline_parallel_size=4)
    no_weights = _copy(llama, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(ValueError, match="no .safetensors file in"):
        engine_config(no_weights)
    no_tokenizer = _copy(llama, tmp_path / "no_tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(no_tokenizer, f))
    for argv, said in ((["--model", llama, "--tensor-parallel-size", "3"], "tensor_parallel_size=3"),
                       (["--model", no_weights], "no .safetensors file"),
                       (["--model", no_tokenizer], "no tokenizer in"),
                       (["--model", llama, "--tokenizer", no_tokenizer], "no tokenizer in"),
                       (["--model", ""], "model must be a path")):
        assert main(["serve", "--port", "1", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (argv, err)


def test_damaged_weight_files_and_indexes_are_named(tiny_checkpoints, tmp_path):
    llama = tiny_checkpoints("llama")
    dangling = _copy(llama, tmp_path / "dangling")      # a hub snapshot's link into blobs/, the blob gone
    os.remove(os.path.join(dangling, "model.safetensors"))
    os.symlink(str(tmp_path / "blobs" / "gone"), os.path.join(dangling, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors' is a link to nothing \(an interrupted download\?\)"):
        weight_files(dangling)
    a_dir = _copy(llama, tmp_path / "a_dir")
    os.remove(os.path.join(a_dir, "model.safetensors"))
    os.mkdir(os.path.join(a_dir, "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors' is not a regular file"):
        weight_files(a_dir)
    os.rmdir(os.path.join(a_dir, "model.safetensors"))
    os.mkdir(os.path.join(a_dir, "part-1.safetensors"))          # found by the glob of shards without an index
    with pytest.raises(ValueError, match="part-1.safetensors' is not a regular file"):
        weight_files(a_dir)
    outside = _copy(llama, tmp_path / "outside")       # an index that names a shard outside the directory
    os.rename(os.path.join(outside, "model.safetensors"), os.path.join(outside, "model-00001-of-00001.safetensors"))
    with open(os.path.join(outside, INDEX_FILE), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": "../dangling/model.safetensors",
                                  "model.norm.weight": "model-00001-of-00001.safetensors"}}, f)
    with pytest.raises(ValueError, match=r"names shard files outside the directory: \['../dangling/model"):
        weight_files(outside)


def test_a_tokenizer_config_without_a_vocabulary_is_refused(tiny_checkpoints, tmp_path):
    """transformers 5 builds an empty tokenizer from a tokenizer_config.json alone; the server
    said healthy and every prompt was "empty" (until 2026-12-07)."""
    d = _copy(tiny_checkpoints("llama"), tmp_path / "m")
    os.remove(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}, f)
    with pytest.raises(ValueError, match="has no vocabulary, only special tokens"):
        load_tokenizer(d)


def _hub_cache(root, repo: str, src: str) -> str:
    """A Hugging Face hub cache holding `repo` at one revision, laid out as `hf download` leaves
    it: files in blobs/, the snapshot's names linking to them, refs/main naming the revision."""
    base = root / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (base / "blobs").mkdir(parents=True)
    (base / "snapshots" / rev).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    for i, name in enumerate(sorted(os.listdir(src))):
        shutil.copy(os.path.join(src, name), base / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", base / "snapshots" / rev / name)
    return str(base / "snapshots" / rev)


def test_repo_ids_are_served_from_the_local_hub_cache_and_never_downloaded(tiny_checkpoints, tmp_path, monkeypatch,
                                                                          capsys):
    """vLLM serves `--model org/name` from the cache; here it was "not a model directory" (until
    2026-12-07). An id the cache lacks says so, naming the cache, at once (no network)."""
    from huggingface_hub import constants

    from fastserve_jax.serve.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _hub_cache(tmp_path / "hub", "org/tiny-llama", tiny_checkpoints("llama"))
    assert local_model_dir("org/tiny-llama") == snapshot
    path, model_cfg, _ = engine_config("org/tiny-llama")
    assert path == snapshot and model_cfg.num_heads == 4
    assert load_tokenizer("org/tiny-llama").encode("count") == load_tokenizer(snapshot).encode("count")
    assert local_model_dir(str(tmp_path)) == str(tmp_path)                    # a directory is itself
    with pytest.raises(ValueError, match=r"model 'org/absent' is not a directory here, and the local Hugging Face "
                                         rf"cache \({tmp_path}/hub\) has no snapshot of it .*downloads nothing"):
        engine_config("org/absent")
    assert main(["serve", "--port", "1", "--model", "org/absent"]) == 2
    assert "downloads nothing" in capsys.readouterr().err


def test_jax_disable_jit_is_refused_before_anything_loads():
    """JAX_DISABLE_JIT=1 was accepted: the server said ready, then every request failed (the
    engine runs ahead-of-time compiled programs only), until 2026-12-07."""
    import jax

    jax.config.update("jax_disable_jit", True)
    try:
        with pytest.raises(ValueError, match="JAX_DISABLE_JIT is set"):
            engine_config(None)
    finally:
        jax.config.update("jax_disable_jit", False)
