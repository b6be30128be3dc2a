"""The printed report of scripts/bench_engine.py, from the figures its run collected (the same
dict --json writes)."""

from __future__ import annotations


def line(label: str, value: str) -> None:
    print(f"  {label:<46} {value}")


def print_report(r: dict) -> None:
    print_results(r)
    print_start(r)
    print_roofline(r)
    print_host(r)
    print_agreement(r)
    print(f"\ntotal {r['total_s']:.0f} s; load average {r['load_average_end']:.1f} at the end "
          f"(other processes share this machine)")


def print_results(r: dict) -> None:
    """Tokens/s and GFLOP/s of every system, and the floor of our run's matmuls."""
    ours, cb, st = r["ours"], r["hf_continuous"], r["hf_static"]
    n_tok = ours["output_tokens"]
    peak = r["roofline"]["matmul_peak_gflops"]
    print("\n== results (out tok/s = requested output tokens / wall time of the whole batch; GFLOP/s = model FLOPs "
          "the workload needs / wall time)")
    print(f"  {'system':<44} {'wall s':>7} {'out tok/s':>9} {'all tok/s':>9} {'GFLOP/s':>8} {'% peak':>6} "
          f"{'ours is':>8}")
    rows = [(f"fastserve-jax LLM.generate, {p}", d) for p, d in r["ours_by_policy"].items()]
    if cb:
        rows.append(("transformers continuous batching", cb))
    if st:
        rows.append(("transformers generate, static batches of 32", st))
    for name, d in rows:
        print(f"  {name:<44} {d['wall_s']:7.1f} {d['tokens_per_s']:9.1f} {d['total_tokens_per_s']:9.1f} "
              f"{d['model_gflops']:8.1f} {100 * d['frac_of_peak']:5.0f}% "
              f"{ours['tokens_per_s'] / d['tokens_per_s']:7.2f}x")
    print(f"  (all systems generate the same {n_tok} output tokens from {r['workload']['prompt_stats']['sum']} prompt "
          f"tokens: {r['workload_gflop']:.0f} GFLOP; '% peak' is of the {peak:.1f} GFLOP/s square-matmul rate)")
    if "first_pass_wall_s" in ours:
        print(f"  ours is timed on its second pass over the workload; the first, right after the engine's start, took "
              f"{ours['first_pass_wall_s']:.1f} s ({n_tok / ours['first_pass_wall_s']:.1f} tok/s"
              + (f", {n_tok / ours['first_pass_wall_s'] / cb['tokens_per_s']:.2f}x transformers CB" if cb else "")
              + "); XLA:CPU sets up each launch's YNNPACK dots on its first run, which the full warm-up now does "
              "(ModelRunner.run_once)")
    if st:
        print(f"  static batches: {st['raw_generated_tokens']} tokens generated in all (padding to each batch's "
              f"longest output), raw {st['raw_tokens_per_s']:.1f} tok/s")
    if cb:
        c = cb["config"]
        print(f"  transformers CB: attn '{cb['attn_implementation']}', max_requests_per_batch "
              f"{c['max_requests_per_batch']}, max_batch_tokens {c['max_batch_tokens']}, page {c['page_size']}, "
              f"{c['num_blocks']} blocks; manager start {cb['setup_s']:.1f} s (not timed)")
    if cb:
        print(f"  bound: at 100% of peak we would be {peak / cb['model_gflops']:.2f}x transformers CB on this machine")
    fl = r["matmul_floor"]
    print(f"  the matmuls of our {ours['scheduler']} run's {sum(ours['launches'].values())} launches, each launch "
          f"shape's matmuls run alone as one XLA program (best of {fl['rounds']} interleaved rounds): "
          f"{fl['seconds']:.1f} s of its {ours['wall_s']:.1f} s (attention, norms, sampling and the host come on top)")
    for shape, v in fl["per_shape"].items():
        print(f"    {shape:<28} {v['launches']:3d} launches x {v['best_ms']:6.1f} ms")
    if cb:
        budget = n_tok / (3 * cb["tokens_per_s"])
        print(f"  3x transformers CB means the whole run in {budget:.1f} s: the matmuls alone take "
              f"{100 * fl['seconds'] / budget:.0f}% of that")
    print("  target >= 3x transformers CB: "
          + (f"{'MET' if ours['tokens_per_s'] >= 3 * cb['tokens_per_s'] else 'NOT MET'} "
             f"({ours['tokens_per_s'] / cb['tokens_per_s']:.2f}x)" if cb else "not measured"))


