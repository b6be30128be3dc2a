"""scripts/fuzz_engine.py: its tie rule, and a few seeds of it (slow; the script runs hundreds)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import fuzz_engine  # noqa: E402


def _ref(tokens, tops):
    return SimpleNamespace(token_ids=tokens, logprobs=[SimpleNamespace(top=t) for t in tops])


def test_a_difference_passes_only_at_a_near_tie_of_the_reference():
    tops = [{5: -0.1, 6: -3.0}, {7: -3.8386343, 8: -3.8386347}, {9: -0.5, 4: -1.0}]
    ref = _ref([5, 7, 9], tops)
    assert fuzz_engine.mismatch([5, 7, 9], ref) is None
    assert fuzz_engine.mismatch([5, 8, 1], ref) is None              # a 4e-7 tie: the rest is not compared
    assert "token 0" in fuzz_engine.mismatch([6, 7, 9], ref)         # 2.9 apart: a real difference
    assert "token 2" in fuzz_engine.mismatch([5, 7, 4], ref)         # 0.5 apart
    assert "token 1" in fuzz_engine.mismatch([5, 3, 9], ref)         # not among the reference's top two
    assert "2 tokens against 3" in fuzz_engine.mismatch([5, 7], ref)


def test_prompt_logprobs_pass_within_the_tolerance_only():
    lp = lambda tok, v: SimpleNamespace(token_id=tok, logprob=v, top={1: -0.1, 2: -0.2})
    ref = SimpleNamespace(prompt_logprobs=[None, lp(7, -1.0), lp(9, -2.0)])
    assert fuzz_engine.prompt_mismatch([None, lp(7, -1.0004), lp(9, -2.0)], ref) is None
    assert "prompt logprob 2" in fuzz_engine.prompt_mismatch([None, lp(7, -1.0), lp(9, -2.01)], ref)
    assert "prompt logprob 1" in fuzz_engine.prompt_mismatch([None, lp(8, -1.0), lp(9, -2.0)], ref)
    assert "2 prompt logprobs against 3" in fuzz_engine.prompt_mismatch([None, lp(7, -1.0)], ref)


def test_templated_seeds_draw_a_learning_policy_and_enough_requests_to_learn_from():
    """The learned-mode seeds: a learning policy, lowered thresholds, more requests than the
    prompt-length gate needs finished, each fitting the pool; the other seeds draw as before."""
    from fastserve_jax.scheduler.prompt_lengths import MIN_ROWS

    drawn = [fuzz_engine.draw(seed) for seed in range(40)]
    learned = [(cfg, prompts, maxes) for cfg, prompts, maxes, _ in drawn if "scheduler_config" in cfg]
    assert 5 <= len(learned) <= 25
    for cfg, prompts, maxes in learned:
        assert cfg["scheduler"] in fuzz_engine.LEARNED_POLICIES
        assert cfg["scheduler_config"].gittins_min_samples <= 12 and len(prompts) > MIN_ROWS
        assert all(-(-(len(p) + m) // 8) <= cfg["num_device_blocks"] - 1 or len(p) + m <= 2
                   for p, m in zip(prompts, maxes))
    for cfg, prompts, maxes, _ in drawn:
        if "scheduler_config" not in cfg:
            assert cfg["scheduler"] != "predictive" and len(prompts) <= 9 * 3      # n <= 3


def test_caching_seeds_draw_shared_stems_and_copies_that_fit():
    """A share of the seeds serve with prefix caching: prompts behind two stems and copies of
    earlier ones (the second of two copies one token past a block boundary is the case that
    answered wrong until 444982a), each fitting the pool."""
    drawn = [fuzz_engine.draw(seed) for seed in range(40)]
    caching = [(cfg, prompts, maxes) for cfg, prompts, maxes, _ in drawn if cfg.get("enable_prefix_caching")]
    assert 8 <= len(caching) <= 25
    copies = boundary = 0
    for cfg, prompts, maxes in caching:
        assert all(-(-(len(p) + m) // 8) <= cfg["num_device_blocks"] - 1 or len(p) + m <= 2
                   for p, m in zip(prompts, maxes))
        copies += len(prompts) - len({tuple(p) for p in prompts})
        boundary += sum(len(p) > 1 and (len(p) - 1) % 8 == 0 for p in prompts)
    assert copies >= 10 and boundary >= 5


def test_a_seeded_sample_passes_only_where_its_noisy_scores_tie():
    """Where a seeded sample's token differs from the reference's, the two tokens' scores
    logprob / temperature + the step's Gumbel noise must be within 2 TIE / temperature: this
    run's token's logprob is this run's, the reference's the reference's."""
    t, seed, vocab = 0.7, 12345, 256
    g = fuzz_engine.gumbel(seed, 1, vocab)
    lp = lambda tok, v: SimpleNamespace(token_id=tok, logprob=v, top={})
    ref = SimpleNamespace(token_ids=[5, 7, 9], logprobs=[lp(5, -1.0), lp(7, -2.0), lp(9, -1.5)])
    tie = -2.0 + t * (g[7] - g[8])                       # token 8's noisy score equals token 7's
    assert fuzz_engine.mismatch([5, 8, 1], ref, (t, seed, [lp(5, -1.0), lp(8, tie + 1e-5)], vocab)) is None
    assert "token 1" in fuzz_engine.mismatch([5, 8, 9], ref, (t, seed, [lp(5, -1.0), lp(8, tie + 0.05)], vocab))
    assert "token 1" in fuzz_engine.mismatch([5, 8, 9], ref, (t, seed + 1, [lp(5, -1.0), lp(8, tie)], vocab))
    assert fuzz_engine.mismatch([5, 7, 9], ref, (t, seed, [], vocab)) is None


