"""Meshes, logical-axis rules, pipeline stages and multi-host start.

    parallel_config.py  ParallelConfig: the tp x pp sizes, and whether a model splits that way (no jax)
    mesh.py             ParallelConfig -> the global (pp, tp_kv, tp_rep) mesh and one
                        tensor-parallel sub-mesh per pipeline stage
    rules.py            logical axis names -> mesh axes (one table; collisions raise)
    layout.py           ModelLayout: where every param, KV block and activation lives
    host_copy.py        how swapped-out KV lies in host memory (once per KV head, not per device)
    pipeline.py         Stage (one jitted slice of the model) and StageActivity (what ran when)
    distributed.py      jax.distributed start and the plan channel from process 0 to the others

docs/parallelism.md walks through the layout and how to launch on a pod.
"""

if __name__ == "sharding":  # imported by the generic top-level name from a source checkout
    raise ImportError("import fastserve_jax.sharding: the sharding/ folder installs under the fastserve_jax namespace")

