"""The paper's interpretability metrics (Sec. 5.2), as the authors' code computes them.

Localisation, the grid pointing game (`interpretability/analyses/localisation.py`):
n x n grids of correctly and confidently classified test images of n^2 distinct
classes. Every cell is a target in turn: the attribution a for the class of the
image in cell i, summed over channels, is clamped, a = max(0, a), and

  s_i = sum_{p in cell i} a(p) / sum_{p in grid} a(p)       (0 if the sum is 0).

Oracle = 1, uniform = 1/n^2.

Pixel removal (`interpretability/analyses/pixel_removal.py`): the pixels of an
image are removed in the order of the signed, channel-summed attribution for
its true class (least important first), up to 25% of them, and the sigmoid of
the true class's logit is recorded after every step of the schedule.

Quirks of the original are reproduced by default, each behind a named option
whose alternative is the clean behaviour: `skip_bug` (one image skipped after
every grid), `fill` (a removed pixel is 0 in all 2C encoded channels, not black).
Attributions come in as maps (N, K, H, W), already summed over channels, or as
a function attribute_fn(x, classes) -> (N, K, H, W), e.g.
functools.partial(attribution.attribute, "ours", model, variables).
"""

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from codajax import batching
from codajax import methods
from codajax import models

ORDERS = methods.ORDERS  # Pixel removal's orders and fills, declared jax-free there.
FILLS = methods.FILLS


# ----------------------------------------------------------------------------
# Localisation: choosing the images of the grids.
# ----------------------------------------------------------------------------


class Grids(NamedTuple):
  indices: np.ndarray  # (G, n*n) test image indices; image k goes to cell k.
  classes: np.ndarray  # (G, n*n) their labels, distinct within a grid.


def sorted_confidences(logits, labels) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per class c: (indices, logits) of the correctly classified test images
  of class c, by logit, highest first (ties keep dataset order).

  `logits` (N, K) are computed once over the test split (in batches, by the
  caller); an image is correct when its argmax (the first maximum, as torch's
  max) is its label, and its logit is that maximum.
  """
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"sorted_confidences takes logits (N, K) and labels (N,), got "
                     f"{logits.shape} and {labels.shape}; pass integer labels, not one-hot.")
  predicted = logits.argmax(axis=1)
  result = []
  for c in range(logits.shape[1]):
    idx = np.flatnonzero((labels == c) & (predicted == c))
    values = logits[idx, c]
    order = np.argsort(-values, kind="stable")
    result.append((idx[order], values[order]))
  return result


def _sigmoid32(logit) -> np.float32:
  """The original's torch.tensor(logit).sigmoid(): float32."""
  return np.float32(1) / (np.float32(1) + np.exp(-np.float32(logit)))


def class_blocks(confidences, n_imgs: int, conf_thresh: float = 0.5,
                 seed: int = 42) -> np.ndarray:
  """The original's `get_sorted_indices`: a flat list of image indices made of
  blocks of `n_imgs` distinct classes drawn at random (seed 42); each drawn
  class gives its next most confident unused image. A class takes part while
  its next image has sigmoid(logit) > conf_thresh, and drawing stops once no
  more than n_imgs classes take part (`while mask.sum() > n_imgs`, strictly).
  A class without a correct image never takes part (the original would crash).
  """
  # RandomState(seed).choice draws what np.random.seed(seed); np.random.choice
  # draws, without touching numpy's global state.
  rng = np.random.RandomState(seed)
  pointer = np.zeros(len(confidences), np.int64)

  def takes_part(c):
    indices, logits = confidences[c]
    return pointer[c] < len(indices) and _sigmoid32(logits[pointer[c]]) > conf_thresh

  classes = np.arange(len(confidences))
  mask = np.array([takes_part(c) for c in classes], bool)
  sequence = []
  while mask.sum() > n_imgs:
    for c in rng.choice(classes[mask], size=n_imgs, replace=False):
      sequence.append(confidences[c][0][pointer[c]])
      pointer[c] += 1
      mask[c] = takes_part(c)
  return np.asarray(sequence, np.int64)


