"""Tests of codajax.plotting: what each figure draws, counted on its axes, and
that it says what it shows (colour bars naming the class, n, target cells)."""

import matplotlib

matplotlib.use("Agg")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from matplotlib import patches
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


def colour_bar_labels(fig):
  """The labels of the figure's colour bars (axes without images of their own)."""
  return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def caption(fig):
  return "\n".join(t.get_text() for t in fig.texts)


def test_each_image_once_and_a_predicted_map_only_when_wrong():
  rng = np.random.RandomState(0)
  images = rng.uniform(size=(4, 8, 8, 1))
  maps = rng.normal(size=(4, 2, 8, 8))
  fig = plotting.plot_true_and_predicted(images, maps, labels=[0, 1, 2, 3], preds=[0, 1, 5, 3],
                                         names=[f"c{i}" for i in range(10)])
  num_axes, images_drawn = drawn(fig)
  assert num_axes == 4 + 4 + 1 + (4 + 1)  # Images, maps, and a colour bar per map.
  assert [cmap for cmap, _ in images_drawn].count("gray") == 4  # Each image once.
  assert [title for cmap, title in images_drawn if cmap == "bwr"] == [
      "true: c0", "true: c1", "true: c2", "pred: c5", "true: c3"]
  assert "true: c2, predicted: c5 (wrong)" in [title for _, title in images_drawn]
  assert colour_bar_labels(fig) == [f"contribution to class c{k}" for k in (0, 1, 2, 5, 3)]
  assert "Red supports, blue opposes" in caption(fig)
  plotting.save(fig, "/dev/null")


def test_all_correct_predictions_draw_no_predicted_maps():
  rng = np.random.RandomState(1)
  fig = plotting.plot_true_and_predicted(rng.uniform(size=(3, 8, 8, 3)),
                                         rng.normal(size=(3, 2, 8, 8)), labels=[2, 0, 1],
                                         preds=[2, 0, 1], names="abc")
  num_axes, images_drawn = drawn(fig)
  assert num_axes == 6 + 3 and len(images_drawn) == 6
  assert [title for cmap, title in images_drawn if cmap == "bwr"] == [
      "true: c", "true: a", "true: b"]
  plotting.save(fig, "/dev/null")


def test_colour_scales_are_symmetric_around_zero_per_map():
  maps = np.stack([np.linspace(-1.0, 3.0, 64).reshape(8, 8), np.full((8, 8), -0.5)])
  fig = plotting.plot_contribution_maps(maps)
  lims = [im.get_clim() for ax in fig.axes for im in ax.get_images()]
  assert len(lims) == 2 and all(low == -high and high > 0 for low, high in lims)
  assert lims[0][1] > 2.9 and lims[1][1] == pytest.approx(0.5)
  assert colour_bar_labels(fig) == ["contribution", "contribution"]


def test_an_image_lines_up_with_a_map_of_another_resolution():
  """A 16x16 input beside an 8x8 (deeper layer's) map: both span the map's pixels."""
  rng = np.random.RandomState(4)
  fig = plotting.plot_contribution_maps(rng.normal(size=(2, 8, 8)),
                                        images=rng.uniform(size=(2, 16, 16, 1)))
  extents = [(im.get_cmap().name, im.get_extent()) for ax in fig.axes for im in ax.get_images()]
  assert [cmap for cmap, _ in extents] == ["gray", "bwr"] * 2
  assert {tuple(extent) for _, extent in extents} == {(-0.5, 7.5, 7.5, -0.5)}
  assert all(im.get_interpolation() == "nearest" for ax in fig.axes for im in ax.get_images())


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
    figures[path.rsplit("/", 1)[-1]] = drawn(fig), caption(fig)
    return real_save(fig, path)

  monkeypatch.setattr(plotting, "save", save)
  paths = plotting.write_explanations(model, params, images, labels, (), str(tmp_path / "out"))
  assert [p.rsplit("/", 1)[-1] for p in paths] == ["contribution_maps.png", "linear_maps.png"]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  (num_axes, images_drawn), _ = figures["contribution_maps.png"]
  assert num_axes == 2 * 4 + 1 + 5 and len(images_drawn) == 2 * 4 + 1  # + 5 colour bars.
  assert [cmap for cmap, _ in images_drawn].count("gray") == 4
  assert f"pred: {preds[1]}" in [title for _, title in images_drawn]
  (num_axes, images_drawn), text = figures["linear_maps.png"]
  assert num_axes == 2 * 4 and len(images_drawn) == 2 * 4  # Each input over its linear map.
  assert text.startswith("Linear map: the row of the network's composed dynamic matrix W(x)")


