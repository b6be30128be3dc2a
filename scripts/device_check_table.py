"""Part of scripts/device_check.py: the table it prints from its results."""

from __future__ import annotations

from device_check_engine import agreement
from device_check_parity import BF16_LOGPROB, BF16_TIE


def print_table(res: dict) -> None:
    r = res["rates"]
    print(f"\n{res['device']}  model {res['model']} ({res['dtype']})  HBM {r['bandwidth_gbs']:.0f} GB/s, "
          f"peak {r['peak_tflops']:.1f} TFLOP/s (matmul {r['square']}^3), the best of: "
          + ", ".join(f"{k} {v:.4g}" for k, v in r.items()
                    if k.endswith(("_gbs", "_tflops")) and k not in ("bandwidth_gbs", "peak_tflops")))
    par = res.get("parity") or {}
    for b, v in par.items():
        if isinstance(v, dict) and "worst_tie" in v:
            print(f"bf16 parity with transformers, {b}: worst tie {v['worst_tie']:.3f} nats, worst logprob gap "
                  f"{v['worst_logprob']:.3f} (limits {BF16_TIE} / {BF16_LOGPROB}): {'ok' if v['ok'] else 'FAILED'}; "
                  f"to fp32 transformers {v['vs_fp32']:.3f} nats, its own bf16 {v['hf_bf16_vs_fp32']:.3f}")
    for what, part in [("parity", par), *((f"parity on {b}", v) for b, v in par.items() if isinstance(v, dict)),
                       ("transformers", res["hf"]), ("kernel sweep", res.get("kernel") or {}),
                       *((f"backend {b}", v) for b, v in res["ours"].items())]:
        if "error" in part:
            print(f"{what}: {part['error']}")
    backends = [b for b, v in res["ours"].items() if "decode" in v]
    head = f"{'batch x ctx':>12} " + " ".join(f"{b + ' ms':>13} {b + ' tok/s':>13} {'roof':>5}" for b in backends)
    print(head + f" {'hf tok/s':>10} {'ours/hf':>8}")
    for key in res["ours"][backends[0]]["decode"] if backends else ():
        row = f"{key:>12} "
        for b in backends:
            cell = res["ours"][b]["decode"].get(key)
            row += (f"{cell['step_ms']:13.2f} {cell['tokens_per_s']:13.0f} {cell['roofline_fraction']:5.0%} "
                    if isinstance(cell, dict) else f"{str(cell):>33} ")
        hf = res["hf"].get(key)
        best = max((res["ours"][b]["decode"][key]["tokens_per_s"] for b in backends
                    if isinstance(res["ours"][b]["decode"].get(key), dict)), default=None)
        if isinstance(hf, dict) and best:
            row += f"{hf['tokens_per_s']:10.0f} {best / hf['tokens_per_s']:8.2f}x"
        print(row)
    for b in backends:
        pf = res["ours"][b].get("prefill")
        if pf:
            print(f"prefill {pf['tokens']} tokens ({b}): {pf['ms']:.1f} ms, {pf['tflops']:.1f} TFLOP/s = "
                  f"{pf['peak_fraction']:.0%} of peak; compile {res['ours'][b]['compile_s']:.0f} s")
    engine = {b: v for b, v in res.get("engine", {}).items() if "error" not in v}
    for b, v in res.get("engine", {}).items():
        if "error" in v:
            print(f"engine on {b}: {v['error']}")
    if engine:
        print("whole engine loop (scheduling, sampling, detokenizing), timed as transformers generate is "
              "(host: schedule/assemble/postprocess ms per iteration; the device phase's dispatch and collect):")
        for key in dict.fromkeys(k for v in engine.values() for k in v):
            cells, hf = {b: v.get(key) for b, v in engine.items()}, res["hf"].get(key)
            row = " | ".join(f"{b} {c['tokens_per_s']:.0f} tok/s ({c['step_ms']:.2f} ms; host " + "/".join(
                f"{v:.2f}" for k, v in c["phase_ms_per_iteration"].items() if k != "device") + " ms, dispatch/collect "
                + "/".join(f"{v:.2f}" for v in c.get("device_phase_split_ms", {}).values()) + " ms)" + (
                f" = {c['tokens_per_s'] / hf['tokens_per_s']:.2f}x hf" if isinstance(hf, dict) else "")
                if isinstance(c, dict) else f"{b} {c}" for b, c in cells.items() if c is not None)
            print(f"{key:>12} {row}")
            ran = [(b, c["tokens"]) for b, c in cells.items() if isinstance(c, dict) and "tokens" in c]
            for b, toks in ran[1:]:
                print(f"{'':>12} {b} against {ran[0][0]}: {agreement(ran[0][1], toks)}")
    if res.get("kernel") and "cells" in res["kernel"]:
        cells = res["kernel"]["cells"]
        keys = list(next(iter(cells.values())))
        print("decode attention alone, one layer (ms, fraction of HBM bandwidth for its KV); Triton tunings "
              "b<blocks per step>p<programs>w<warps>s<stages>:")
        print(f"{'':>10} " + " ".join(f"{k:>16}" for k in keys))
        for name, row in cells.items():
            print(f"{name:>10} " + " ".join(f"{v['ms']:9.3f} {v['bandwidth_fraction']:5.0%} " if isinstance(v, dict)
                                            else f"{str(v):>16}" for v in row.values()))
        errs = {n: max(v["rel_err"] for v in row.values() if isinstance(v, dict) and "rel_err" in v)
                for n, row in cells.items() if n != "reference" and any("rel_err" in v for v in row.values()
                                                                         if isinstance(v, dict))}
        print("largest relative error against the reference gather (bf16 inputs; above 2e-2 is a defect): "
              + ", ".join(f"{n} {e:.1e}" + (" WRONG" if e > 2e-2 else "") for n, e in errs.items()))
        ran = res["ours"].get("pallas", {}).get("tuning")
        print(f"fastest: {res['kernel']['best']}; the engine's Pallas path ran with {ran or 'nothing (see above)'}")
    print(f"total {res['seconds']:.0f} s; parts ended at "
          + ", ".join(f"{k} {v:.0f} s" for k, v in res["timeline"].items()))
