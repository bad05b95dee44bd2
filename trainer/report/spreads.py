"""Means and spreads over the seeds of a run (``transfer.seeds``): how the report tells a
difference between two kinds of SAE from the noise of training one of them.

A comparison is measured once per seed; its figure is the mean with the min-max range over the
seeds, and a difference between two kinds *exceeds the spread* when their min-max ranges do not
overlap (with n = 3 seeds of two kinds that were the same, each of the two orderings has chance
1 / C(6, 3) = 1/20: 1/10 together). One seed has no spread: the report then says so instead of judging.
"""

from __future__ import annotations

from statistics import fmean
from typing import Iterable, NamedTuple


class Spread(NamedTuple):
    """A metric over seeds: mean, smallest, largest, and the number of seeds."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``0.812`` for one seed, ``0.812 [0.809, 0.815]`` (mean [min, max]) for several."""
        sign = "+" if signed else ""
        mean = f"{self.mean:{sign}.{digits}f}"
        return mean if self.n == 1 else f"{mean} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


def spread(values: Iterable[float]) -> Spread:
    values = list(values)
    if not values:
        raise ValueError("a spread needs at least one value")
    return Spread(fmean(values), min(values), max(values), len(values))


def separated(a: Spread, b: Spread) -> bool:
    """Whether the two min-max ranges do not overlap (never, with a single seed on either side)."""
    return min(a.n, b.n) > 1 and (a.low > b.high or b.low > a.high)


def verdict(a: Spread, b: Spread) -> str:
    """How a difference between ``a`` and ``b`` reads against their spreads."""
    if min(a.n, b.n) == 1:
        return "one seed: no spread"
    if not separated(a, b):
        return "within the spread"
    return "exceeds the spread (higher)" if a.mean > b.mean else "exceeds the spread (lower)"

