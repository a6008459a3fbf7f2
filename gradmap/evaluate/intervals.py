"""95% intervals for accuracies measured on n examples (Wilson score interval).

Every accuracy gradmap prints carries one: a task's accuracy is a proportion of n examples, so
its sampling noise is binomial.  Wilson (1927), "Probable inference, the law of succession, and
statistical inference": the set of p whose z-test accepts the observed proportion.  Paired and
multi-seed comparisons use their own statistics (`gradmap.experiments.paired`).
"""
from __future__ import annotations

import math

__all__ = ["wilson_interval", "accuracy_text"]


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `p` measured on `n` trials (95% for z = 1.96).

        centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1−p)/n + z²/4n²) / (1 + z²/n)

    Unlike p ± z·se it stays inside [0, 1] and is not zero-width at p = 0 or 1, which matters
    for a handful of examples and for accuracies near 0 (a badly pruned model on LAMBADA).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"wilson_interval needs n >= 1 trials, got {n!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"wilson_interval needs a proportion in [0, 1], got {p!r}")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(p: float, n: int, digits: int = 1) -> str:
    """`p` in percent with its 95% Wilson interval: '62.3 [60.1, 64.5]'."""
    lo, hi = wilson_interval(p, n)
    return f"{100 * p:.{digits}f} [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"
