"""What the tensor/pipeline-parallel test files share (test_parallel.py,
test_parallel_layout.py): the engine settings and random 4-layer checkpoints."""

from __future__ import annotations

import pytest

KW = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, block_size=8, max_prefill_seqs=4,
          decode_batch_buckets=(4,), prefill_token_buckets=(64,), block_buckets=(16, 32), scheduler="mlfq")


@pytest.fixture(scope="module")
def four_layer_checkpoints(tmp_path_factory):
    """arch -> a random 4-layer checkpoint (Llama: 4 query heads over 2 KV heads)."""
    from fastserve_jax.models.random_checkpoint import make_random_checkpoint

    return {arch: make_random_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, num_hidden_layers=4)
            for arch in ("llama", "opt")}
