"""Random-weight Hugging Face checkpoints of real architectures, built without torch.

The config comes from the architecture's `transformers` config class, the weights are
numpy normal draws shaped like our Linen param tree, written with `save_hf_checkpoint`
under HF names. Used by the parity tests (tiny presets) and the benchmarks (llama-125m).

    python -m fastserve_jax.models.random_checkpoint /tmp/llama125m --arch llama-125m
"""

from __future__ import annotations

import argparse

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fastserve_jax.models import param_shapes
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.loader import save_hf_checkpoint

# model_type -> (transformers config class, HF architecture name)
_CONFIGS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "opt": ("OPTConfig", "OPTForCausalLM")}

# Tiny shapes: fast on a 2-core CPU, yet GQA (4 query heads over 2 KV heads) and several blocks.
_TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
_TINY_OPT = dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512, word_embed_proj_dim=64)

# preset -> (model_type, config kwargs, default init std).
# Tiny presets draw with std 0.1 rather than 0.02: at hidden 64 that makes attention scores
# and logits O(1), so a wrong rope, bias or norm moves the logits far beyond parity tolerance.
PRESETS: dict[str, tuple[str, dict, float]] = {
    "llama": ("llama", dict(_TINY_LLAMA, tie_word_embeddings=False), 0.1),
    "llama3": ("llama", dict(_TINY_LLAMA, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=32)), 0.1),
    "qwen2": ("qwen2", dict(_TINY_LLAMA, tie_word_embeddings=True), 0.1),
    "mistral": ("mistral", dict(_TINY_LLAMA, num_key_value_heads=1, tie_word_embeddings=False), 0.1),
    "opt": ("opt", dict(_TINY_OPT, do_layer_norm_before=True), 0.1),
    "opt-postln": ("opt", dict(_TINY_OPT, do_layer_norm_before=False, word_embed_proj_dim=32), 0.1),
    "llama-125m": ("llama", dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                 tie_word_embeddings=False), 0.02),
}
TINY_PRESETS = tuple(p for p in PRESETS if p != "llama-125m")


def hf_config_dict(arch: str, **overrides) -> dict:
    """config.json contents of a preset, with config kwargs overridden."""
    if arch not in PRESETS:
        raise ValueError(f"unknown preset {arch!r}; choose one of {sorted(PRESETS)}")
    import transformers  # imports torch when installed: seconds, so only when a config is built

    model_type, kwargs, _ = PRESETS[arch]
    cls_name, architecture = _CONFIGS[model_type]
    d = getattr(transformers, cls_name)(**{**kwargs, **overrides}).to_dict()
    d["architectures"] = [architecture]
    return d


def random_params(cfg: ModelConfig, seed: int = 0, init_std: float = 0.02, dtype: str = "float32") -> dict:
    """Our param tree filled with normal(0, init_std) weights and biases, norm scales ~1."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, spec in flatten_dict(param_shapes(cfg)).items():
        if path[-1] == "scale":
            a = 1.0 + 0.1 * rng.standard_normal(spec.shape, dtype=np.float32)
        else:
            a = init_std * rng.standard_normal(spec.shape, dtype=np.float32)
        out[path] = a.astype(dtype)
    return unflatten_dict(out)


def make_random_checkpoint(out_dir: str, arch: str, *, seed: int = 0, init_std: float | None = None,
                           dtype: str = "float32", max_shard_bytes: int | None = None, **overrides) -> str:
    """Write a random-weight HF checkpoint of preset `arch` (see PRESETS) to out_dir; returns out_dir.

    overrides: transformers config kwargs (e.g. num_hidden_layers=4). dtype: the stored
    tensors' dtype ("float32" or "bfloat16"). init_std: default per preset.
    """
    d = hf_config_dict(arch, **overrides)
    d["dtype"] = dtype
    std = PRESETS[arch][2] if init_std is None else init_std
    params = random_params(ModelConfig.from_dict(d), seed, std, dtype)
    save_hf_checkpoint(d, params, out_dir, max_shard_bytes)
    save_byte_tokenizer(out_dir, d["vocab_size"], d.get("eos_token_id"))
    return out_dir


def save_byte_tokenizer(out_dir: str, vocab_size: int, eos_token_id: int | None) -> None:
    """A byte-level tokenizer (no merges) so the engine can serve the random model.

    Ids 0-255 are the bytes; ids beyond are placeholder tokens that decode to "<tN>", so
    any id a random model samples detokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    eos = next((t for t, i in vocab.items() if i == eos_token_id), None) if isinstance(eos_token_id, int) else None
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos).save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight Hugging Face checkpoint of a real architecture.")
    ap.add_argument("out_dir")
    ap.add_argument("--arch", required=True, choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-bytes", type=int, default=None, help="write shards plus an index")
    args = ap.parse_args(argv)
    make_random_checkpoint(args.out_dir, args.arch, seed=args.seed, dtype=args.dtype,
                           max_shard_bytes=args.max_shard_bytes)
    print(args.out_dir)


if __name__ == "__main__":
    main()
