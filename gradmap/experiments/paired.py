"""Statistics for comparing pruning pipelines over calibration seeds (issue 14, Part 1).

Three questions, three tools, each stated where its number is printed:

* A method's level: mean over seeds ± standard error (sample s.d. / √n; none for n = 1).
* Perplexity, method vs reference: paired over seeds. d_s = log PPL_method(s) − log PPL_ref(s)
  on the same calibration draw s; 95% interval d̄ ± t(0.975, n−1)·s_d/√n (Student t, n−1
  degrees of freedom), reported as a PPL ratio exp(·). Logs, because calibration noise acts
  multiplicatively on PPL (one seed moving 100 → 146 is the same kind of event as 20 → 29)
  and a ratio reads the same for every model. With n = 1 there is no interval.
* Zero-shot accuracy, method vs reference: paired bootstrap over examples, pooled over seeds.
  For task t, seed s and example i, d = correct_method − correct_ref (0/1, the task's reported
  metric). Each resample draws the examples of every task with replacement (stratified by
  task), the SAME draw for all seeds, and recomputes the statistic the table prints: the
  unweighted mean over tasks of the mean over seeds of the accuracy difference. The 95%
  interval is the 2.5/97.5 percentiles of B resamples, from a fixed RNG seed (same data,
  same interval). Bootstrap rather than McNemar because the printed number is an unweighted
  average of per-task accuracies (tasks of different sizes, acc or acc_norm per task) and we
  want an interval on that number, in points; McNemar tests one pooled proportion and gives
  only a p-value. The examples are resampled, not the seeds: seed-to-seed variation enters
  through the average over seeds and is what the PPL interval measures; with 3 seeds a
  resampling of seeds has too few distinct draws to mean anything.

"significant" means the 95% interval excludes 0 (ratio 1 for PPL); otherwise "tie".
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import torch

__all__ = ["mean_se", "t_quantile", "Interval", "paired_log_ppl", "paired_bootstrap",
           "jaccard", "mean_pairwise_jaccard", "BOOTSTRAP_SAMPLES", "BOOTSTRAP_SEED"]

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); the error is None for fewer than two values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_se of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _t_two_sided_mass(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with integer `dof` (Abramowitz & Stegun 26.7.3-4, exact)."""
    theta = math.atan(t / math.sqrt(dof))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2 == 1:
        total, term = 0.0, 1.0
        if dof > 1:
            total = term
            for k in range(3, dof - 1, 2):  # 1 + 2/3 c² + 2·4/(3·5) c⁴ + ...
                term *= (k - 1) / k * c2
                total += term
            total *= s * math.cos(theta)
        return 2.0 / math.pi * (theta + total)
    total, term = 1.0, 1.0
    for k in range(2, dof - 1, 2):  # 1 + 1/2 c² + 1·3/(2·4) c⁴ + ...
        term *= (k - 1) / k * c2
        total += term
    return s * total


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with integer `dof` ≥ 1, by bisection."""
    if not 0.5 < p < 1.0 or dof < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and dof >= 1, got p={p}, dof={dof}")
    mass = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, dof) < mass:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, dof) < mass else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """A paired difference and its 95% interval (None bounds: no interval could be formed)."""

    estimate: float
    low: float | None
    high: float | None
    n: int
    method: str

    @property
    def verdict(self) -> str:
        """'lower' / 'higher' when the interval excludes 0, else 'tie'; 'n/a' without one."""
        if self.low is None or self.high is None:
            return "n/a"
        if self.high < 0:
            return "lower"
        if self.low > 0:
            return "higher"
        return "tie"


def paired_log_ppl(method: Sequence[float], reference: Sequence[float]) -> Interval:
    """Mean of log PPL_method − log PPL_ref over paired seeds, with a t-interval (n−1 dof).

    The estimate and bounds are on the log scale; exp() turns them into a PPL ratio.
    """
    if len(method) != len(reference) or not method:
        raise ValueError("paired_log_ppl needs the same non-zero number of seeds on both sides")
    d = [math.log(a) - math.log(b) for a, b in zip(method, reference)]
    mean, se = mean_se(d)
    if se is None:
        return Interval(mean, None, None, len(d), "none (one seed)")
    half = t_quantile(0.975, len(d) - 1) * se
    return Interval(mean, mean - half, mean + half, len(d), f"paired t, {len(d) - 1} dof")


def paired_bootstrap(method: dict[str, Sequence[Sequence[int]]],
                     reference: dict[str, Sequence[Sequence[int]]],
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Difference of the task-averaged accuracy (method − reference), 95% bootstrap interval.

    `method[task]` / `reference[task]`: one 0/1 list per seed (same seeds in the same order,
    same examples in the same order). See the module docstring for the resampling scheme.
    """
    if set(method) != set(reference) or not method:
        raise ValueError(f"paired_bootstrap needs the same tasks on both sides, got "
                         f"{sorted(method)} and {sorted(reference)}")
    gen = torch.Generator().manual_seed(seed)
    estimate, boot = 0.0, torch.zeros(samples, dtype=torch.float64)
    for task in sorted(method):
        a = torch.tensor(method[task], dtype=torch.float64)
        b = torch.tensor(reference[task], dtype=torch.float64)
        if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0:
            raise ValueError(f"task {task!r}: need seeds x examples 0/1 lists of equal shape on "
                             f"both sides, got {tuple(a.shape)} and {tuple(b.shape)}")
        per_example = (a - b).mean(dim=0)  # averaged over seeds: one paired value per example
        n = per_example.numel()
        estimate += per_example.mean().item()
        idx = torch.randint(n, (samples, n), generator=gen)
        boot += per_example[idx].mean(dim=1)
    k = len(method)
    boot /= k
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    n_seeds = len(next(iter(method.values())))
    return Interval(estimate / k, low, high, n_seeds,
                    f"paired bootstrap over examples, {samples} resamples, seed {seed}")


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B| of two removed-layer sets (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def mean_pairwise_jaccard(sets: Sequence[Sequence[int]]) -> tuple[float, float] | None:
    """(mean, min) Jaccard overlap over all pairs of seeds; None for fewer than two sets."""
    pairs = [jaccard(a, b) for a, b in combinations(sets, 2)]
    if not pairs:
        return None
    return sum(pairs) / len(pairs), min(pairs)