def print_start(r: dict) -> None:
    """Start-up (warm-up compile, cache), and where the trace run's iterations went."""
    ours, start = r["ours"], r["start"]
    print("\n== fastserve-jax start")
    line("construct (load + warm-up compile)", f"{start['construct_s']:.1f} s")
    line("warm-up compile", f"{start['warmup_compile_s']:.1f} s, {start['executables']} executables"
         + (f", of which {start['first_runs_s']:.1f} s running each once" if start.get("first_runs_s") else ""))
    line("persistent compile cache", f"{start['compile_cache']}: {start['cache_entries_before']} entries before, "
         f"{start['cache_entries_after']} after")
    if "second_construct_s" in start:
        line("second start (same process, cache on disk)", f"{start['second_construct_s']:.1f} s "
             f"(warm-up {start['second_warmup_compile_s']:.1f} s, {start['second_new_cache_entries']} new entries)")
    line(f"{ours['scheduler']}: iterations / launches", f"{ours['iterations']} / {sum(ours['launches'].values())}")
    line("time in steps with a prefill / decode-only", f"{ours['steps_with_prefill_s']:.1f} s / "
         f"{ours['decode_only_steps_s']:.1f} s")
    for key, v in ours["single_launch_step_ms"].items():
        line(f"  step with one launch {key}", f"{v['median']:.0f} ms median (n={v['n']})")
    for p, d in r["ours_by_policy"].items():
        line(f"{p}: TTFT p50 / latency p50 (all at t=0)", f"{d['ttft_p50_s']:.2f} s / {d['latency_p50_s']:.2f} s, "
             f"{d['iterations']} iterations")


def print_roofline(r: dict) -> None:
    """The decode step against this machine's roofline, and where the step goes."""
    rf, dec, parts = r["roofline"], r["decode"], r["decode_parts"]
    c = rf["cost"]
    bwd = rf["bandwidth_gbs"]
    print(f"\n== decode roofline at batch {dec['batch']} (this machine, measured in this run; best of before/after)")
    line("memory bandwidth GB/s (reduce / np.sum / np.copy)",
         f"{bwd['before']['jax_reduce_read']:.1f} / {bwd['before']['numpy_sum_read']:.1f} / "
         f"{bwd['before']['numpy_copy_read_write']:.1f} before; {bwd['after']['jax_reduce_read']:.1f} / "
         f"{bwd['after']['numpy_sum_read']:.1f} / {bwd['after']['numpy_copy_read_write']:.1f} after; "
         f"used {bwd['used']:.1f}")
    m = rf["matmul"]
    line(f"matmul {m['before']['square_size']}^2 float32 GFLOP/s (XLA / numpy BLAS)",
         f"{m['before']['square_xla_gflops']:.1f} / {m['before']['square_numpy_gflops']:.1f} before, "
         f"{m['after']['square_xla_gflops']:.1f} / {m['after']['square_numpy_gflops']:.1f} after; used (peak) "
         f"{rf['matmul_peak_gflops']:.1f}")
    for shape in m["before"]["decode_shapes_gflops"]:
        line(f"matmul {shape} GFLOP/s", f"{m['before']['decode_shapes_gflops'][shape]:.1f} before, "
             f"{m['after']['decode_shapes_gflops'][shape]:.1f} after")
    line("decode-step matmul mix GFLOP/s (count-weighted)", f"{rf['decode_mix_gflops']:.1f}")
    line("weights read per step", f"{c['weight_bytes'] / 1e6:.0f} MB ({c['params_read'] / 1e6:.1f}M of "
         f"{c['params_total'] / 1e6:.1f}M params; embedding table excluded)")
    line("KV read per step", f"{c['kv_bytes'] / 1e6:.1f} MB (mean context {dec['mean_context']:.0f} tokens)")
    line("FLOPs per step", f"{c['flops'] / 1e9:.2f} GFLOP (2 x params x {dec['batch']} + attention "
         f"{c['attn_flops'] / 1e9:.2f})")
    line("bytes / bandwidth", f"{rf['t_memory_ms']:.1f} ms")
    line("FLOPs / peak matmul rate", f"{rf['t_compute_ms']:.1f} ms")
    line("roofline step = max of the two", f"{rf['roofline_ms']:.1f} ms ({rf['bound']}-bound)")
    line("(FLOPs / decode-shape matmul rate)", f"{rf['t_compute_decode_shapes_ms']:.1f} ms")
    line("our decode step (engine.step), median / best",
         f"{dec['step_ms_median']:.1f} / {dec['step_ms_best']:.1f} ms over {dec['steps']} steps")
    line("fraction of roofline, median / best step",
         f"{100 * rf['fraction_median']:.0f}% / {100 * rf['fraction_best']:.0f}%")
    line("fraction, each step vs a matmul timed beside it", f"{100 * rf['fraction_paired_median']:.0f}% median "
         f"(1024^2 matmul {rf['paired_matmul_gflops_median']:.1f} GFLOP/s median over the steps; "
         f"target >= 50%: {'MET' if rf['fraction_paired_median'] >= 0.5 else 'NOT MET'})")
    hd = r["checks"].get("hf_decode_step") if r["checks"] else None
    if hd:
        line("transformers forward, one decode step (median)", f"{hd['step_ms_median']:.1f} ms (batch {hd['batch']}, "
             f"context {hd['prompt_len']}+)")
    line("fraction vs decode-shape matmul rate (median)", f"{100 * rf['fraction_vs_decode_shape_rate']:.0f}%")
    print(f"  where the step goes (idle engine, decode bucket {parts['batch']} x {parts['blocks']} blocks, "
          f"interleaved, best of {parts['rounds']}):")
    pm = lambda k: f"{parts[k + '_ms']:.1f} / {parts[k + '_median_ms']:.1f} ms"
    line("  compiled forward alone (best / median)", pm("forward"))
    line("  same forward as nn.scan over stacked weights", f"{pm('forward_scan')} (logits "
         f"max abs diff {parts['scan_logits_max_abs_diff']:.1e}; unrolled is "
         f"{parts['forward_scan_median_ms'] / parts['forward_median_ms']:.2f}x faster, median)")
    line("  forward + greedy sampler + device_get", pm("forward_sample_get"))
    line("  sampler alone (argmax over 32 x vocab)", f"{parts['sampler_ms']:.1f} ms")
    line("  step's matmuls only, one program", f"{pm('gemms')} = {100 * rf['roofline_ms'] / parts['gemms_ms']:.0f}% / "
         f"{100 * rf['roofline_ms'] / parts['gemms_median_ms']:.0f}% of the roofline")
    line("  same, as separate dots (sum)", f"{parts['gemms_isolated_ms']:.1f} ms "
         f"(of which lm_head {parts['lm_head_ms']:.1f} ms)")