def test_linear_map_image_is_rgba_with_alpha_in_unit_range():
  rng = np.random.RandomState(3)
  image = plotting.linear_map_image(rng.normal(size=(5, 6, 6)), rng.uniform(size=(5, 6, 6)))
  assert image.shape == (5, 6, 4)
  assert 0.0 <= image[..., 3].min() and image[..., 3].max() <= 1.0


def test_grey_linear_map_is_bright_and_coloured_by_what_supports():
  """Ink (x = 1) supporting on the left half, blank (x = 0) on the right: on
  white, the strongest pixels are the saturated ink and blank colours, no
  pixel is dark, and the background without contribution stays white."""
  x = np.zeros((4, 4, 1), np.float32)
  x[:, :2] = 1.0
  w = np.zeros((4, 4, 2), np.float32)
  w[:, :2, 0] = 1.0     # Weight on x where there is ink: supports.
  w[:, 2:3, 1] = 1.0    # Weight on 1 - x where it is blank: supports.
  w[:, 3:, 0] = 1.0     # Weight on x where it is blank: contributes 0.
  rgb = plotting.on_white(plotting.linear_map_image(w, np.concatenate([x, 1 - x], -1)))
  np.testing.assert_allclose(rgb[:, :2], np.broadcast_to(plotting.INK, (4, 2, 3)), atol=1e-6)
  np.testing.assert_allclose(rgb[:, 2], np.broadcast_to(plotting.BLANK, (4, 3)), atol=1e-6)
  np.testing.assert_allclose(rgb[:, 3], 1.0)
  assert rgb.mean(-1).min() > 0.3  # Nothing near black.


def test_localisation_ticks_carry_n_and_the_mean_is_marked(tmp_path, monkeypatch):
  rng = np.random.RandomState(5)
  scores = {"ours": rng.uniform(size=(6, 4)), "ixg": rng.uniform(size=(5, 4))}
  figs = []
  monkeypatch.setattr(plotting, "save", lambda fig, path: figs.append(fig) or path)
  plotting.plot_localisation(scores, str(tmp_path / "l.png"), n=2)
  ax = figs[0].axes[0]
  ticks = {t.get_text().split("\n")[0]: t.get_text() for t in ax.get_xticklabels()}
  assert "n=6 grids" in ticks["Ours"] and "(24 scores)" in ticks["Ours"]
  assert "n=5 grids" in ticks["IxG"]
  means = sorted(line.get_ydata()[0] for line in ax.lines if line.get_marker() == "D")
  assert means == pytest.approx(sorted(float(v.mean()) for v in scores.values()))


def test_pixel_removal_says_the_order_and_how_many_images(tmp_path, monkeypatch):
  curves = {"ours": np.random.RandomState(6).uniform(size=(7, 5))}
  figs = []
  monkeypatch.setattr(plotting, "save", lambda fig, path: figs.append(fig) or path)
  plotting.plot_pixel_removal(curves, str(tmp_path / "p.png"), fraction=0.25)
  title = figs[0].axes[0].get_title()
  assert "least important first" in title and "7 images" in title


def test_comparison_boxes_the_target_cell_on_every_panel(tmp_path, monkeypatch):
  """2x2 grids of 8x8 cells: a rectangle over the top-left 8x8 on each panel."""
  rng = np.random.RandomState(7)
  grids = rng.uniform(size=(2, 16, 16, 1))
  maps = {m: rng.normal(size=(2, 4, 16, 16)) for m in ("ours", "ixg")}
  figs = []
  monkeypatch.setattr(plotting, "save", lambda fig, path: figs.append(fig) or path)
  plotting.plot_comparison(grids, maps, [["3", "1", "4", "1"], ["5", "9", "2", "6"]],
                           str(tmp_path / "c.png"))
  panels = [ax for ax in figs[0].axes if ax.get_images()]
  assert len(panels) == 2 * 3
  for ax in panels:
    (box,) = [p for p in ax.patches if isinstance(p, patches.Rectangle)]
    assert (box.get_xy(), box.get_width(), box.get_height()) == ((-0.5, -0.5), 8.0, 8.0)
  assert [ax.get_title() for ax in panels[::3]] == ["target: 3", "target: 5"]
  assert "attribution to the target class" in colour_bar_labels(figs[0])[0]
