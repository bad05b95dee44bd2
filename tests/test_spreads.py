"""How the report judges a difference between two kinds of SAE against their spread over seeds."""

from __future__ import annotations

import pytest

from trainer.report.spreads import separated, spread, verdict


def test_a_spread_is_the_mean_and_the_range():
    value = spread([0.80, 0.83, 0.81])
    assert value.mean == pytest.approx(0.8133333) and (value.low, value.high, value.n) == (0.80, 0.83, 3)
    assert value.format() == "0.813 [0.800, 0.830]"
    assert spread([0.02, -0.01]).format(signed=True) == "+0.005 [-0.010, +0.020]"
    assert spread([0.8]).format() == "0.800"  # one seed: no range to show


def test_a_difference_exceeds_the_spread_only_when_the_ranges_are_apart():
    distilled, random_core = spread([0.803, 0.805, 0.806]), spread([0.809, 0.810, 0.812])
    assert separated(distilled, random_core) and verdict(random_core, distilled) == "exceeds the spread (higher)"
    assert verdict(distilled, random_core) == "exceeds the spread (lower)"
    overlapping = spread([0.804, 0.811, 0.807])
    assert not separated(distilled, overlapping) and verdict(distilled, overlapping) == "within the spread"
    assert verdict(spread([0.1]), spread([0.9])) == "one seed: no spread"  # never judged from one seed
    with pytest.raises(ValueError):
        spread([])
