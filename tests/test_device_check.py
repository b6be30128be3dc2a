"""scripts/device_check.py --smoke: the accelerator check runs as shipped (from the source tree,
PYTHONPATH=., no install), on CPU at a tiny size, and writes its table as JSON under $OUT."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow      # 12-15 s of the default suite's 2 cores; run it before any device run (docs/device_runs)
def test_smoke_run_fills_every_cell(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUT=str(tmp_path))
    run = ("import runpy, sys; sys.argv = ['device_check.py', '--smoke', '--no-parity']; "
           "runpy.run_path('scripts/device_check.py', run_name='__main__'); "
           "assert 'starlette' not in sys.modules, 'the GPU machine has no starlette'")
    proc = subprocess.run([sys.executable, "-c", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "device_check.json").read_text())
    rates = res["rates"]      # the ceilings are the best of what the device showed (torch's join on a GPU)
    assert rates["bandwidth_gbs"] == max(rates["copy_gbs"], rates["sum_gbs"]) > 0
    assert rates["peak_tflops"] == rates["xla_matmul_tflops"] > 0
    assert "the best of: copy_gbs" in proc.stdout and "sum_gbs" in proc.stdout
    assert res["versions"]["jax"] == res["jax"] and res["versions"]["jaxlib"]
    assert res["hf"]["2x24"]["tokens_per_s"] > 0
    for backend in ("reference", "pallas"):
        cell = res["ours"][backend]["decode"]["2x24"]
        assert cell["tokens_per_s"] > 0 and 0 < cell["roofline_fraction"]
        assert cell["kv_bytes"] == 2 * 24 * 2 * 2 * 2 * 16 * 2    # batch x ctx x K,V x layers x kv heads x D x bf16
        assert res["ours"][backend]["prefill"]["peak_fraction"] > 0
    assert "reference ms" in proc.stdout and "pallas tok/s" in proc.stdout
    # when each part ended, and the CPU's own backend first (a GPU's run puts pallas first)
    assert list(res["timeline"])[:2] == ["rates", "transformers"] and list(res["ours"]) == ["reference", "pallas"]
    assert list(res["timeline"].values()) == sorted(res["timeline"].values()) and "parts ended at" in proc.stdout
    # the whole engine's loop, timed as transformers generate is (the smoke run: the first backend
    # only), synchronous and with async scheduling
    assert list(res["engine"]) == ["reference", "reference+async"]
    assert all(res["engine"][b]["2x24"]["tokens_per_s"] > 0 for b in res["engine"])
    phases = res["engine"]["reference"]["2x24"]["phase_ms_per_iteration"]     # where its iterations went
    assert set(phases) == {"schedule", "assemble", "device", "postprocess"} and phases["device"] > 0
    split = res["engine"]["reference"]["2x24"]["device_phase_split_ms"]     # the runner's calls within it
    assert set(split) == {"dispatch", "collect"} and 0 < split["dispatch"] + split["collect"] <= phases["device"] * 1.05
    assert "whole engine loop" in proc.stdout and "x hf" in proc.stdout
    # each cell keeps its rows' greedy tokens, and the run compares the engines' (async is exact)
    assert res["engine"]["reference"]["2x24"]["tokens"] == res["engine"]["reference+async"]["2x24"]["tokens"]
    assert "2/2 rows identical, common prefix 9.0 of 9 tokens" in proc.stdout
    # the Triton kernel's tunings timed alone, and the engine's Pallas path run with the fastest
    kernel = res["kernel"]
    # (round 2: the faster of round 1's two with 8 warps and 3 stages)
    first = min(("b1p128w4s2", "b2p4w4s2"), key=lambda n: kernel["cells"][n]["2x24"]["ms"])
    assert set(kernel["cells"]) == {"reference", "b1p128w4s2", "b2p4w4s2", first[:-4] + "w8s3"}
    assert all(c["2x24"]["ms"] > 0 and c["2x24"]["kv_bytes"] == 2 * 24 * 2 * 2 * 16 * 2 for c in kernel["cells"].values())
    # every tuning's output against the reference gather's, in bf16 (the GPU run's correctness check)
    assert kernel["cells"]["reference"]["2x24"]["rel_err"] == 0
    assert all(0 < c["2x24"]["rel_err"] < 2e-2 for n, c in kernel["cells"].items() if n != "reference")
    assert "largest relative error against the reference gather" in proc.stdout and "WRONG" not in proc.stdout
    assert res["ours"]["pallas"]["tuning"] == kernel["best"] != "reference"


def test_a_failing_part_leaves_the_others_in_the_table_and_the_json(tmp_path, monkeypatch, capsys):
    """One kernel setting that does not compile and one backend that fails end as errors in their
    places; the other setting, the other backend and the JSON (written after every part) stay."""
    import importlib.util

    import fastserve_jax.models.paged_attention as pa

    spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
    dc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dc)          # puts scripts/ on sys.path (its kernel part is a module there)
    monkeypatch.setattr(dc, "SMOKE", dict(dc.SMOKE, warps_stages=()))
    kernel = pa.paged_attention

    def two_blocks_fail(*a, tune, **kw):
        if tune.blocks_per_step == 2:
            raise RuntimeError("triton: out of shared memory")
        return kernel(*a, tune=tune, **kw)

    def backend(b, *a):
        if b == "pallas":
            raise MemoryError("RESOURCE_EXHAUSTED")
        return dict(backend=b, compile_s=0.0, decode={"2x24": dict(step_ms=1.0, tokens_per_s=2000.0,
                                                                   roofline_fraction=0.5)})

    def engine_fails(backend, *a):
        a[-2]["1x24"] = dict(batch=1, context=24, step_ms=2.0, tokens_per_s=500.0)    # a cell saved before
        raise RuntimeError("engine: out of memory")

    monkeypatch.setattr(pa, "paged_attention", two_blocks_fail)
    monkeypatch.setattr(dc, "run_backend", backend)
    monkeypatch.setattr(dc, "engine_decode", engine_fails)
    monkeypatch.delenv(pa.TUNING_ENV, raising=False)
    res = dc.main(["--smoke", "--no-hf", "--no-parity", "--json", str(tmp_path / "out.json")])  # parity: its own test
    cells = res["kernel"]["cells"]
    assert cells["b2p4w4s2"]["2x24"].startswith("error: RuntimeError: triton: out of shared memory")
    assert res["kernel"]["best"] == "b1p128w4s2" and cells["b1p128w4s2"]["2x24"]["ms"] > 0
    assert res["ours"]["pallas"] == {"error": "error: MemoryError: RESOURCE_EXHAUSTED"}
    assert res["ours"]["reference"]["decode"]["2x24"]["tokens_per_s"] == 2000.0
    assert res["engine"]["reference"] == {"1x24": dict(batch=1, context=24, step_ms=2.0, tokens_per_s=500.0),
                                          "error": "error: RuntimeError: engine: out of memory"}
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["ours"] == res["ours"] and saved["engine"] == res["engine"]
    out = capsys.readouterr().out
    assert "backend pallas: error: MemoryError" in out and "2000" in out
    assert "engine on reference: error: RuntimeError: engine: out of memory" in out


def test_torch_rates_measure_copy_and_matmul():
    """The torch half of the ceilings, which the GPU run adds (on the CPU here)."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_engine_machine import torch_rates

    r = torch_rates(8 << 20, 128, "cpu")
    assert set(r) == {"torch_copy_gbs", "torch_matmul_tflops"} and min(r.values()) > 0


