"""scripts/bench_async.py runs as shipped on a small burst: every cell has both modes' figures,
async's tokens equal sync's (the script exits non-zero otherwise), and the tight pool binds."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_async_small_run(tmp_path):
    out = tmp_path / "async.json"
    proc = subprocess.run([sys.executable, "scripts/bench_async.py", "--num-requests", "12", "--rounds", "1",
                           "--max-num-seqs", "4", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert len(cells) == 5 and "async / sync tokens/s" in proc.stdout
    for c in cells:
        assert c["sync"]["tokens_per_s"] > 0 and c["asynchronous"]["tokens_per_s"] > 0
        assert len(c["tokens_per_s_ratios"]) == 1
    tight = [c for c in cells if "tight" in c["name"]]
    assert tight and all(c["swapped_blocks"]["sync"] > 0 and c["swapped_blocks"]["async"] > 0 for c in tight)
