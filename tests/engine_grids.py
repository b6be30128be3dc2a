"""Bucket grids for the tests that warm an engine up in full.

`max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=8` (the tiny
engines of test_engine, test_swap and test_penalties) derive 66 executables; this grid
gives 24 and still has small and large launches of both kinds, which is all the
"nothing compiles after a full warm-up" guarantee needs. The lists must reach the limits
(EngineConfig.resolve): 8 sequences, 64 tokens, 48 blocks (32 per sequence + 8 for the
budget + 8 for the packed sequences).
"""

SMALL_GRID = dict(decode_batch_buckets=(2, 8), prefill_token_buckets=(16, 64), block_buckets=(8, 48))

# The demo model's engines in test_predictor.py and test_prompt_lengths.py (short counting
# prompts and answers, at most ~90 tokens a request): the defaults' grid (2048 tokens a
# sequence, a 512-token budget, 16-token blocks) compiled 52-57 launch and profile shapes for
# them, and these settings share one small grid and its profile between them.
DEMO_KW = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, block_size=8,
               decode_batch_buckets=(2, 8), prefill_token_buckets=(16, 64))

# The demo model's counting tests under swapping (test_swap.py, test_async_scheduling.py: 512
# tokens a sequence, a 64-token budget, 8-token blocks), whose requests stay under ~70 tokens:
# one prefill size and two block counts instead of the derived 2 and 6.
DEMO_SWAP_GRID = dict(prefill_token_buckets=(64,), block_buckets=(16, 80))