def make_grids(sequence, labels, n: int, num_grids: int, skip_bug: bool = True) -> Grids:
  """The original's `make_multi_image`, for `num_grids` grids: from the offset,
  take the next images of `sequence`, skipping any whose class is already in
  the grid, until there are n*n. The original then moves the offset one past
  the last image taken (`i + offset + 1`), so one image is skipped after every
  grid and the grids do not line up with the blocks of `class_blocks`
  (skip_bug=True); skip_bug=False continues right after it.
  """
  labels = np.asarray(labels)
  indices, classes, offset = [], [], 0
  for g in range(num_grids):
    grid, i = [], 0
    while len(grid) < n * n:
      if offset + i >= len(sequence):
        raise ValueError(
            f"make_grids: the {len(sequence)} confident images make only {g} grids of "
            f"{n}x{n}, not {num_grids}; ask for fewer grids, a smaller grid or a lower "
            "conf_thresh.")
      image = sequence[offset + i]
      i += 1
      if labels[image] not in labels[grid]:
        grid.append(image)
    indices.append(grid)
    classes.append(labels[grid])
    offset += i + 1 if skip_bug else i
  return Grids(np.asarray(indices, np.int64).reshape(num_grids, n * n),
               np.asarray(classes, np.int64).reshape(num_grids, n * n))


def select_grids(logits, labels, n: int = 3, num_grids: int = 500, conf_thresh: float = 0.5,
                 seed: int = 42, skip_bug: bool = True) -> Grids:
  """The grids of the localisation metric from the test split's logits (N, K)
  and labels (N,): `sorted_confidences`, `class_blocks`, `make_grids`."""
  blocks = class_blocks(sorted_confidences(logits, labels), n * n, conf_thresh, seed)
  return make_grids(blocks, labels, n, num_grids, skip_bug)


# ----------------------------------------------------------------------------
# Localisation: grid layout and scores.
# ----------------------------------------------------------------------------


def tile(images, n: int):
  """(..., n*n, H, W, C) -> (..., n*H, n*W, C), column-major: image k = n*a1 + a2
  goes to grid row a2, column a1 (the original's permute(0, 3, 2, 4, 1, 5))."""
  *lead, k, h, w, c = images.shape
  if k != n * n:
    raise ValueError(f"tile: a {n}x{n} grid takes {n * n} images, got {k} (shape {images.shape}).")
  b = len(lead)
  x = images.reshape(*lead, n, n, h, w, c)                    # (..., a1, a2, H, W, C)
  x = x.transpose(*range(b), b + 1, b + 2, b, b + 3, b + 4)   # (..., a2, H, a1, W, C)
  return x.reshape(*lead, n * h, n * w, c)


def _avg_pool(maps: jax.Array, size: int) -> jax.Array:
  """torch's F.avg_pool2d(maps, size, stride=1, padding=(size - 1) // 2) with its
  default count_include_pad=True: zero padding counts in the mean."""
  p = (size - 1) // 2
  window = (1,) * (maps.ndim - 2) + (size, size)
  padding = ((0, 0),) * (maps.ndim - 2) + ((p, p), (p, p))
  summed = jax.lax.reduce_window(maps, 0.0, jax.lax.add, window, (1,) * maps.ndim, padding)
  return summed / (size * size)


