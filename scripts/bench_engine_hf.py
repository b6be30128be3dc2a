"""The transformers reference of scripts/bench_engine.py: the same random-weight checkpoint in
torch, served by transformers' continuous batching manager, by plain `generate` in static
batches and unbatched (the plainest reference), with torch's best thread count; and its own
forward for one decode step."""

from __future__ import annotations

import os
import statistics
import time

from bench_engine_workload import VOCAB_LO, Workload, agreement


def load_hf(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None   # ignore_eos: always generate the requested length
    return model


def pick_torch_threads(model, choice: str, seed: int) -> dict:
    """torch intra-op threads for the baselines: `choice` is a number, or "auto": time a
    512-token prefill and 4 decode steps at batch 32 with 1 .. cores threads and keep the
    fastest (on a machine shared with busy processes, more threads can be much slower)."""
    import torch

    cores = os.cpu_count() or 1
    if choice != "auto":
        torch.set_num_threads(int(choice))
        return dict(threads=int(choice), probe=None)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(VOCAB_LO, model.config.vocab_size, (1, 512), generator=g)
    probe = {}
    for n in range(1, cores + 1):
        torch.set_num_threads(n)
        with torch.no_grad():
            model(input_ids=prompt[:, :64], logits_to_keep=1)
            t = time.perf_counter()
            model(input_ids=prompt, logits_to_keep=1)
            pre = time.perf_counter() - t
        dec = hf_decode_step(model, 32, 16, steps=4, seed=seed)["step_ms_median"] / 1e3
        probe[n] = dict(prefill_512_s=pre, decode_32_step_s=dec, score_s=pre + 4 * dec)
    best = min(probe, key=lambda n: probe[n]["score_s"])
    torch.set_num_threads(best)
    return dict(threads=best, probe=probe)


def run_hf_continuous(model, wl: Workload, max_batched_tokens: int, max_len: int) -> tuple[dict, list[list[int]]]:
    """transformers continuous batching: the manager `generate_batch` wraps, fed each request
    with its own max_new_tokens (generate_batch itself takes one max_new_tokens for all)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    cb = ContinuousBatchingConfig(max_requests_per_batch=32, max_batch_tokens=max_batched_tokens, page_size=page,
                                  num_blocks=32 * -(-max_len // page) + 8)
    gc = GenerationConfig(do_sample=False, max_new_tokens=max(wl.out_lens), eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gc, continuous_batching_config=cb,
                                                   block=True, timeout=30) as mgr:
        t1 = time.perf_counter()
        ids = [mgr.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
               for i, (p, n) in enumerate(zip(wl.prompts, wl.out_lens))]
        results = {}
        while len(results) < len(ids):
            r = mgr.get_result(timeout=1)
            if r is not None and r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"transformers CB request {r.request_id} failed: {r.error}")
                results[r.request_id] = r
            elif r is None and not mgr.is_running():
                raise RuntimeError("transformers continuous batching loop stopped before all requests finished")
        wall = time.perf_counter() - t1
        attn_impl = getattr(model.config, "_attn_implementation", "?")
    tokens = [list(results[f"r{i}"].generated_tokens) for i in range(len(wl.prompts))]
    n_out = sum(len(t) for t in tokens)
    assert n_out == wl.num_output_tokens, f"transformers CB generated {n_out}, wanted {wl.num_output_tokens}"
    return dict(wall_s=wall, setup_s=t1 - t0, output_tokens=n_out, tokens_per_s=n_out / wall,
                total_tokens_per_s=(n_out + wl.num_prompt_tokens) / wall, attn_implementation=attn_impl,
                config=dict(max_requests_per_batch=32, max_batch_tokens=max_batched_tokens, page_size=page,
                            num_blocks=cb.num_blocks)), tokens


def run_hf_static(model, wl: Workload, batch: int) -> tuple[dict, list[list[int]]]:
    """Plain `generate` in static batches (arrival order), left padded; each batch runs to its
    longest requested output; only requested tokens count as useful."""
    import torch
    from transformers import GenerationConfig

    tokens: list[list[int]] = []
    raw = 0
    t0 = time.perf_counter()
    for s in range(0, len(wl.prompts), batch):
        ps, ns = wl.prompts[s:s + batch], wl.out_lens[s:s + batch]
        width = max(len(p) for p in ps)
        ids = torch.zeros((len(ps), width), dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for i, p in enumerate(ps):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gc = GenerationConfig(do_sample=False, max_new_tokens=max(ns), min_new_tokens=max(ns), eos_token_id=None,
                              pad_token_id=0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        gen = out[:, width:]
        assert gen.shape[1] == max(ns), f"static batch generated {gen.shape[1]} tokens, wanted {max(ns)}"
        raw += gen.numel()
        tokens += [gen[i, :n].tolist() for i, n in enumerate(ns)]
    wall = time.perf_counter() - t0
    n_out = sum(len(t) for t in tokens)
    return dict(wall_s=wall, batch=batch, output_tokens=n_out, raw_generated_tokens=raw,
                tokens_per_s=n_out / wall, raw_tokens_per_s=raw / wall,
                total_tokens_per_s=(n_out + wl.num_prompt_tokens) / wall), tokens


def hf_decode_step(model, batch: int, prompt_len: int, steps: int, seed: int) -> dict:
    """transformers' own forward for one decode step at `batch` (DynamicCache, no padding,
    logits for the last token only): the torch counterpart of our decode launch."""
    import torch
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB_LO, model.config.vocab_size, (batch, prompt_len), generator=g)
    cache = DynamicCache(config=model.config)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t)
    return dict(batch=batch, prompt_len=prompt_len, steps=steps, step_ms_median=1e3 * statistics.median(times),
                step_ms_best=1e3 * min(times))


def run_hf_reference(model, prompt: list[int], n: int) -> list[int]:
    """Unbatched, unpadded greedy generate: the plainest reference."""
    import torch
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), generation_config=gc)
    return out[0, len(prompt):].tolist()


def run_transformers(path: str, wl: Workload, our_tokens: list[list[int]], torch_threads: str, seed: int,
                     max_batched_tokens: int, max_len: int, decode_batch: int,
                     decode_prompt: int) -> tuple[dict, dict, dict]:
    """Steps 4 and 5 of the benchmark: (continuous batching, static batches, checks), where
    checks holds greedy agreement with `our_tokens`, torch's threads and its decode step."""
    import torch

    print("[4/5] transformers continuous batching ...", flush=True)
    model = load_hf(path)
    threads = pick_torch_threads(model, torch_threads, seed)
    print(f"      torch threads: {threads['threads']}" + (
        "" if threads["probe"] is None else " (probe, s: " + ", ".join(
            f"{n}: prefill {v['prefill_512_s']:.2f} + decode {v['decode_32_step_s']:.2f}"
            for n, v in threads["probe"].items()) + ")"), flush=True)
    hf_cb, cb_tokens = run_hf_continuous(model, wl, max_batched_tokens, max_len)
    print(f"      {hf_cb['wall_s']:.1f} s, {hf_cb['tokens_per_s']:.1f} tok/s", flush=True)
    print("[5/5] transformers generate, static batches of 32 ...", flush=True)
    hf_static, st_tokens = run_hf_static(model, wl, 32)
    print(f"      {hf_static['wall_s']:.1f} s, {hf_static['tokens_per_s']:.1f} tok/s", flush=True)
    hf_dec = hf_decode_step(model, decode_batch, decode_prompt, steps=8, seed=seed)
    ref_ids = sorted(range(len(wl.prompts)), key=lambda i: len(wl.prompts[i]))[:2]
    ref = {i: run_hf_reference(model, wl.prompts[i], wl.out_lens[i]) for i in ref_ids}
    checks = dict(reference_requests={str(i): our_tokens[i] == ref[i] for i in ref_ids},
                  vs_hf_continuous=agreement(our_tokens, cb_tokens),
                  vs_hf_static=agreement(our_tokens, st_tokens),
                  hf_continuous_vs_hf_static=agreement(cb_tokens, st_tokens),
                  torch_threads=torch.get_num_threads(), torch_thread_probe=threads["probe"],
                  hf_decode_step=hf_dec)
    del model
    return hf_cb, hf_static, checks
