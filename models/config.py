"""Architecture description read from a Hugging Face `config.json`.

One frozen dataclass covers the Llama family (Llama 2/3, Mistral, Qwen2) and OPT; the
`arch` field picks the module (`build_model` in models/__init__.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# MLP activations (transformers' ACT2FN names: `hidden_act`, OPT's `activation_function`) that
# models/linear.py computes as transformers does; "gelu" is the exact (erf) GELU there.
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu")


# transformers' default window where a Mistral config (or a Qwen2 one with use_sliding_window)
# has no `sliding_window` key; an explicit null means full attention.
_DEFAULT_SLIDING_WINDOW = 4096


def _sliding_window(model_type: str, d: dict) -> int | None:
    """The window of the model's sliding layers, None where every layer attends to all of the
    context. Qwen2 slides only the layers from max_window_layers on (transformers' default
    layer_types; written out by newer configs): with all of them below it, none slides."""
    if model_type == "mistral":
        return d.get("sliding_window", _DEFAULT_SLIDING_WINDOW)
    if model_type == "qwen2" and d.get("use_sliding_window"):
        n = d["num_hidden_layers"]
        first = d.get("max_window_layers", 28)       # the first sliding layer
        types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        return d.get("sliding_window", _DEFAULT_SLIDING_WINDOW) if "sliding_attention" in types else None
    return None


# config.json's `architectures` that name a model this engine runs (vLLM picks the class by
# them): the causal LMs of LLAMA_FAMILY and OPT, and old LLaMA checkpoints' spelling.
ARCHITECTURES = frozenset({*LLAMA_FAMILY.values(), "LLaMAForCausalLM", "OPTForCausalLM"})


# Sizes a config may give as null (read as left out: derived, as transformers derives them).
_NULLABLE = ("num_key_value_heads", "head_dim", "word_embed_proj_dim")


def _check_fields(d: dict, ints: tuple[str, ...]) -> None:
    """A ValueError naming the first of `ints` that config.json gives as other than a positive
    integer (null only where _NULLABLE; a missing one is the caller's KeyError), and
    `architectures` naming none this engine runs (a classifier's or reward model's checkpoint
    served as a causal LM until 2026-12-07, and a zero, null or string width failed later with
    a traceback naming no field)."""
    for k in ints:
        v = d.get(k)
        if k in d and not (v is None and k in _NULLABLE) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{k} must be a positive integer, got {v!r:.40}")
    arch = d.get("architectures")
    if isinstance(arch, list) and arch and not ARCHITECTURES.intersection(a for a in arch if isinstance(a, str)):
        raise ValueError(f"architectures {arch!r:.120} names no model this engine runs ({', '.join(sorted(ARCHITECTURES))}:"
                         " causal language models; a classification or reward head cannot generate)")


def _ids(v) -> tuple[int, ...]:
    """A token-id field of config.json (one id, a list of them, or null) as a tuple: a list
    kept as a list would make the frozen ModelConfig unhashable."""
    return tuple(v) if isinstance(v, list) else (() if v is None else (v,))


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling: `rope_type` llama3 (Llama-3's wavelength-dependent scaling) or
    linear (every frequency divided by factor, i.e. positions divided by it; the llama3 fields unused)."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


def _rope(d: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) of a Llama-family config, read as transformers reads them: the
    legacy `rope_scaling` dict wins over `rope_parameters`, a theta inside it over a top-level
    one, and a top-level original_max_position_embeddings over the dict's (Phi-3's way)."""
    rs = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in rs.values()):
        raise ValueError(f"rope parameters per layer type ({', '.join(rs)}) are not supported; give one "
                         "rope_parameters dict for every layer")
    theta = float(rs.get("rope_theta") or d.get("rope_theta") or 10000.0)
    partial = rs.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:     # was read as 1: a full-width rotary, silently
        raise ValueError(f"partial_rotary_factor={partial} (rotary embedding on part of each head) is not supported")
    kind = rs.get("rope_type", rs.get("type")) or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(float(rs["factor"]), rope_type="linear")
    if kind == "llama3":
        return theta, RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                                  int(d.get("original_max_position_embeddings")     # a top-level one wins
                                      or rs.get("original_max_position_embeddings")      # (transformers' order)
                                      or d.get("max_position_embeddings", 2048)))
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                      # "llama" (Llama/Mistral/Qwen2) or "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int         # MLP width (OPT: ffn_dim)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False   # q/k/v bias (Qwen2, Llama's attention_bias); OPT always has biases
    o_proj_bias: bool = False      # Llama's attention_bias (not Qwen2's o_proj)
    mlp_bias: bool = False         # Llama's mlp_bias: gate/up/down biases
    tie_word_embeddings: bool = False
    # OPT only
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0   # 0: equal to hidden_size
    activation: str = "silu"       # the MLP's (ACTIVATIONS): Llama's hidden_act, OPT's activation_function
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: tuple[int, ...] = ()  # config.json's, one id or a list as eos_token_id (the tokenizer adds BOS)
    sliding_window: int | None = None  # Mistral/Qwen2 local attention; not implemented (see engine)

    @property
    def max_positions(self) -> int:
        """The longest context the model serves: max_position_embeddings, times the factor of
        linear rope scaling (positions divided by it, as vLLM derives it: a vicuna-16k's 4096
        x 4); llama3's scaling keeps it (until 2026-12-07 linear's was refused past it)."""
        s = self.rope_scaling
        linear = s is not None and s.rope_type == "linear"
        return int(self.max_position_embeddings * s.factor) if linear else self.max_position_embeddings

    def check_context(self, max_model_len: int) -> None:
        """A ValueError where max_model_len is past the positions the model serves."""
        if max_model_len > self.max_positions:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's {self.max_positions} positions "
                             "(max_position_embeddings, times a linear rope scaling's factor); lower max_model_len")

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.activation not in ACTIVATIONS:
            field = "activation_function" if self.arch == "opt" else "hidden_act"
            raise ValueError(f"unsupported {field} {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token in float32 (K and V, all layers)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        mt = d.get("model_type", "")
        quant = d.get("quantization_config") or d.get("compression_config")
        if quant:
            method = quant.get("quant_method") if isinstance(quant, dict) else None
            raise ValueError(f"quantized checkpoints are not supported (quantization_config, quant_method {method!r}); "
                             "use the unquantized (float32, float16 or bfloat16) weights")
        eos_t, bos_t = _ids(d.get("eos_token_id")), _ids(d.get("bos_token_id"))
        _check_fields(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "max_position_embeddings", "intermediate_size" if mt in LLAMA_FAMILY else "ffn_dim",
                          *_NULLABLE))
        if mt in LLAMA_FAMILY:
            heads = d["num_attention_heads"]
            theta, scaling = _rope(d)
            return cls(
                arch="llama", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                # transformers: Qwen2 always has q/k/v biases, Mistral never has any (neither reads
                # attention_bias or mlp_bias); Llama's attention_bias adds o_proj's as well
                attention_bias=mt == "qwen2" or (mt == "llama" and bool(d.get("attention_bias"))),
                o_proj_bias=mt == "llama" and bool(d.get("attention_bias")),
                mlp_bias=mt == "llama" and bool(d.get("mlp_bias")),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                activation=d.get("hidden_act", "silu"), eos_token_id=eos_t, bos_token_id=bos_t,
                sliding_window=_sliding_window(mt, d))
        if mt == "opt":
            heads = d["num_attention_heads"]
            # transformers' OPT variants without biases, without norm scales, or (pre-LN) without
            # the final norm: none of the released checkpoints, and not implemented here
            pre_ln = d.get("do_layer_norm_before", True)
            for key, bad in (("enable_bias", False), ("layer_norm_elementwise_affine", False),
                             ("_remove_final_layer_norm", True if pre_ln else None)):
                if key in d and d[key] == bad:
                    raise ValueError(f"OPT config {key}={d[key]!r} is not supported (only {not bad})")
            return cls(
                arch="opt", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["ffn_dim"], num_layers=d["num_hidden_layers"], num_heads=heads,
                num_kv_heads=heads, head_dim=d["hidden_size"] // heads,
                max_position_embeddings=d.get("max_position_embeddings", 2048), norm_eps=1e-5,
                attention_bias=True, tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                do_layer_norm_before=d.get("do_layer_norm_before", True),
                word_embed_proj_dim=d.get("word_embed_proj_dim") or d["hidden_size"],
                activation=d.get("activation_function", "relu"), eos_token_id=eos_t,
                bos_token_id=bos_t)
        raise ValueError(f"unsupported model_type {mt!r}; supported: {sorted(LLAMA_FAMILY) + ['opt']}")

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ValueError(f"{path!r} is not a model directory: no config.json in it")
        try:
            with open(cfg_file) as f:
                d = json.load(f)
        except ValueError as e:
            raise ValueError(f"{cfg_file!r} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{cfg_file!r} holds a JSON {type(d).__name__}, not an object")
        try:
            return cls.from_dict(d)
        except KeyError as e:
            raise ValueError(f"{cfg_file!r} lacks {e.args[0]!r}, which a {d.get('model_type')!r} config "
                             "needs") from None
        except ValueError as e:                       # named: the model directory may not be the one meant
            raise ValueError(f"{cfg_file!r}: {e}") from None
