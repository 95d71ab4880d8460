"""Tests for codajax.metrics: the localisation score and its grid layout, the
grid selection against a transcription of the authors' code, pixel removal
against the contributions at the masked input, and the summaries."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import architectures
from codajax import config_lib
from codajax import explain
from codajax import metrics
from codajax import models

# The removal settings of the evaluation's config (the authors'), less `points`.
AUTHORS_REMOVAL = {k: config_lib.evaluation_config()[k] for k in ("fraction", "order", "fill")}


# ----------------------------------------------------------------------------
# Localisation scores.
# ----------------------------------------------------------------------------


def cell_slices(k: int, n: int, height: int, width: int) -> tuple[slice, slice]:
  """Rows and columns of cell k in an (n*height, n*width) grid: row k % n, column k // n."""
  row, col = k % n, k // n
  return slice(row * height, (row + 1) * height), slice(col * width, (col + 1) * width)


def untile(grid, n: int):
  """The inverse of `metrics.tile`: (..., n*H, n*W, C) -> (..., n*n, H, W, C)."""
  *lead, gh, gw, c = grid.shape
  h, w, b = gh // n, gw // n, len(lead)
  x = grid.reshape(*lead, n, h, n, w, c)                      # (..., a2, H, a1, W, C)
  x = x.transpose(*range(b), b + 2, b, b + 1, b + 3, b + 4)   # (..., a1, a2, H, W, C)
  return x.reshape(*lead, n * n, h, w, c)


def _cell_mask(k, n, h, w):
  mask = np.zeros((n * h, n * w), bool)
  mask[cell_slices(k, n, h, w)] = True
  return mask


