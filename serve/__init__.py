"""The user-facing surfaces: the OpenAI-compatible HTTP server, the CLI, bench and simulate."""

if __name__ == "serve":  # imported by the generic top-level name from a source checkout
    raise ImportError("import fastserve_jax.serve: the serve/ folder installs under the fastserve_jax namespace")