@jax.jit(static_argnames=("n", "smooth"))
def localisation_scores(maps: jax.Array, n: int, smooth: int = 1) -> jax.Array:
  """(G, n*n, n*H, n*W) maps -> (G, n*n) scores: maps[g, k], the attribution for the
  class of image k of grid g (summed over channels), scored on cell k.

  smooth > 1 (B-cos's --smooth, odd) first averages the map over a smooth x smooth
  window with zero padding counted, before the clamp.
  """
  g, k, gh, gw = maps.shape
  if k != n * n or gh % n or gw % n:
    raise ValueError(f"localisation_scores: maps must be (G, {n * n}, {n}*H, {n}*W) for "
                     f"{n}x{n} grids, got {maps.shape}.")
  if smooth < 1 or smooth % 2 == 0:
    raise ValueError(f"localisation_scores: smooth must be odd and >= 1 (1 for none), got "
                     f"{smooth}; an even window would shift the map against the cells.")
  maps = maps.astype(jnp.float32)
  if smooth > 1:
    maps = _avg_pool(maps, smooth)
  a = jnp.maximum(maps, 0.0)
  cells = a.reshape(g, k, n, gh // n, n, gw // n).sum(axis=(3, 5))  # (G, K, row, col)
  cells = jnp.swapaxes(cells, 2, 3).reshape(g, k, k)               # cell n*col + row
  own = jnp.diagonal(cells, axis1=1, axis2=2)
  total = cells.sum(axis=2)
  return jnp.where(total > 0, own / jnp.where(total > 0, total, 1.0), 0.0)


def localisation(attribute_fn: Callable, images, grids: Grids, n: int, smooth: int = 1,
                 batch_size: int = 8) -> np.ndarray:
  """(G, n*n) scores: every grid is tiled from `images` (N, H, W, C) and explained
  whole, for the classes of its n*n images at once, `batch_size` grids a call:
  attribute_fn(x (B, n*H, n*W, C), classes (B, n*n)) -> (B, n*n, n*H, n*W)."""
  images, scores = np.asarray(images), []
  for start in range(0, len(grids.indices), batch_size):
    batch = slice(start, start + batch_size)
    x = tile(images[grids.indices[batch]], n)
    maps = attribute_fn(jnp.asarray(x), jnp.asarray(grids.classes[batch]))
    scores.append(np.asarray(localisation_scores(maps, n, smooth)))
  return np.concatenate(scores)


# ----------------------------------------------------------------------------
# Pixel removal.
# ----------------------------------------------------------------------------


def removal_schedule(height: int, width: int, fraction: float = 0.25,
                     points: int = 128) -> np.ndarray:
  """The numbers of removed pixels at which the model is evaluated.

  As the original: max_idx = int(fraction*H*W), stride = max_idx // points, and
  every count 0, stride, ... up to max_idx: for 32x32, 0, 2, ..., 256 (129 points).
  When max_idx < points the original's stride is 0 (a modulo by zero); here it is
  1, i.e. every count 0..max_idx. When points does not divide max_idx there are
  more than points + 1 counts, as in the original (28x28: stride 1, 197 counts).
  """
  max_idx = int(fraction * height * width)
  return np.arange(0, max_idx + 1, max(1, max_idx // points))


def removal_ranks(maps: jax.Array, order: str = "least") -> jax.Array:
  """(N, H, W) signed maps -> (N, H, W) int32: the step at which each pixel is
  removed (rank 0 first). "least" removes the lowest (most negative) values
  first, as np.argsort of the flattened map; "most" is the reversed order.
  The sort is stable (the original's np.argsort is not; ties are rare)."""
  if order not in ORDERS:
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
  n, h, w = maps.shape
  ranking = jnp.argsort(maps.reshape(n, h * w), axis=1, stable=True)
  if order == "most":
    ranking = ranking[:, ::-1]
  return jnp.argsort(ranking, axis=1).astype(jnp.int32).reshape(n, h, w)


@jax.jit(static_argnames=("model", "fill"))
def _removal_probs(model, variables, h, ranks, counts, targets, image, point, fill):
  """sigmoid(target logit) of image[j] with its first counts[point[j]] pixels removed."""
  keep = ranks[image] >= counts[point][:, None, None]           # (B, H, W)
  c = h.shape[-1] // 2
  value = jnp.zeros(2 * c) if fill == "encoded_zero" else jnp.repeat(jnp.array([0.0, 1.0]), c)
  masked = jnp.where(keep[..., None], h[image], value)          # [0, 1] encodes RGB 0.
  logits = model.apply(variables, masked, method=models.CoDANet.encoded_logits)
  return jax.nn.sigmoid(jnp.take_along_axis(logits, targets[image][:, None], axis=1)[:, 0])


def pixel_removal_curves(model, variables, x, maps, targets, *, fraction: float,
                         points: int, order: str, fill: str, batch_size: int = 256,
                         on_images: Optional[Callable[[int], None]] = None) -> np.ndarray:
  """(N, P) sigmoid of the target logit after removing `removal_schedule` pixels.

  Args:
    model, variables: a `models.CoDANet` and its variables.
    x: images (N, H, W, C) in [0, 1]; the original uses the first 1024 test images.
    maps: (N, H, W) signed attributions for the targets, summed over channels,
      e.g. attribute_fn(x, targets[:, None])[:, 0].
    targets: (N,) int, the true classes.
    fraction, points: see `removal_schedule`; order: see `removal_ranks`.
    fill: "encoded_zero" (original) sets all 2C channels of [x, 1 - x] to 0, so a
      removed pixel contributes exactly 0; "black" sets the pixel to RGB 0, [0, 1].
    batch_size: masked images per forward; the last batch is padded.
    on_images: called with the number of images whose curves are done, every
      `_BATCHES_PER_REPORT` batches (progress; the batches are the same).
  The mean over images (axis 0) is the original's stored curve.
  """
  if fill not in FILLS:
    raise ValueError(f"fill must be one of {FILLS}, got {fill!r}.")
  x, maps, targets = jnp.asarray(x), jnp.asarray(maps), jnp.asarray(targets)
  if maps.shape != x.shape[:3] or targets.shape != x.shape[:1]:
    raise ValueError(
        f"pixel_removal_curves: maps must be (N, H, W) = {x.shape[:3]} and targets (N,) = "
        f"{x.shape[:1]}; got {maps.shape} and {targets.shape}. Take one map per image, "
        "e.g. attribute_fn(x, targets[:, None])[:, 0].")
  counts = removal_schedule(x.shape[1], x.shape[2], fraction, points)
  h = model.apply(variables, x, method=models.CoDANet.encode)
  ranks = removal_ranks(maps, order)
  # Every (image, point) pair is one masked forward; a batch takes batch_size
  # consecutive pairs, so one compile serves all of them.
  image, point = np.divmod(np.arange(x.shape[0] * len(counts)), len(counts))
  fn = functools.partial(_removal_probs, model, variables, h, ranks, jnp.asarray(counts),
                         targets, fill=fill)
  # In segments of whole batches (the same batches as one call), fetched one
  # segment at a time, so that progress can be reported in between.
  segment, probs = batch_size * _BATCHES_PER_REPORT, []
  for start in range(0, len(image), segment):
    part = slice(start, start + segment)
    probs.append(batching.map_batches(fn, image[part], point[part], batch_size=batch_size))
    if on_images is not None:
      on_images(min(start + segment, len(image)) // len(counts))
  return np.concatenate(probs).reshape(x.shape[0], len(counts))


_BATCHES_PER_REPORT = 16  # Removal batches between progress reports.


# ----------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------


def score_summary(scores) -> dict:
  """Mean, median, quartiles and std of per-target scores (e.g. the 4,500
  localisation scores), as JSON-able floats."""
  s = np.asarray(scores, np.float64).ravel()
  q1, median, q3 = np.percentile(s, [25, 50, 75])
  return {"count": int(s.size), "mean": float(s.mean()), "median": float(median),
          "q1": float(q1), "q3": float(q3), "std": float(s.std())}


# The independent unit of each metric, for confidence intervals (codajax.bootstrap).
UNITS = {"localisation": "grids", "pixel_removal": "images"}


def unit_values(metric: str, scores) -> np.ndarray:
  """One value per independent unit, whose mean is the metric's headline: the
  mean score of each grid (its n*n scores share its images; scores (G, n*n)),
  or each image's value at the last removal point (curves (N, P))."""
  scores = np.asarray(scores, np.float64)
  return scores.mean(axis=1) if metric == "localisation" else scores[:, -1]


def curve_summary(curves, fraction: float = 0.25) -> dict:
  """Of removal curves (N, P) or their mean (P,): the mean curve, its mean over
  the P points ("curve area"), the first (unperturbed) and last (at `fraction`
  of the pixels removed) values, as JSON-able floats."""
  curves = np.asarray(curves, np.float64)
  mean = curves.mean(axis=0) if curves.ndim == 2 else curves
  return {"curve": [float(v) for v in mean], "curve_mean": float(mean.mean()),
          "first": float(mean[0]), "last": float(mean[-1]), "fraction": float(fraction)}
