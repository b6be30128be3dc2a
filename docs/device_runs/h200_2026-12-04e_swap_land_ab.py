"""A/B on bench_swap_burst's burst (in process, skip-join): uploads landed while their copies
are in flight (SwapCopies.LAND_IN_FLIGHT, the new default) against landed only once in (the
old way), with skip-join/recompute and fcfs/recompute beside them; rounds alternate. Host
time of the swap path is timed by wrapping its methods. Usage: python ab_land.py ROUNDS"""
import sys, time, argparse, collections, statistics
sys.path.insert(0, "scripts")
import bench_preemption as bp
from sim_fidelity_in_process import engine_in_process
from fastserve_jax.workload import with_arrivals
import fastserve_jax.swap_copies as sc, fastserve_jax.swap_policy as sp
acc = collections.Counter(); cnt = collections.Counter()
def wrap(obj, name):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter()
        try: return f(*a, **k)
        finally: acc[name] += time.perf_counter() - t; cnt[name] += 1
    setattr(obj, name, g)
for n in ("ahead", "issue", "land", "on_demand"): wrap(sc.SwapCopies, n)
wrap(sp.SwapPolicy, "plan_ahead")
ap = argparse.ArgumentParser(); bp.add_burst_args(ap)
a = ap.parse_args([])
b = bp.burst_setup(a)
arrivals = [r.arrival for r in with_arrivals(b.sized, 300.0, seed=a.seed)]
VARIANTS = [("skip-join-mlfq", "proactive", True), ("skip-join-mlfq", "proactive", False),
            ("skip-join-mlfq", "recompute", True), ("fcfs", "recompute", True)]
runs = collections.defaultdict(list)
for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    for policy, swap, eager in VARIANTS:
        sc.SwapCopies.LAND_IN_FLIGHT = eager
        argv = [swap if x == "proactive" else x for x in b.argv]
        llm = bp.local_engine(argv, policy, warmup="full")
        acc.clear(); cnt.clear()
        st = llm.engine.stats
        early0 = st.swap_ins_landed_in_flight
        m = engine_in_process(lambda p: llm, b.work, arrivals, policy)
        its = m["iterations"]
        label = f"{policy}/{swap}" + ("" if swap != "proactive" else ("/land-in-flight" if eager else "/land-when-in"))
        runs[label].append(m)
        print(f"{label}: {m['throughput_rps']:.1f} req/s, {m['mean_latency_per_token'] * 1e3:.2f} ms/token, "
              f"JCT {m['e2e_mean']:.3f} p99 {m['e2e_p99']:.3f}; {its} its, "
              f"{(m['prefill_tokens'] + m['decode_tokens']) / its:.1f} tok/it; ms/it sched "
              f"{m['schedule_seconds_per_iteration'] * 1e3:.2f} asm {m['assemble_seconds_per_iteration'] * 1e3:.2f} "
              f"dev {m['device_seconds_per_iteration'] * 1e3:.2f} post {m['postprocess_seconds_per_iteration'] * 1e3:.2f}; "
              f"blocks out {m['swap_out_blocks']} in {m['swap_in_blocks']}, landed in flight "
              f"{st.swap_ins_landed_in_flight - early0}, stall {m['swap_stall'] / m['busy_seconds']:.2%}; host ms/it "
              + " ".join(f"{k} {v / its * 1e3:.3f}" for k, v in sorted(acc.items())), flush=True)
print("\nmedians")
med = {k: {f: statistics.median(r[f] for r in v) for f in ("throughput_rps", "mean_latency_per_token", "e2e_mean", "e2e_p99")}
       for k, v in runs.items()}
base = med["fcfs/recompute"]
for k, m in med.items():
    print(f"  {k:45} {m['throughput_rps']:7.1f} req/s {m['mean_latency_per_token'] * 1e3:7.2f} ms/token "
          f"JCT {m['e2e_mean']:.3f} p99 {m['e2e_p99']:.3f}  vs fcfs/recompute: {m['throughput_rps'] / base['throughput_rps']:.3f}x rate, "
          f"{base['mean_latency_per_token'] / m['mean_latency_per_token']:.2f}x lower ms/token")
