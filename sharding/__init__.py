"""Meshes, logical-axis rules and pipeline stages.

Today the engine runs on one device; tensor and pipeline parallelism over
`jax.sharding` meshes arrive with the distributed-serving issue.
"""