def test_sampling_seeds_draw_seeded_samples_and_n_copies_added_together():
    """A share of the seeds serve seeded samples (temperature 0.7-1.3) and requests with n 2-3:
    n copies of the prompt in a row, seeds seed, seed + 1, ...; the other seeds stay greedy."""
    drawn = [fuzz_engine.draw(seed) for seed in range(60)]
    sampling = [d for d in drawn if any(t for t, _ in d[3])]
    assert 10 <= len(sampling) <= 35
    groups = 0
    for cfg, prompts, maxes, params in drawn:
        assert len(params) == len(prompts) == len(maxes)
        assert all((t == 0) == (s is None) and (t == 0 or 0.7 <= t <= 1.3) for t, s in params)
        for i in range(1, len(prompts)):
            if params[i][1] is not None and params[i][1] == (params[i - 1][1] or 0) + 1:
                assert prompts[i] == prompts[i - 1] and maxes[i] == maxes[i - 1]
                groups += 1
    assert groups >= 5


@pytest.mark.slow
def test_fuzz_seeds_pass():
    lines = [fuzz_engine.run_seed(seed) for seed in range(13)]     # 2, 5, 11 and 12 serve templated requests
    assert all(" ok: " in line for line in lines)
    assert any(" preempted)" in line and "(0 preempted)" not in line for line in lines), lines
    assert any("(learned" in line for line in lines)
    assert any("caching: " in line and "caching: 0 tokens" not in line for line in lines)
    assert any("sampled" in line for line in lines)


def test_parallel_seeds_draw_every_layout_and_a_model_that_splits_that_way():
    """scripts/fuzz_parallel.py: tp and pp in {1, 2} (never both 1: fuzz_engine's seeds), each
    model's head counts, layers and MLP width divisible as the layout needs, pp's batches in flight."""
    import fuzz_parallel
    from fastserve_jax.models.random_checkpoint import PRESETS
    from fastserve_jax.sharding.parallel_config import ParallelConfig

    drawn = [fuzz_parallel.draw_layout(seed) for seed in range(60)]
    assert {(o["tensor_parallel_size"], o["pipeline_parallel_size"]) for _, o in drawn} == {(1, 2), (2, 1), (2, 2)}
    assert {name for name, _ in drawn} == set(fuzz_parallel.MODELS)
    assert {o.get("batches_in_flight") for _, o in drawn if o["pipeline_parallel_size"] > 1} == {0, 1, 3}
    for name, o in drawn:
        arch, overrides = fuzz_parallel.MODELS[name]
        c = {**PRESETS[arch][1], **overrides}
        ParallelConfig(o["tensor_parallel_size"], o["pipeline_parallel_size"]).check_model(
            c["num_hidden_layers"], c["num_attention_heads"], c.get("intermediate_size", c.get("ffn_dim")))
        assert c["vocab_size"] > 250                     # the prompts' token ids


@pytest.mark.slow
def test_parallel_fuzz_seeds_pass():
    import fuzz_parallel

    lines = [fuzz_parallel.run_seed(seed) for seed in range(4)]
    assert all(" ok: " in line for line in lines)


def test_the_recomputed_noise_is_the_samplers():
    """fuzz_engine.gumbel(seed, step, vocab) is the noise the device sampler adds to a seeded
    row's tempered logits: its argmax is the sampler's token (the tie rule above relies on it)."""
    import jax.numpy as jnp
    import numpy as np

    from fastserve_jax.sampling import SamplingArrays, _sample_random

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 256)).astype(np.float32)
    temps, seeds, steps = [0.7, 1.0, 1.3, 1.0], [5, 12345, 2**31 + 7, 0], [0, 3, 17, 255]
    s = SamplingArrays(jnp.asarray(temps, jnp.float32), jnp.zeros(4, jnp.int32), jnp.ones(4, jnp.float32),
                       jnp.zeros(4, jnp.float32), jnp.asarray(seeds, jnp.uint32), jnp.asarray(steps, jnp.int32))
    got = np.asarray(_sample_random(jnp.asarray(logits), s))
    want = [int(np.argmax(logits[i] / temps[i] + fuzz_engine.gumbel(seeds[i], steps[i], 256))) for i in range(4)]
    assert got.tolist() == want
    assert want != [int(np.argmax(row)) for row in logits]       # the noise moved at least one row off its argmax
