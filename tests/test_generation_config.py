"""A model directory's generation_config.json: the sampling defaults it recommends apply where
a request or a generate call leaves them out (vLLM's generation_config="auto"), and
generation_config="vllm" ignores them (models/generation_config.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fastserve_jax.models.generation_config import SAMPLING_KEYS, sampling_defaults
from fastserve_jax.serve.protocol import MODEL_DEFAULTED, parse_chat, parse_completion

LLAMA3 = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128009], "temperature": 0.6,
          "top_p": 0.9}
QWEN2 = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
         "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


def _write(path, d) -> str:
    (path / "generation_config.json").write_text(json.dumps(d))
    return str(path)


def test_sampling_defaults_read_from_generation_config(tmp_path):
    assert sampling_defaults(str(tmp_path)) == {}                      # no file
    assert sampling_defaults(_write(tmp_path, LLAMA3)) == {"temperature": 0.6, "top_p": 0.9}
    assert sampling_defaults(str(tmp_path), "vllm") == {}
    assert sampling_defaults(_write(tmp_path, QWEN2)) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                           "repetition_penalty": 1.05}       # applied, as vLLM does
    assert sampling_defaults(_write(tmp_path, {"min_p": 0.05, "repetition_penalty": 1})) == \
        {"min_p": 0.05, "repetition_penalty": 1}
    assert sampling_defaults(_write(tmp_path, {"eos_token_id": 2, "do_sample": False})) == {}   # the demo model's
    for bad in ({"top_p": 0}, {"temperature": -1}, {"top_k": 2.5}, {"temperature": "0.6"}, {"repetition_penalty": 0},
                {"min_p": 1.5}, {"repetition_penalty": 1e-300}):
        with pytest.raises(ValueError, match=f"generation_config.json' recommends {next(iter(bad))}="):
            sampling_defaults(_write(tmp_path, bad))
    (tmp_path / "generation_config.json").write_text("{temperature: 0.6}")      # the bare JSON error named no file
    with pytest.raises(ValueError, match="generation_config.json' is not valid JSON"):
        sampling_defaults(str(tmp_path))
    (tmp_path / "generation_config.json").write_text("[0.6]")
    with pytest.raises(ValueError, match="holds list, not a JSON object"):
        sampling_defaults(str(tmp_path))
    with pytest.raises(ValueError, match="generation_config must be one of"):
        sampling_defaults(str(tmp_path), "model")


def test_requests_take_the_models_defaults_for_the_fields_they_leave_out():
    assert MODEL_DEFAULTED == SAMPLING_KEYS        # the server's copy (it may not import flax)
    """Requests without temperature/top_p/top_k sampled at 1.0/1.0/off whatever the model
    recommends; vLLM's server fills each left-out field from generation_config.json."""
    from fastserve_jax.config import EngineConfig
    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.tokenizer import load_tokenizer
    from fastserve_jax.serve.engine_loop import EngineInfo
    from fastserve_jax.serve.prepare import prepare

    tok = load_tokenizer(demo_model_path())
    info = EngineInfo(tok, EngineConfig(max_model_len=256), len(tok), 16, 99, False,
                      sampling_defaults={"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                                         "min_p": 0.1})

    def sampled(job):
        [(_, p)], _ = prepare(job, info)
        return p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.min_p

    assert sampled(parse_completion({"prompt": "count from 3 to 12:"})) == (0.7, 0.8, 20, 1.05, 0.1)
    assert sampled(parse_chat({"messages": [{"role": "user", "content": "count from 3 to 5:"}], "top_k": -1,
                               "repetition_penalty": 1.0})) == (0.7, 0.8, -1, 1.0, 0.1)
    assert sampled(parse_completion({"prompt": "count", "temperature": 0, "top_p": 1, "min_p": 0})) == \
        (0.0, 1.0, 20, 1.05, 0.0)
    info.sampling_defaults = {}
    assert sampled(parse_completion({"prompt": "count"})) == (1.0, 1.0, -1, 1.0, 0.0)


def test_llm_default_sampling_params_are_the_models():
    from fastserve_jax import LLM, SamplingParams

    llm = LLM.__new__(LLM)
    llm.engine = SimpleNamespace(sampling_defaults={"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.05})
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.6, top_p=0.9, repetition_penalty=1.05)
    with pytest.raises(ValueError, match="generation_config must be one of"):
        LLM(None, generation_config="model")


# Llama-3-Instruct's chat template, as its documented prompt format has it
LLAMA3_TEMPLATE = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                   "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>", "<|end_header_id|>")


def llama3_instruct_dir(path) -> str:
    """A tiny random Llama with the files of Llama-3-Instruct: a byte-level tokenizer whose
    post-processor adds <|begin_of_text|> (256) and whose EOS is <|eot_id|> (259), the chat
    template, config.json's eos 257 (<|end_of_text|>), generation_config.json's [257, 259]
    with temperature 0.6 and top_p 0.9."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from fastserve_jax.models.random_checkpoint import make_random_checkpoint, save_byte_tokenizer

    make_random_checkpoint(str(path), "llama", vocab_size=320, bos_token_id=256, eos_token_id=257)
    save_byte_tokenizer(str(path), 256, None)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.add_tokens(list(LLAMA3_SPECIALS), special_tokens=True)         # ids 256-260 in this order
    tok.add_special_tokens({"bos_token": LLAMA3_SPECIALS[0], "eos_token": "<|eot_id|>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 256)])
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(str(path))
    _write(path, LLAMA3 | {"bos_token_id": 256, "eos_token_id": [257, 259]})
    return str(path)


@pytest.mark.slow
def test_a_llama3_instruct_directory_end_to_end(tmp_path):
    """LLM(path) over a Llama-3-Instruct layout: the model's sampling defaults, a stop on
    either EOS of the list, and a chat prompt with <|begin_of_text|> once."""
    from fastserve_jax import LLM, SamplingParams
    from fastserve_jax.serve.prepare import render_chat
    from tiny_engine import ENGINE_KW

    llm = LLM(llama3_instruct_dir(tmp_path), **ENGINE_KW)
    tok = llm.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in (256, 257, 259)] == ["<|begin_of_text|>", "<|end_of_text|>",
                                                                      "<|eot_id|>"]
    assert llm.engine.eos_ids == {257, 259}
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.6, top_p=0.9)
    ids = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids[:2] == [256, 258] and ids.count(256) == 1
    assert tok.encode("Hi")[:1] == [256]
    outs = llm.generate([ids, ids], [SamplingParams(max_tokens=8, logit_bias={e: 100}) for e in (257, 259)])
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs] == [([257], "stop"), ([259], "stop")]
    assert llm.generate(ids)[0].outputs[0].finish_reason in ("length", "stop")   # the defaults sample
