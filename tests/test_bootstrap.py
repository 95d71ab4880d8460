"""Tests of codajax.bootstrap: the intervals cover a known mean as often as they claim."""

import numpy as np
import pytest

from codajax import bootstrap

TRIALS = 400


def coverage(draw, estimate, truth, seed=0):
  """The share of TRIALS synthetic data sets whose 95% interval holds `truth`."""
  rng = np.random.default_rng(seed)
  hits = 0
  for t in range(TRIALS):
    interval = estimate(*draw(rng), seed=t)
    hits += interval.low <= truth <= interval.high
  return hits / TRIALS


def test_mean_interval_covers_the_known_mean():
  # Skewed scores in [0, 1], like localisation scores; Beta(2, 5) has mean 2/7.
  rate = coverage(lambda rng: (rng.beta(2, 5, size=60),), bootstrap.mean_interval, 2 / 7)
  # Percentile intervals run a little short at small n; 400 trials give +- 0.011.
  assert 0.91 <= rate <= 0.98, rate


def test_paired_difference_covers_the_known_difference():
  def draw(rng):
    unit = rng.beta(2, 5, size=50)  # A per-grid difficulty shared by both methods.
    return unit + rng.normal(0.05, 0.1, size=50), unit + rng.normal(0.0, 0.1, size=50)
  rate = coverage(draw, lambda a, b, seed: bootstrap.paired_difference(a, b, seed=seed)[0],
                  0.05)
  assert 0.91 <= rate <= 0.98, rate


def test_unpaired_difference_covers_the_known_difference():
  draw = lambda rng: (rng.exponential(1.0, size=80), rng.exponential(0.5, size=40))
  assert 0.91 <= coverage(draw, bootstrap.difference, 0.5) <= 0.98


def test_pairing_narrows_the_interval_when_units_share_difficulty():
  rng = np.random.default_rng(1)
  unit = rng.uniform(0, 1, size=100)
  a, b = unit + 0.02 + rng.normal(0, 0.01, 100), unit + rng.normal(0, 0.01, 100)
  paired, share = bootstrap.paired_difference(a, b)
  unpaired = bootstrap.difference(a, b)
  assert paired.low > 0 and unpaired.low < 0  # Only pairing decides a > b here.
  assert paired.high - paired.low < (unpaired.high - unpaired.low) / 5
  np.testing.assert_allclose(paired.mean, np.mean(a - b))
  assert share == np.mean(a > b)


def test_curve_band_is_the_interval_of_every_point():
  curves = np.random.default_rng(2).uniform(size=(40, 5)).cumsum(axis=1)
  low, high = bootstrap.curve_band(curves, seed=7)
  for p in range(5):  # The same resamples as mean_interval draws for one column.
    i = bootstrap.mean_interval(curves[:, p], seed=7)
    np.testing.assert_allclose([low[p], high[p]], [i.low, i.high], rtol=1e-12)
  assert (low < curves.mean(0)).all() and (curves.mean(0) < high).all()


def test_seeded_and_reproducible():
  v = np.random.default_rng(0).normal(size=30)
  assert bootstrap.mean_interval(v, seed=3) == bootstrap.mean_interval(v, seed=3)
  assert bootstrap.mean_interval(v, seed=3) != bootstrap.mean_interval(v, seed=4)
  i = bootstrap.mean_interval(v)
  assert i.low < i.mean < i.high and i.mean == pytest.approx(v.mean())
  assert i.to_dict() == {"mean": i.mean, "low": i.low, "high": i.high}


def test_constant_values_give_a_point_interval():
  i = bootstrap.mean_interval(np.full(10, 0.25))
  assert (i.mean, i.low, i.high) == pytest.approx((0.25, 0.25, 0.25))


@pytest.mark.parametrize("low, high, word", [
    (0.01, 0.05, "reproduces"), (-0.05, -0.01, "does not reproduce"),
    (-0.01, 0.05, "undecided at this sample size")])
def test_verdict(low, high, word):
  assert bootstrap.verdict(bootstrap.Interval(0.0, low, high)) == word


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="one value per unit"):
    bootstrap.mean_interval(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    bootstrap.mean_interval([0.5])
  with pytest.raises(ValueError, match="non-finite"):
    bootstrap.mean_interval([0.5, np.nan])
  with pytest.raises(ValueError, match="same units"):
    bootstrap.paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
