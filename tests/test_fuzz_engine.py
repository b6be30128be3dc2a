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


@pytest.mark.slow
def test_fuzz_seeds_pass():
    for seed in range(12):
        assert " ok: " in fuzz_engine.run_seed(seed)
