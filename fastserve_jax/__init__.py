"""fastserve-jax: FastServe-style preemptive LLM serving on JAX/XLA."""
