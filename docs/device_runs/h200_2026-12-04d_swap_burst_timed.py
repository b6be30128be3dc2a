"""The harness behind h200_2026-12-04d_swap_burst_timed.log: bench_swap_burst's burst in process,
skip-join with proactive then recompute, each round a fresh engine; the swap path's host time
timed by wrapping its methods (ms per iteration). Run from the repository root:
python docs/device_runs/h200_2026-12-04d_swap_burst_timed.py ROUNDS"""
import sys, time, argparse, collections
sys.path.insert(0, "scripts")
import bench_preemption as bp
from sim_fidelity_in_process import engine_in_process
from fastserve_jax.workload import with_arrivals
import fastserve_jax.swap_copies as sc, fastserve_jax.swap_policy as sp, fastserve_jax.engine as en
import fastserve_jax.scheduler.skip_join as sj, fastserve_jax.kv_plan as kp
acc = collections.Counter(); cnt = collections.Counter()
def wrap(obj, name, label):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter()
        try: return f(*a, **k)
        finally: acc[label] += time.perf_counter() - t; cnt[label] += 1
    setattr(obj, name, g)
wrap(sc.SwapCopies, "ahead", "ahead"); wrap(sc.SwapCopies, "issue", "issue"); wrap(sc.SwapCopies, "land", "land")
wrap(sc.SwapCopies, "on_demand", "on_demand")
wrap(sp.SwapPolicy, "plan_ahead", "plan_ahead"); wrap(sp.SwapPolicy, "configure", "configure")
wrap(sj.SkipJoinMLFQScheduler, "schedule", "sched.schedule")
wrap(en, "apply_plan", "apply_plan")
ap = argparse.ArgumentParser(); bp.add_burst_args(ap)
a = ap.parse_args([])
b = bp.burst_setup(a)
arrivals = [r.arrival for r in with_arrivals(b.sized, 300.0, seed=a.seed)]
for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
  for swap in ("proactive", "recompute"):
    argv = [swap if x == "proactive" else x for x in b.argv]
    llm = bp.local_engine(argv, "skip-join-mlfq", warmup="full")
    acc.clear(); cnt.clear()
    m = engine_in_process(lambda p: llm, b.work, arrivals, "skip-join-mlfq")
    its = m["iterations"]
    print(swap, f"tok/it {(m['prefill_tokens']+m['decode_tokens'])/its:.1f} asm {m['assemble_seconds_per_iteration']*1e3:.2f} post {m['postprocess_seconds_per_iteration']*1e3:.2f} blocks {m['swap_out_blocks']} {m['throughput_rps']:.1f} req/s its {its} sched {m['schedule_seconds_per_iteration']*1e3:.2f} dev {m['device_seconds_per_iteration']*1e3:.2f}ms",
          " ".join(f"{k}={v/its*1e3:.3f}ms(n{cnt[k]})" for k, v in sorted(acc.items())), flush=True)
