"""scripts/repro_fastserve.py's targets: each check passed, failed or not measured, with its line."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastserve_jax.serve.sweep_report import past_served  # noqa: E402


class Checks:
    """Each target: PASS/FAIL with the figures that decide it. `outcomes` maps each check's key
    (what it checks, without the figures) to (passed, line), for comparing seeds; passed is
    None where the run could not decide it (N/A)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.outcomes: dict[tuple, tuple[bool | None, str]] = {}
        self.failed = self.checked = 0

    def check(self, ok: bool, what: str, key: tuple) -> None:
        self.checked += 1
        self.failed += not ok
        line = f"{'PASS' if ok else 'FAIL'}  {what}"
        self.lines.append(line)
        self.outcomes[key] = (ok, line)

    def goodput(self, s_ours: dict, s_theirs: dict, factor: float, what: str, key: tuple, lowest: float) -> None:
        """Goodput (slo.sweep_summary's `s_ours`, `s_theirs`) at least `factor` x theirs. A
        goodput of None (0 here) missed the SLO already at the lowest rate swept, `lowest`, so is
        only known to be under it; one equal to the highest rate swept met it at every rate, so
        is only a lower bound. Where the bounds decide the ratio it is passed or failed, else it
        is not measured (listed, neither passed nor failed): so too where neither met the SLO
        (e.g. only bursts were run). Until 2026-12-07 two lower bounds equal to the top rate
        failed at 1.00x. A goodput above every rate served is marked (a finite burst's)."""
        ours, theirs = s_ours["goodput_rps"] or 0.0, s_theirs["goodput_rps"] or 0.0
        o_low, t_low = (ours >= s_ours["max_offered_rps"]), (theirs >= s_theirs["max_offered_rps"])
        if past_served(s_ours) or past_served(s_theirs):
            what += " [above every rate served: a burst's figure]"
        if not ours and not theirs:
            self.not_measured(f"N/A   {what} (no rate run met the SLO: run steady loads too)", key)
        elif theirs:
            ratio = f"{ours / theirs:.2f}x{' or more' if o_low else ''}{' or less' if t_low else ''}"
            met = ours >= factor * theirs
            if (o_low and t_low) or (o_low and not met) or (t_low and met):
                self.not_measured(f"N/A   {what} ({ratio}: every rate swept met the SLO; sweep higher rates; "
                                  f"target >= {factor:g}x)", key)
            else:
                self.check(met, f"{what} ({ratio}, target >= {factor:g}x)", key)
        elif ours >= factor * lowest:
            self.check(True, f"{what} (over {ours / lowest:.2f}x: the other misses the SLO at the lowest rate, "
                             f"{lowest:.3f} req/s; target >= {factor:g}x)", key)
        else:
            self.not_measured(f"N/A   {what} (over {ours / lowest:.2f}x, a lower bound: the other misses the SLO "
                              f"at the lowest rate swept, {lowest:.3f} req/s; sweep lower rates; "
                              f"target >= {factor:g}x)", key)

    def not_measured(self, line: str, key: tuple) -> None:
        self.lines.append(line)
        self.outcomes[key] = (None, line)
