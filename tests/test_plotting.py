"""Tests of codajax.plotting: what each figure draws, counted on its axes."""

import matplotlib

matplotlib.use("Agg")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import architectures
from codajax import config_lib
from codajax import models
from codajax import plotting


def drawn(fig):
  """(number of axes, [(cmap name, title) of every image drawn])."""
  return len(fig.axes), [(im.get_cmap().name, ax.get_title())
                         for ax in fig.axes for im in ax.get_images()]


def test_each_image_once_and_a_predicted_map_only_when_wrong():
  rng = np.random.RandomState(0)
  images = rng.uniform(size=(4, 8, 8, 1))
  maps = rng.normal(size=(4, 2, 8, 8))
  fig = plotting.plot_true_and_predicted(images, maps, labels=[0, 1, 2, 3], preds=[0, 1, 5, 3],
                                         names=[f"c{i}" for i in range(10)])
  num_axes, images_drawn = drawn(fig)
  assert num_axes == 4 + 4 + 1
  assert [cmap for cmap, _ in images_drawn].count("gray") == 4  # Each image once.
  assert [title for cmap, title in images_drawn if cmap == "bwr"] == [
      "true: c0", "true: c1", "true: c2", "pred: c5", "true: c3"]
  plotting.save(fig, "/dev/null")


def test_all_correct_predictions_draw_no_predicted_maps():
  rng = np.random.RandomState(1)
  fig = plotting.plot_true_and_predicted(rng.uniform(size=(3, 8, 8, 3)),
                                         rng.normal(size=(3, 2, 8, 8)), labels=[2, 0, 1],
                                         preds=[2, 0, 1], names="abc")
  num_axes, images_drawn = drawn(fig)
  assert num_axes == 6 and len(images_drawn) == 6
  assert [title for _, title in images_drawn if title] == ["true: c", "true: a", "true: b"]
  plotting.save(fig, "/dev/null")


@pytest.fixture
def tiny_net():
  model = models.from_config(config_lib.model_config(**architectures.tiny(10), temperature=10.0))
  images = np.random.RandomState(2).uniform(size=(4, 8, 8, 1)).astype(np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(images))["params"]
  return model, params, images


def test_write_explanations_draws_the_true_and_only_the_wrong_predicted_maps(
    tiny_net, tmp_path, monkeypatch):
  model, params, images = tiny_net
  preds = np.asarray(jnp.argmax(model.apply({"params": params}, images), -1))
  labels = preds.copy()
  labels[1] = (preds[1] + 1) % 10  # One wrong prediction.
  figures, real_save = {}, plotting.save

  def save(fig, path):
    figures[path.rsplit("/", 1)[-1]] = drawn(fig)
    return real_save(fig, path)

  monkeypatch.setattr(plotting, "save", save)
  paths = plotting.write_explanations(model, params, images, labels, (), str(tmp_path / "out"))
  assert [p.rsplit("/", 1)[-1] for p in paths] == ["contribution_maps.png", "linear_maps.png"]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  num_axes, images_drawn = figures["contribution_maps.png"]
  assert num_axes == 2 * 4 + 1 and len(images_drawn) == 2 * 4 + 1
  assert [cmap for cmap, _ in images_drawn].count("gray") == 4
  assert f"pred: {preds[1]}" in [title for _, title in images_drawn]
  num_axes, images_drawn = figures["linear_maps.png"]
  assert num_axes == 4 and len(images_drawn) == 4  # One linear map per image.


def test_linear_map_image_is_rgba_with_alpha_in_unit_range():
  rng = np.random.RandomState(3)
  image = plotting.linear_map_image(rng.normal(size=(5, 6, 6)), rng.uniform(size=(5, 6, 6)))
  assert image.shape == (5, 6, 4)
  assert 0.0 <= image[..., 3].min() and image[..., 3].max() <= 1.0
