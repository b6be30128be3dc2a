"""The sampling defaults a checkpoint recommends in its generation_config.json, used where a
request leaves a parameter out (vLLM's default, `generation_config="auto"`).

Read: temperature, top_p, top_k, repetition_penalty and min_p, as vLLM reads them
(Qwen2-Instruct's file sets repetition_penalty 1.05). Not read, as in vLLM: do_sample (a file
with temperature 0.6 and no do_sample samples at 0.6, where transformers would decode
greedily) and max_new_tokens (vLLM turns it into a server-wide cap; here max_tokens keeps its
own default). `generation_config="vllm"` (LLM's keyword, serve's --generation-config) ignores
the file: vLLM's neutral defaults (temperature 1, no top-p, no top-k, no repetition penalty,
no min-p)."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p")
CHOICES = ("auto", "vllm")


def check_mode(mode: str) -> None:
    if mode not in CHOICES:
        raise ValueError(f"generation_config must be one of {list(CHOICES)} ('auto': the model's "
                         f"generation_config.json, 'vllm': neutral defaults), got {mode!r}")


def read_file(model_path: str, mode: str = "auto") -> dict:
    """The model directory's generation_config.json as a dict ({} without one). A file that is
    not a JSON object raises ValueError naming it under mode "auto"; under "vllm", which the
    error tells users to pass, it is ignored with a warning (vLLM falls back the same way)."""
    check_mode(mode)
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            d = json.load(f)
        problem = None if isinstance(d, dict) else f"holds {type(d).__name__}, not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:       # named: the bare message named no file
        problem = f"is not valid JSON ({e})"
    if problem is None:
        return d
    if mode == "vllm":
        log.warning("ignoring %s: it %s", path, problem)
        return {}
    raise ValueError(f"{path!r} {problem}; fix the file, or pass generation_config='vllm' (--generation-config "
                     "vllm) to ignore it")


def eos_token_ids(model_path: str, mode: str = "auto") -> list[int] | None:
    """generation_config.json's eos_token_id (one id or a list) as a list, None where the file
    gives none. Ids that are not non-negative integers raise ValueError naming the file under
    mode "auto" (until 2026-12-07 a bare int() error or a traceback); "vllm" ignores them with a
    warning (the tokenizer's and config.json's EOS still end generations)."""
    path = os.path.join(model_path, "generation_config.json")
    ids = read_file(model_path, mode).get("eos_token_id")
    if ids is None:
        return None
    ids = ids if isinstance(ids, list) else [ids]
    if all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return ids
    if mode == "vllm":
        log.warning("ignoring eos_token_id %r in %s: not token ids", ids, path)
        return None
    raise ValueError(f"{path!r} has eos_token_id {ids!r:.120}, which are not token ids (non-negative integers); fix "
                     "the file, or pass generation_config='vllm' (--generation-config vllm) to ignore it")


def sampling_defaults(model_path: str, mode: str = "auto") -> dict:
    """{name: value} of SAMPLING_KEYS that the model directory's generation_config.json sets
    (empty without the file, or with mode "vllm"). Raises ValueError naming the file when a
    value is not a valid sampling parameter."""
    check_mode(mode)
    if mode == "vllm":
        return {}
    path = os.path.join(model_path, "generation_config.json")
    d = read_file(model_path, mode)
    out = {k: d[k] for k in SAMPLING_KEYS if d.get(k) is not None}
    bad = [f"{k}={v!r}" for k, v in out.items() if not _valid(k, v)]
    if bad:
        raise ValueError(f"{path!r} recommends {', '.join(bad)}, which this engine cannot sample with (temperature "
                         "in [0, 1e30], top_p in (0, 1], top_k an integer >= -1, repetition_penalty in [1e-30, 1e30], "
                         "min_p in [0, 1]); fix the file, or pass generation_config='vllm' (--generation-config "
                         "vllm) to ignore it")
    if out:
        log.info("default sampling parameters from %s: %s (generation_config='vllm' ignores them)", path, out)
    return out


def _valid(name: str, v) -> bool:
    """As SamplingParams checks the field (models/ does not import the engine's modules)."""
    if name == "top_k":
        return isinstance(v, int) and not isinstance(v, bool) and v >= -1
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
        return False
    if name == "temperature":
        return 0 <= v <= 1e30
    if name == "repetition_penalty":
        return 1e-30 <= v <= 1e30           # float32's range (SamplingParams.FLOAT32_SAFE)
    return 0 <= v <= 1 if name == "min_p" else 0 < v <= 1
