"""`python -m fastserve_jax ...` is the `fastserve-jax` command."""

import sys

from fastserve_jax.serve.cli import main

sys.exit(main())
