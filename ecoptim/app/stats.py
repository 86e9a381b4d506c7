"""Small-sample statistics for the app's multi-seed tables: mean +- sd and paired Student-t intervals.

Runs of different methods with the same seed share their initial weights and batches, so the comparison that
matters is *paired*: for seeds s = 1..n, d_s = loss(method, s) - loss(reference, s), and the 95% interval of
the mean difference is

    mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)

The Student-t quantile is computed here (no scipy): the CDF through the regularized incomplete beta function
(continued fraction, as in Numerical Recipes' ``betacf``), inverted by bisection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["student_t_cdf", "student_t_quantile", "mean_sd", "Interval", "mean_interval", "paired_interval"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF, ~1e-12 accurate)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_sd(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for a single value)."""
    if not xs:
        raise ValueError("mean_sd of an empty sequence")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))


@dataclass(frozen=True)
class Interval:
    """A mean with its sample sd and two-sided ``level`` t-interval [lo, hi] (None when n < 2)."""

    mean: float
    sd: float | None
    n: int
    lo: float | None
    hi: float | None
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.hi is None else self.hi - self.mean

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely on one side of 0 (the difference is resolved at this level)."""
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)

    def to_dict(self) -> dict[str, float | int | None]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n, "lo": self.lo, "hi": self.hi, "level": self.level}


def mean_interval(xs: Sequence[float], level: float = 0.95) -> Interval:
    """mean(xs) +- t_{(1+level)/2, n-1} * sd / sqrt(n)."""
    mean, sd = mean_sd(xs)
    if sd is None:
        return Interval(mean, None, len(xs), None, None, level)
    half = student_t_quantile(0.5 + 0.5 * level, len(xs) - 1) * sd / math.sqrt(len(xs))
    return Interval(mean, sd, len(xs), mean - half, mean + half, level)


def paired_interval(xs: Sequence[float], ref: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of the mean paired difference xs[i] - ref[i] (pairs share a seed)."""
    if len(xs) != len(ref):
        raise ValueError(f"paired samples differ in length: {len(xs)} vs {len(ref)}")
    return mean_interval([a - b for a, b in zip(xs, ref)], level)