@pytest.mark.slow
def test_parity_part_scores_each_backend_against_transformers(monkeypatch):
    """Step 2 (device_check_parity.bf16_parity; the smoke run above leaves it out, 5-30 s): a
    llama3-style checkpoint served in bf16 on each backend, scored by transformers; a backend
    that fails is reported in its place and the other is still scored."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "scripts"))
    import device_check_parity as dp

    res = dp.bf16_parity(["reference", "pallas"], dict(init_std=0.1), "cpu", new_tokens=4)
    for b in ("reference", "pallas"):
        assert res[b]["ok"] and res[b]["worst_logprob"] <= dp.BF16_LOGPROB, res[b]
        assert [len(t) for t in res[b]["tokens"]] == [4] * 4
        # as far from fp32 transformers as transformers' own bf16, within a margin
        assert 0 < res[b]["vs_fp32"] <= 2 * res[b]["hf_bf16_vs_fp32"] + 0.01, res[b]
    import fastserve_jax

    real = fastserve_jax.LLM

    def no_pallas(*a, attention_backend, **kw):
        if attention_backend == "pallas":
            raise RuntimeError("triton: out of resources")
        return real(*a, attention_backend=attention_backend, **kw)

    monkeypatch.setattr(fastserve_jax, "LLM", no_pallas)
    res = dp.bf16_parity(["pallas", "reference"], dict(init_std=0.1), "cpu", new_tokens=2)
    assert res["pallas"] == {"error": "RuntimeError: triton: out of resources"} and res["reference"]["ok"]