@pytest.mark.parametrize("n", [2, 3])
def test_map_positive_in_one_cell_scores_one_there_and_zero_elsewhere(n):
  h, w = 4, 5
  rng = np.random.default_rng(n)
  maps = []
  for j in range(n * n):
    # Positive in cell j, negative everywhere else: the clamp removes the rest.
    m = np.where(_cell_mask(j, n, h, w), rng.uniform(0.1, 1, (n * h, n * w)),
                 -rng.uniform(0, 1, (n * h, n * w)))
    maps.append(np.broadcast_to(m, (n * n, n * h, n * w)))
  scores = metrics.localisation_scores(jnp.asarray(np.stack(maps), jnp.float32), n)
  np.testing.assert_allclose(scores, np.eye(n * n), atol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_uniform_map_scores_one_over_n_squared(n):
  maps = jnp.full((2, n * n, 6 * n, 4 * n), 0.3)
  np.testing.assert_allclose(metrics.localisation_scores(maps, n), 1 / n**2, rtol=1e-6)


def test_zero_or_negative_map_scores_zero():
  maps = -jnp.abs(jax.random.normal(jax.random.key(0), (3, 9, 12, 12)))
  maps = maps.at[0].set(0.0)
  np.testing.assert_array_equal(metrics.localisation_scores(maps, 3), 0.0)


def _original_scores(maps, n):
  """The authors' lines, in numpy: clamp, avg_pool over the cells, permute(0, 1, 3, 2),
  torch.where(total * contribs > 0, contribs / total, 0), the diagonal."""
  g, k, gh, gw = maps.shape
  a = np.maximum(maps, 0)
  pooled = a.reshape(g, k, n, gh // n, n, gw // n).mean(axis=(3, 5))
  contribs = pooled.transpose(0, 1, 3, 2).reshape(g, k, -1)
  total = contribs.sum(-1, keepdims=True)
  ratio = np.where(total * contribs > 0, contribs / np.where(total > 0, total, 1), 0)
  return np.stack([r[np.arange(k), np.arange(k)] for r in ratio])


def test_scores_match_the_original_on_random_maps():
  maps = np.random.default_rng(0).normal(size=(4, 9, 24, 24)).astype(np.float32)
  np.testing.assert_allclose(metrics.localisation_scores(jnp.asarray(maps), 3),
                             _original_scores(maps, 3), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("smooth", [3, 5])
def test_smoothing_a_uniform_map_moves_mass_out_of_the_border_cells(smooth):
  # count_include_pad=True: pixel (r, c) of a uniform map becomes f(r) f(c) / s^2,
  # f the number of window rows inside the image, so a cell's mass is separable.
  n, h = 3, 6
  p = (smooth - 1) // 2
  f = np.array([min(r + p, n * h - 1) - max(r - p, 0) + 1 for r in range(n * h)])
  band = f.reshape(n, h).sum(1)                      # per grid row (= per column)
  mass = np.outer(band, band)                        # [row, col]
  expected = np.array([mass[k % n, k // n] for k in range(n * n)]) / mass.sum()
  scores = metrics.localisation_scores(jnp.ones((1, n * n, n * h, n * h)), n, smooth)
  np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
  assert scores[0, 4] > 1 / 9 > scores[0, 0]  # The centre gains, the corners lose.


def test_smoothing_is_before_the_clamp_and_matches_a_direct_average():
  n, s = 2, 3
  maps = np.random.default_rng(1).normal(size=(2, 4, 10, 10)).astype(np.float32)
  padded = np.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1)))
  pooled = sum(padded[..., dy:dy + 10, dx:dx + 10] for dy in range(s) for dx in range(s)) / s**2
  np.testing.assert_allclose(metrics.localisation_scores(jnp.asarray(maps), n, s),
                             _original_scores(pooled, n), rtol=1e-5, atol=1e-7)
  # smooth=1 is no smoothing.
  np.testing.assert_allclose(metrics.localisation_scores(jnp.asarray(maps), n, 1),
                             _original_scores(maps, n), rtol=1e-5, atol=1e-7)


def test_even_smoothing_window_is_an_error():
  with pytest.raises(ValueError, match="smooth must be odd"):
    metrics.localisation_scores(jnp.ones((1, 4, 8, 8)), 2, 2)


# ----------------------------------------------------------------------------
# Grid layout.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_tile_is_column_major_and_untile_inverts_it(n):
  h, w, c = 3, 4, 2
  images = np.random.default_rng(0).uniform(size=(2, n * n, h, w, c))
  grid = metrics.tile(images, n)
  chex.assert_shape(grid, (2, n * h, n * w, c))
  # The original, in NCHW: view(-1, n, n, C, H, W).permute(0, 3, 2, 4, 1, 5).
  nchw = images.transpose(0, 1, 4, 2, 3)
  original = nchw.reshape(-1, n, n, c, h, w).transpose(0, 3, 2, 4, 1, 5).reshape(
      -1, c, n * h, n * w)
  np.testing.assert_array_equal(grid, original.transpose(0, 2, 3, 1))
  for k in range(n * n):
    rows, cols = cell_slices(k, n, h, w)
    assert (rows.start, cols.start) == ((k % n) * h, (k // n) * w)
    np.testing.assert_array_equal(grid[:, rows, cols], images[:, k])
  np.testing.assert_array_equal(untile(grid, n), images)


# ----------------------------------------------------------------------------
# Grid selection.
# ----------------------------------------------------------------------------


def _original_grids(logits, labels, n_imgs, sample_size):
  """A direct transcription of LocalisationAnalyser's compute_sorted_confs,
  get_sorted_indices and make_multi_image (the global numpy RNG, seed 42)."""
  confs = {c: [] for c in range(logits.shape[1])}
  for idx, (row, gt) in enumerate(zip(logits, labels)):
    if row.argmax() != gt:
      continue
    confs[int(gt)].append((idx, float(row.max())))
  confs = {k: sorted(v, key=lambda x: x[1], reverse=True) for k, v in confs.items()}
  sigmoid = lambda v: 1 / (1 + np.exp(-np.float32(v)))
  idcs, classes = [], np.array(list(confs))
  indexer = {k: 0 for k in classes}
  conf_mask = lambda c: sigmoid(confs[c][indexer[c]][1]) > .5
  mask = np.array([conf_mask(k) for k in classes])
  state = np.random.get_state()
  np.random.seed(42)
  while mask.sum() > n_imgs:
    for c in np.random.choice(classes[mask], size=n_imgs, replace=False):
      img_idx, _ = confs[c][indexer[c]]
      indexer[c] += 1
      mask[c] = conf_mask(c) if indexer[c] < len(confs[c]) else False
      idcs.append(img_idx)
  np.random.set_state(state)
  grids, offset = [], 0
  for _ in range(sample_size):
    tgts, imgs, count, i = [], [], 0, 0
    while count < n_imgs:
      idx = idcs[i + offset]
      i += 1
      if labels[idx] in tgts:
        continue
      imgs.append(idx)
      tgts.append(labels[idx])
      count += 1
    grids.append(imgs)
    offset = i + offset + 1
  return np.array(grids), np.array(idcs)


def _test_split(seed=0, n=3000, k=10):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k)).astype(np.float32) - 1.0
  logits[np.arange(n), labels] += rng.uniform(0, 3, n).astype(np.float32)
  return logits, labels


@pytest.mark.parametrize("n", [2, 3])
def test_grid_selection_reproduces_the_original_with_its_skip(n):
  logits, labels = _test_split()
  expected, _ = _original_grids(logits, labels, n * n, 40)
  grids = metrics.select_grids(logits, labels, n, 40)
  np.testing.assert_array_equal(grids.indices, expected)
  np.testing.assert_array_equal(grids.classes, labels[expected])


def test_grid_selection_without_the_skip_lines_up_with_the_blocks():
  logits, labels = _test_split()
  _, blocks = _original_grids(logits, labels, 9, 1)
  clean = metrics.select_grids(logits, labels, 3, 40, skip_bug=False)
  np.testing.assert_array_equal(clean.indices, blocks[:360].reshape(40, 9))
  buggy = metrics.select_grids(logits, labels, 3, 40)
  assert (clean.indices != buggy.indices).any()


@pytest.mark.parametrize("conf_thresh", [0.5, 0.8])
def test_grids_have_distinct_classes_and_confident_images_in_decreasing_order(conf_thresh):
  logits, labels = _test_split(seed=1)
  grids = metrics.select_grids(logits, labels, 3, 40, conf_thresh=conf_thresh)
  used = grids.indices.ravel()
  for row in grids.classes:
    assert len(set(row)) == 9
  assert len(set(used)) == used.size                         # No image twice.
  np.testing.assert_array_equal(logits[used].argmax(1), labels[used])  # Correct only.
  own = logits[used, labels[used]]
  assert (1 / (1 + np.exp(-own)) > conf_thresh).all()
  # The test split has correct images that the threshold must keep out.
  correct = logits.argmax(1) == labels
  assert (correct & (logits.max(1) <= 0)).any()
  for c in range(10):                                        # Per class, grid by grid.
    values = own[labels[used] == c]
    assert (np.diff(values) <= 0).all()


def test_too_many_grids_is_an_error_that_names_the_fix():
  logits, labels = _test_split(n=200)
  with pytest.raises(ValueError, match="make only .* ask for fewer grids"):
    metrics.select_grids(logits, labels, 3, 500)


# ----------------------------------------------------------------------------
# Localisation end to end, with the model's own explanations.
# ----------------------------------------------------------------------------


def test_localisation_of_grids_agrees_with_one_class_at_a_time(perturbed_init):
  model = models.tiny(temperature=10.0)
  variables = perturbed_init(model, (1, 8, 8, 3))
  images = np.random.default_rng(0).uniform(size=(12, 8, 8, 3)).astype(np.float32)
  grids = metrics.Grids(np.arange(12).reshape(3, 4),
                           np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]))
  attribute = jax.jit(functools.partial(explain.contribution_maps, model, variables))
  scores = metrics.localisation(attribute, images, grids, 2, batch_size=3)
  chex.assert_shape(scores, (3, 4))
  for g in range(3):
    x = metrics.tile(images[grids.indices[g]], 2)[None]
    for k in range(4):
      a = np.maximum(np.asarray(attribute(jnp.asarray(x), grids.classes[g, k:k + 1]))[0, 0], 0)
      np.testing.assert_allclose(scores[g, k], a[_cell_mask(k, 2, 8, 8)].sum() / a.sum(),
                                 rtol=1e-5)


# ----------------------------------------------------------------------------
# Pixel removal.
# ----------------------------------------------------------------------------


def test_removal_schedule():
  np.testing.assert_array_equal(metrics.removal_schedule(32, 32), np.arange(0, 257, 2))
  assert len(metrics.removal_schedule(32, 32)) == 129
  assert len(metrics.removal_schedule(224, 224)) == 129      # stride 98
  # max_idx = 16 < 128: the original's stride would be 0; here every count.
  np.testing.assert_array_equal(metrics.removal_schedule(8, 8), np.arange(17))
  # 28x28: max_idx 196, stride 1, all 197 counts, as the original's masks.
  assert len(metrics.removal_schedule(28, 28)) == 197


def test_removal_ranks_follow_argsort_and_most_reverses_it():
  maps = np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32)
  maps[0, 0, :3] = 0.0                                       # A tie, ranked stably.
  least = np.asarray(metrics.removal_ranks(jnp.asarray(maps)))
  most = np.asarray(metrics.removal_ranks(jnp.asarray(maps), "most"))
  for i in range(3):
    order = np.argsort(maps[i].ravel(), kind="stable")
    np.testing.assert_array_equal(least[i].ravel()[order], np.arange(30))
    np.testing.assert_array_equal(most[i].ravel()[order[::-1]], np.arange(30))


