"""Serving benchmark over HTTP: Poisson or trace-timed load at several rates against the
OpenAI-compatible server, one server per scheduler; prints TTFT, TPOT, inter-token and
end-to-end latency (mean, p50, p99) and throughput. The same code as `fastserve-jax bench`
(serve/bench_cmd.py, serve/bench_client.py); see `--help` for the options.

    python scripts/bench_serving.py --scheduler fcfs --scheduler skip-join-mlfq --rate 4 --rate 8
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --rate 5 --arrivals trace
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastserve_jax.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
