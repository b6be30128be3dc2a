"""Config fields of real Hugging Face checkpoints that change what the model computes.

Each case is a tiny random `transformers` model saved with `save_pretrained` (the files a
real checkpoint of that config has), loaded by `load_model` and checked for logit parity with
the torch forward, or for a refusal that names the field. One layer, 32 hidden units: the
whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve_jax.models.attention import dense_batch
from fastserve_jax.models.loader import load_model

TOL = 1e-4
_TINY = {"llama": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
         "opt": dict(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=32)}
_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "opt": "OPTConfig"}


def hf_checkpoint(path, model_type: str, **config_kw):
    """A random-weight transformers model of model_type (tiny shapes, config_kw on top) saved
    to path; returns the torch model (float32, eval)."""
    torch = pytest.importorskip("torch")
    import transformers

    base = _TINY["opt" if model_type == "opt" else "llama"]
    cfg = getattr(transformers, _CONFIGS[model_type])(**{**base, **config_kw})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # std 0.1 (norm scales ~1): a wrong term moves the logits far beyond TOL
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


def max_logit_error(path, model, n_tokens: int = 12) -> float:
    import torch

    _, module, params = load_model(str(path), cache_dir="")
    tokens = np.random.default_rng(0).integers(3, 64, (1, n_tokens)).astype(np.int32)
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(tokens), dense_batch(tokens.shape))[0])
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits[0].numpy()
    return float(np.abs(ours - ref).max())


@pytest.mark.parametrize("model_type,config_kw", [
    ("llama", dict(hidden_act="gelu")),                  # exact (erf) GELU
    ("llama", dict(hidden_act="gelu_pytorch_tanh")),     # tanh approximation
    ("opt", dict(activation_function="gelu")),
    ("opt", dict(activation_function="gelu_new")),
])
def test_activation_functions_match_transformers(tmp_path, model_type, config_kw):
    """Llama's MLP ran SiLU whatever hidden_act said, and OPT's "gelu" was the tanh approximation."""
    model = hf_checkpoint(tmp_path, model_type, **config_kw)
    assert max_logit_error(tmp_path, model) < TOL


def test_unknown_activation_is_refused_by_name():
    from fastserve_jax.models.config import ModelConfig

    import transformers
    d = transformers.LlamaConfig(**_TINY["llama"], hidden_act="relu2").to_dict()
    with pytest.raises(ValueError, match="hidden_act 'relu2'"):
        ModelConfig.from_dict(d)


def test_opt_with_untied_lm_head_matches_transformers(tmp_path):
    """OPT was always read as tied: a stored lm_head.weight of its own was ignored silently."""
    model = hf_checkpoint(tmp_path, "opt", tie_word_embeddings=False, word_embed_proj_dim=16)
    assert max_logit_error(tmp_path, model) < TOL


_LLAMA_DICT = dict(_TINY["llama"], num_key_value_heads=2)


@pytest.mark.parametrize("model_type,extra,window", [
    ("mistral", {}, 4096),                                   # no key: MistralConfig's default window
    ("mistral", {"sliding_window": None}, None),             # Mistral v0.2+: full attention
    ("mistral", {"sliding_window": 32}, 32),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}, 4096),     # no key: Qwen2Config's default
    # Qwen2 slides only the layers from max_window_layers (default 28) on: this one-layer model none
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "layer_types": ["full_attention"]}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "layer_types": ["sliding_attention"]}, 32),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 32, "layer_types": ["sliding_attention"]}, None),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 32}, None),
    ("llama", {"sliding_window": 32}, None),                 # not a Llama field
])
def test_sliding_window_defaults_as_transformers(model_type, extra, window):
    """A Mistral config without a sliding_window key has transformers' default 4096-token
    window; read as None, the engine served beyond it with full attention."""
    from fastserve_jax.models.config import ModelConfig

    assert ModelConfig.from_dict({"model_type": model_type, **_LLAMA_DICT, **extra}).sliding_window == window


@pytest.mark.parametrize("model_type,config_kw", [
    ("llama", dict(attention_bias=True, mlp_bias=True)),    # Llama's attention_bias covers o_proj too
    ("qwen2", dict(attention_bias=False)),                  # not a Qwen2 field: q/k/v always have biases
    ("mistral", dict(attention_bias=True)),                 # nor a Mistral one: no biases
])
def test_projection_biases_match_transformers(tmp_path, model_type, config_kw):
    model = hf_checkpoint(tmp_path, model_type, **config_kw)
    assert max_logit_error(tmp_path, model) < TOL


_OPT_DICT = dict(_TINY["opt"])


@pytest.mark.parametrize("model_type,extra,match", [
    ("llama", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config.*'gptq'"),
    ("qwen2", {"quantization_config": {"quant_method": "awq"}}, "quantization_config.*'awq'"),
    ("opt", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
     "quantization_config.*'bitsandbytes'"),
    ("opt", {"enable_bias": False}, "enable_bias"),
    ("opt", {"layer_norm_elementwise_affine": False}, "layer_norm_elementwise_affine"),
    ("opt", {"_remove_final_layer_norm": True}, "_remove_final_layer_norm"),
    # architectures naming no causal LM this engine runs; widths that are no positive integers
    # (served as a Llama, or failed as the engine started with a ZeroDivisionError or a
    # TypeError naming no field, until 2026-12-07)
    ("llama", {"architectures": ["LlamaForSequenceClassification"]}, "architectures .*names no model"),
    ("llama", {"architectures": ["GPT2LMHeadModel"]}, "architectures .*names no model"),
    ("llama", {"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ("llama", {"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ("llama", {"num_attention_heads": 4.0}, "num_attention_heads must be a positive integer, got 4.0"),
    ("qwen2", {"vocab_size": -1}, "vocab_size must be a positive integer"),
    ("opt", {"ffn_dim": True}, "ffn_dim must be a positive integer"),
])
def test_unsupported_fields_are_refused_by_name(model_type, extra, match):
    """Quantized weights and OPT's bias-free or scale-free variants were refused only as a list
    of missing or unexpected tensors (or, for quantized ones, of integer dtypes)."""
    from fastserve_jax.models.config import ModelConfig

    base = _OPT_DICT if model_type == "opt" else _LLAMA_DICT
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({"model_type": model_type, **base, **extra})


def test_config_errors_name_the_file_and_accepted_architectures_load(tmp_path):
    from fastserve_jax.models.config import ModelConfig

    for arch in (["LlamaForCausalLM"], ["LLaMAForCausalLM"], ["MistralForCausalLM"], [], None,
                 ["LlamaForSequenceClassification", "LlamaForCausalLM"]):
        assert ModelConfig.from_dict({"model_type": "llama", **_LLAMA_DICT, "architectures": arch}).arch == "llama"
    assert ModelConfig.from_dict({"model_type": "llama", **_LLAMA_DICT, "head_dim": None}).head_dim == 8
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **_LLAMA_DICT, "vocab_size": None}))
    with pytest.raises(ValueError, match=rf"^'{tmp_path}/config.json': vocab_size must be a positive integer, got None"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_opt_post_ln_ignores_remove_final_layer_norm():
    from fastserve_jax.models.config import ModelConfig

    d = {"model_type": "opt", **_OPT_DICT, "do_layer_norm_before": False, "_remove_final_layer_norm": True}
    assert not ModelConfig.from_dict(d).do_layer_norm_before   # no final norm either way (opt-350m)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    """rope_type linear (Llama-2 long-context fine-tunes) was refused; it divides the positions.
    Its context is max_position_embeddings times the factor, as vLLM derives it (a vicuna-16k
    was held to its 4,096 until 2026-12-07); exact there too."""
    from fastserve_jax.models.config import ModelConfig

    model = hf_checkpoint(tmp_path, "llama", rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 10000.0})
    assert ModelConfig.from_pretrained(str(tmp_path)).max_positions == 4 * 64
    assert max_logit_error(tmp_path, model, n_tokens=250) < TOL


def test_the_default_context_cap_is_said(tmp_path, caplog):
    """max_model_len left out serves at most 2048 positions, where vLLM serves the model's
    whole context: said in the log (it was only in --help)."""
    from fastserve_jax.llm import engine_config

    hf_checkpoint(tmp_path, "llama", max_position_embeddings=1024,
                  rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    with caplog.at_level("WARNING"):
        assert engine_config(str(tmp_path))[2].max_model_len == 2048
    assert "serving 2048 of the model's 4096 positions" in caplog.text
    caplog.clear()
    assert engine_config(str(tmp_path), max_model_len=4096)[2].max_model_len == 4096 and not caplog.text


def test_rope_parameters_as_transformers_reads_them():
    """rope_parameters' own rope_theta wins over a top-level one (transformers' order), and a
    llama3 scaling without original_max_position_embeddings takes max_position_embeddings."""
    from fastserve_jax.models.config import ModelConfig

    d = {"model_type": "llama", **_LLAMA_DICT, "rope_theta": 10000.0,
         "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    assert ModelConfig.from_dict(d).rope_theta == 500000.0
    d = {"model_type": "llama", **_LLAMA_DICT, "rope_theta": 500000.0,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    cfg = ModelConfig.from_dict(d)
    assert (cfg.rope_theta, cfg.rope_scaling.original_max_position_embeddings) == (500000.0, 64)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'.*supported: default, linear, llama3"):
        ModelConfig.from_dict({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    # a top-level original_max_position_embeddings wins over the dict's, as transformers moves it
    # there (it was ignored: positions off by up to 0.79 in prompt logprobs over 200 tokens)
    both = {**d, "original_max_position_embeddings": 256,
            "rope_scaling": {**d["rope_scaling"], "original_max_position_embeddings": 32}}
    assert ModelConfig.from_dict(both).rope_scaling.original_max_position_embeddings == 256
    assert ModelConfig.from_dict({**both, "original_max_position_embeddings": None}).rope_scaling \
        .original_max_position_embeddings == 32
    # rotary on part of each head was served as a full-width rotary
    for extra in ({"partial_rotary_factor": 0.5}, {"rope_scaling": {**d["rope_scaling"], "partial_rotary_factor": 0.5}}):
        with pytest.raises(ValueError, match=r"partial_rotary_factor=0.5 \(rotary embedding on part of each head\)"):
            ModelConfig.from_dict({**d, **extra})
    assert ModelConfig.from_dict({**d, "partial_rotary_factor": 1.0}).rope_theta == 500000.0


def test_a_list_of_bos_token_ids_loads():
    """config.json's bos_token_id as a list (as eos_token_id may be) was kept as a list in the
    frozen ModelConfig, whose hash (param_shapes' cache key) then raised TypeError: the engine
    could not start."""
    from fastserve_jax.models import param_shapes
    from fastserve_jax.models.config import ModelConfig

    cfg = ModelConfig.from_dict({**_TINY["llama"], "model_type": "llama", "bos_token_id": [1, 5],
                                 "eos_token_id": [2, 7]})
    assert param_shapes(cfg)                  # TypeError: unhashable type: 'list'
    assert (cfg.bos_token_id, cfg.eos_token_id) == ((1, 5), (2, 7))
    assert ModelConfig.from_dict({**_TINY["llama"], "model_type": "llama", "bos_token_id": 1}).bos_token_id == (1,)