def print_host(r: dict) -> None:
    """Host time per iteration (schedule + assemble + postprocess) against the device's."""
    dec = r["decode"]
    print("\n== host overhead (schedule + assemble + postprocess) vs device (dispatch .. tokens on host)")
    for name, d in [(f"trace run, {p}", d) for p, d in r["ours_by_policy"].items()] + [
            (f"decode at batch {dec['batch']}", dec)]:
        line(f"{name}: host / device ms per iteration",
             f"{d['host_ms_per_iter']:.2f} / {d['device_ms_per_iter']:.1f} -> host "
             f"{100 * d['host_frac_of_step']:.2f}% of the step")
    line("decode: schedule / assemble / postprocess ms", f"{dec['schedule_ms']:.2f} / {dec['assemble_ms']:.2f} / "
         f"{dec['postprocess_ms']:.2f}")
    worst = max([dec["host_frac_of_step"]] + [d["host_frac_of_step"] for d in r["ours_by_policy"].values()])
    line("target host < 10% of step", "MET" if worst < 0.10 else "NOT MET")


def print_agreement(r: dict) -> None:
    """Greedy tokens: our policies against each other, and ours against transformers."""
    ch = r["checks"]
    if ch or r["policy_agreement"]:
        print("\n== greedy agreement (float32)")
    first = next(iter(r["ours_by_policy"]))
    for p, a in r["policy_agreement"].items():
        line(f"ours {first} vs ours {p}", f"{a['identical_requests']}/{a['requests']} requests identical")
    if ch:
        for i, ok in ch["reference_requests"].items():
            line(f"request {i} vs transformers generate (batch 1)", "identical" if ok else "DIFFERENT")
        for name, key in ((f"ours ({first}) vs transformers CB", "vs_hf_continuous"),
                          (f"ours ({first}) vs static generate", "vs_hf_static"),
                          ("transformers CB vs static generate", "hf_continuous_vs_hf_static")):
            a = ch[key]
            line(name, f"{a['identical_requests']}/{a['requests']} requests identical, "
                 f"{a['prefix_tokens']}/{a['tokens']} tokens before first divergence")
        probe = ch["torch_thread_probe"]
        line("torch threads", str(ch["torch_threads"]) + ("" if not probe else " (probe: " + ", ".join(
            f"{n} -> prefill 512 {v['prefill_512_s']:.2f} s, decode-32 step {v['decode_32_step_s']:.2f} s"
            for n, v in probe.items()) + ")"))