_contribution_maps = jax.jit(explain.contribution_maps, static_argnums=0)


class _EncodedInputNet(models.CoDANet):
  """The same net fed inputs that are already encoded: `explain` then takes its
  linear map at a masked input [x, 1 - x] * mask, which no image encodes to."""

  def encode(self, h):
    return h


def _encoded(x):
  return np.concatenate([x, 1 - x], axis=-1)


def test_removed_pixels_contribute_nothing_and_the_curve_is_the_masked_logit(perturbed_init):
  # Removing pixels changes the dynamic weights, so the masked logit is not the
  # logit minus the removed pixels' contributions at the full image. What holds
  # exactly: at the masked input, the removed pixels' contributions are 0 and
  # all contributions sum to the masked logit minus the bias.
  model = models.tiny(temperature=10.0)
  variables = perturbed_init(model, (1, 8, 8, 3))
  x = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  targets = np.array([2, 7, 0])
  maps = _contribution_maps(model, variables, x, targets[:, None])[:, 0]
  curves = metrics.pixel_removal_curves(model, variables, x, maps, targets, points=8,
                                        batch_size=7, **AUTHORS_REMOVAL)
  counts = metrics.removal_schedule(8, 8, points=8)
  np.testing.assert_array_equal(counts, np.arange(0, 17, 2))
  chex.assert_shape(curves, (3, 9))
  logits = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(curves[:, 0], jax.nn.sigmoid(logits[np.arange(3), targets]),
                             rtol=1e-6)
  # The masked inputs, built here from np.argsort.
  order = np.argsort(np.asarray(maps).reshape(3, -1), axis=1, kind="stable")
  keep = np.ones((3, 9, 64), np.float32)
  for i in range(3):
    for p, count in enumerate(counts):
      keep[i, p, order[i, :count]] = 0
  h = (_encoded(x)[:, None] * keep.reshape(3, 9, 8, 8, 1)).reshape(27, 8, 8, 6)
  net = _EncodedInputNet(**architectures.tiny(10), temperature=10.0)
  e = jax.jit(explain.explain, static_argnums=0)(net, variables, h,
                                                  np.repeat(targets, 9)[:, None])
  contributions = np.asarray(e.contributions)[:, 0].reshape(3, 9, 64, 6)
  assert (contributions[keep == 0] == 0).all()
  assert (np.abs(contributions[keep == 1]).sum(-1) > 0).all()
  masked_logits = np.asarray(e.logits)[np.arange(27), np.repeat(targets, 9)].reshape(3, 9)
  np.testing.assert_allclose(contributions.sum((2, 3)) + model.logit_bias, masked_logits,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(curves, jax.nn.sigmoid(masked_logits), rtol=1e-5, atol=1e-6)
  # And the encoded forward is the same function as the model's.
  np.testing.assert_allclose(
      jax.jit(functools.partial(model.apply, method=models.CoDANet.encoded_logits))(
          variables, jnp.asarray(h)),
      e.logits, rtol=1e-5, atol=1e-6)


def test_black_fill_and_most_order_change_the_curve(perturbed_init):
  model = models.tiny(temperature=10.0)
  variables = perturbed_init(model, (1, 8, 8, 3))
  x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  targets = np.array([1, 4])
  maps = _contribution_maps(model, variables, x, targets[:, None])[:, 0]
  run = functools.partial(metrics.pixel_removal_curves, model, variables, x, maps,
                          targets, points=8, **AUTHORS_REMOVAL)
  least, black, most = run(), run(fill="black"), run(order="most")
  for other in (black, most):
    np.testing.assert_array_equal(other[:, 0], least[:, 0])
    assert np.abs(other[:, 1:] - least[:, 1:]).min() > 1e-7
  # Black is RGB 0: the image with its pixels set to 0, through the model's own forward.
  order = np.argsort(np.asarray(maps).reshape(2, -1), axis=1, kind="stable")
  darkened = x.reshape(2, 64, 3).copy()
  for i in range(2):
    darkened[i, order[i, :16]] = 0
  last = jax.nn.sigmoid(jax.jit(model.apply)(variables, darkened.reshape(2, 8, 8, 3)))
  np.testing.assert_allclose(black[:, -1], last[np.arange(2), targets], rtol=1e-5)


def test_pixel_removal_reports_images_done_and_gives_the_same_curves(perturbed_init,
                                                                    monkeypatch):
  model = models.tiny(temperature=10.0)
  variables = perturbed_init(model, (1, 8, 8, 3))
  x = np.random.default_rng(2).uniform(size=(5, 8, 8, 3)).astype(np.float32)
  targets = np.array([1, 4, 0, 2, 3])
  maps = _contribution_maps(model, variables, x, targets[:, None])[:, 0]
  run = functools.partial(metrics.pixel_removal_curves, model, variables, x, maps,
                          targets, points=8, batch_size=4, **AUTHORS_REMOVAL)
  whole = run()  # 5 images x 9 points = 45 pairs: 12 batches, one segment.
  monkeypatch.setattr(metrics, "_BATCHES_PER_REPORT", 2)  # Segments of 8 pairs.
  reports = []
  np.testing.assert_array_equal(run(on_images=reports.append), whole)
  assert reports == [0, 1, 2, 3, 4, 5] and whole.shape == (5, 9)  # 8, 16, ... of 45 pairs.


def test_pixel_removal_rejects_unsummed_maps_and_unknown_fill(perturbed_init):
  model = models.tiny()
  variables = perturbed_init(model, (1, 8, 8, 3))
  x = np.zeros((2, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match=r"maps must be \(N, H, W\)"):
    metrics.pixel_removal_curves(model, variables, x, np.zeros((2, 1, 8, 8)), [0, 1],
                                 points=8, **AUTHORS_REMOVAL)
  with pytest.raises(ValueError, match="fill must be one of"):
    metrics.pixel_removal_curves(model, variables, x, np.zeros((2, 8, 8)), [0, 1],
                                 points=8, **{**AUTHORS_REMOVAL, "fill": "gray"})


# ----------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------


def test_summaries_are_json_and_right():
  s = metrics.score_summary(np.array([[4.0, 0.0], [2.0, 1.0], [3.0, 3.0]]))
  assert (s["count"], s["mean"], s["median"], s["q1"], s["q3"]) == (6, 13 / 6, 2.5, 1.25, 3.0)
  c = metrics.curve_summary(np.array([[1.0, 0.5, 0.0], [0.5, 0.5, 1.0]]))
  assert c["curve"] == [0.75, 0.5, 0.5]
  assert (c["first"], c["last"]) == (0.75, 0.5)
  assert c["curve_mean"] == pytest.approx(1.75 / 3)
  json.dumps([s, c])
