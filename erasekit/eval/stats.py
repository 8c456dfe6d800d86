"""Rates with their counts: every share of images erasekit reports comes with ``n`` and a 95% interval."""

from __future__ import annotations

import math

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (Wilson 1927), 95% by default; None when n is 0.

    centre = (p + z²/2n) / (1 + z²/n),  half width = z / (1 + z²/n) * sqrt(p(1 - p)/n + z²/4n²).
    Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1.
    """
    if n <= 0:
        return None
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact at the ends, where rounding would leave 1e-17
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def rate_record(successes: int, n: int) -> dict:
    """``{"rate", "shown", "n", "ci95"}``: the share, its counts and its 95% Wilson interval (rate None when n is 0)."""
    interval = wilson_interval(successes, n)
    return {"rate": successes / n if n else None, "shown": int(successes), "n": int(n),
            "ci95": None if interval is None else [round(interval[0], 6), round(interval[1], 6)]}
