"""Confidence intervals of the evaluation's means: a seeded percentile bootstrap.

The scores of an evaluation are not independent one by one: the n*n
localisation scores of a grid share its images, and the points of a removal
curve share its image. So every interval here resamples *units* (whole grids,
whole images), each given as one value per unit (its mean score, its value at
25% removed):

  mean_interval(v)           the mean of v with its CI (resample the units);
  paired_difference(a, b)    a and b on the same units (two methods on the same
                             grids): mean(a - b) with its CI (resample the
                             units, keeping pairs together), and the share of
                             units where a > b;
  difference(a, b)           a and b on different units (one method on two
                             models' grids): mean(a) - mean(b) with its CI
                             (resample each side on its own);
  curve_band(curves)         per point of (units, points) curves, the CI of
                             the mean curve (the band of a removal curve).

An interval is the (alpha/2, 1 - alpha/2) percentiles of `num_resamples`
bootstrap means; the seed makes it reproducible, and is recorded with it.
`verdict` turns a difference's interval into the words of the README.
"""

from typing import NamedTuple

import numpy as np

NUM_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


class Interval(NamedTuple):
  mean: float   # The estimate: a mean, or a difference of means.
  low: float    # The CI's bounds.
  high: float

  def to_dict(self) -> dict:
    return {"mean": self.mean, "low": self.low, "high": self.high}


def _units(values, name: str) -> np.ndarray:
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or len(v) < 2:
    raise ValueError(f"{name} must be one value per unit (grid or image), at least 2 of "
                     f"them; got shape {v.shape}.")
  if not np.isfinite(v).all():
    raise ValueError(f"{name} has {int((~np.isfinite(v)).sum())} non-finite values.")
  return v


def _resampled_means(v: np.ndarray, num_resamples: int, rng) -> np.ndarray:
  """The means of `num_resamples` resamples of the units (rows) of v: (R,) or
  (R, points). Each resample is a count per unit, so curves cost one matmul."""
  idx = rng.integers(0, len(v), size=(num_resamples, len(v)))
  counts = np.zeros((num_resamples, len(v)))
  np.add.at(counts, (np.arange(num_resamples)[:, None], idx), 1.0)
  return counts @ v / len(v)


def _interval(estimate: float, resampled: np.ndarray, confidence: float) -> Interval:
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(resampled, [tail, 100 - tail])
  return Interval(float(estimate), float(low), float(high))


def mean_interval(values, *, num_resamples: int = NUM_RESAMPLES,
                  confidence: float = CONFIDENCE, seed: int = SEED) -> Interval:
  """The mean of one value per unit, with its bootstrap CI."""
  v = _units(values, "values")
  rng = np.random.default_rng(seed)
  return _interval(v.mean(), _resampled_means(v, num_resamples, rng), confidence)


def paired_difference(a, b, *, num_resamples: int = NUM_RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[Interval, float]:
  """(mean(a - b) with its CI, the share of units where a > b), a[i] and b[i]
  measured on the same unit i."""
  a, b = _units(a, "a"), _units(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"A paired difference needs a and b on the same units; got {len(a)} "
                     f"and {len(b)} values.")
  d = a - b
  rng = np.random.default_rng(seed)
  return (_interval(d.mean(), _resampled_means(d, num_resamples, rng), confidence),
          float((a > b).mean()))


def difference(a, b, *, num_resamples: int = NUM_RESAMPLES, confidence: float = CONFIDENCE,
               seed: int = SEED) -> Interval:
  """mean(a) - mean(b) with its CI, a and b measured on independent units."""
  a, b = _units(a, "a"), _units(b, "b")
  rng = np.random.default_rng(seed)
  resampled = _resampled_means(a, num_resamples, rng) - _resampled_means(b, num_resamples, rng)
  return _interval(a.mean() - b.mean(), resampled, confidence)


def curve_band(curves, *, num_resamples: int = NUM_RESAMPLES,
               confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
  """(low, high), each (points,): the CI of the mean curve at every point of
  curves (units, points), all points from the same resamples of the units."""
  c = np.asarray(curves, np.float64)
  if c.ndim != 2:
    raise ValueError(f"curves must be (units, points); got shape {c.shape}.")
  _units(c[:, 0], "curves")
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(_resampled_means(c, num_resamples, np.random.default_rng(seed)),
                            [tail, 100 - tail], axis=0)
  return low, high


def verdict(diff: Interval) -> str:
  """A claim "a > b" from the interval of a - b: "reproduces" when it excludes 0
  above, "does not reproduce" when it excludes 0 below, else "undecided"."""
  if diff.low > 0:
    return "reproduces"
  if diff.high < 0:
    return "does not reproduce"
  return "undecided at this sample size"
