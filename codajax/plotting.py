"""Matplotlib figures of explanations (see `codajax.explain`).

`write_explanations` makes the figures the trainer writes for a few test
images; the `plot_*` functions make one figure each from arrays. Every figure
says what it shows on its own: colour bars name their quantity and class
(red supports, blue opposes, symmetric around 0), titles name the classes, and
a caption line under the figure says what the maps are. Images and maps are
drawn on the same extent with nearest-neighbour pixels, so that they line up
pixel for pixel whatever their resolutions.
"""

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from matplotlib import cm
from matplotlib import colors
from matplotlib import patches
import matplotlib.pyplot as plt  # Headless machines fall back to Agg by themselves.
import numpy as np

from codajax import batching
from codajax import explain

SIGN = "red supports, blue opposes"
CONTRIBUTION_CAPTION = (
    "Contribution map: each pixel's share w·x of the class's logit (the network is linear in "
    "its input, W(x)·x, so the shares sum to logit − bias).\n"
    f"{SIGN.capitalize()}; each map has its own colour scale, symmetric around 0 "
    "(its 99.5th percentile of |value|).")
LINEAR_CAPTION = (
    "Linear map: the row of the network's composed dynamic matrix W(x) for the predicted "
    "class, shown where it contributes positively (w·x > 0), normalised per image.")
# A grey input's two encoded channels [x, 1 - x] (`linear_map_image`): what
# ink (bright pixels) and blank (dark pixels) contribute get a colour each.
INK, BLANK = np.array([0.85, 0.33, 0.0]), np.array([0.0, 0.45, 0.70])
GREY_KEY = "Orange: bright pixels (ink) support the class; blue: dark pixels (blank) support it."
RGB_KEY = "Colour: the input colour the weights align with; opacity: the contribution."


def map_limits(maps: np.ndarray, shared: bool = False, percentile: float = 99.5):
  """Symmetric colour limits per map (or one shared limit), robust to outliers."""
  maps = np.asarray(maps, np.float32)
  flat = np.abs(maps.reshape(maps.shape[0], -1)) if maps.ndim > 2 else np.abs(maps)[None].reshape(1, -1)
  lim = np.percentile(flat, percentile, axis=-1) + 1e-12
  return np.full_like(lim, lim.max()) if shared else lim


def linear_map_image(linear_map: np.ndarray, layer_input: np.ndarray,
                     percentile: float = 99.5) -> np.ndarray:
  """RGBA image of a layer-0 linear map (H, W, 2C) for its encoded input (H, W, 2C).

  For C > 1 each pixel's 2C-vector w, negatives clamped, gives the colour
  w[:C] / (w[:C] + w[C:]) (the paper's: the colour the weights align with).
  For C = 1 that colour is a grey level, which a white or black background
  hides; the colour mixes `INK` and `BLANK` instead by the share of the
  pixel's positive contribution that comes from x (ink) rather than 1 - x.
  Alpha is the positive contribution sum_c w_c x_c, divided by its
  `percentile` over the image and clipped to [0, 1].
  """
  w = np.asarray(linear_map, np.float32)
  c = w.shape[-1] // 2
  parts = w * np.asarray(layer_input, np.float32)
  contrib = parts.sum(-1)
  if c == 1:  # The share of the positive contribution that the ink channel x gives.
    parts = np.maximum(parts, 0.0)
    ink = parts[..., :1] / (parts[..., :1] + parts[..., 1:] + 1e-12)
    rgb = ink * INK + (1.0 - ink) * BLANK
  else:
    w = np.maximum(w, 0.0)
    rgb = w[..., :c] / (w[..., :c] + w[..., c:] + 1e-12)
  pos = np.maximum(contrib, 0.0)
  alpha = np.clip(pos / (np.percentile(pos, percentile) + 1e-12), 0.0, 1.0)
  return np.concatenate([rgb[..., :3], alpha[..., None]], axis=-1)


def on_white(rgba: np.ndarray) -> np.ndarray:
  """An RGBA image composited over white: RGB in [0, 1]."""
  alpha = rgba[..., 3:]
  return rgba[..., :3] * alpha + (1.0 - alpha)


def _extent(shape) -> tuple:
  """The extent (left, right, bottom, top) of an (H, W, ...) array in its pixels."""
  return (-0.5, shape[1] - 0.5, shape[0] - 0.5, -0.5)


def _show_image(ax, image, extent=None) -> None:
  """`image` (H, W, C in [0, 1]) on `extent` (default: its own), pixels unsmoothed."""
  img = np.asarray(image, np.float32)
  gray = img.shape[-1] == 1
  ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1,
            interpolation="nearest", extent=extent or _extent(img.shape))


def _show_map(ax, contribution_map, lim, title=None, label=None):
  """A map in blue-white-red on [-lim, lim]; with `label`, a colour bar so named."""
  im = ax.imshow(contribution_map, cmap="bwr", vmin=-lim, vmax=lim, interpolation="nearest",
                 extent=_extent(np.shape(contribution_map)))
  if title is not None:
    ax.set_title(title, fontsize=8)
  if label is not None:
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03, ticks=[-lim, 0.0, lim])
    cb.ax.set_yticklabels([f"{-lim:.2g}", "0", f"{lim:.2g}"], fontsize=6)
    cb.set_label(label, fontsize=7)
  return im


def _caption(fig, text: str) -> None:
  """`text` under the figure's axes (`save` keeps it: bbox_inches="tight")."""
  fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=7, wrap=False)


def plot_contribution_maps(maps: np.ndarray, images: Optional[np.ndarray] = None,
                           titles: Optional[Sequence[str]] = None,
                           shared_scale: bool = False, ncols: Optional[int] = None,
                           cell: float = 2.0, label: str = "contribution"):
  """Contribution maps (M, H, W) in blue-white-red centred at 0, each with a
  colour bar named `label` (one for all with `shared_scale`: same limits).

  With `images` (M, H_i, W_i, C in [0, 1]) each map is shown right of its
  image, both on the map's extent (an image of another resolution, e.g. the
  input beside a deeper layer's map, is stretched to line up). Returns the Figure.
  """
  maps = np.asarray(maps, np.float32)
  m = maps.shape[0]
  lims = map_limits(maps, shared_scale)
  per = 2 if images is not None else 1
  ncols = ncols or min(m, 4)
  nrows = int(np.ceil(m / ncols))
  fig, axes = plt.subplots(nrows, ncols * per, figsize=(cell * 1.15 * ncols * per, cell * nrows),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for i in range(m):
    r, col = divmod(i, ncols)
    if images is not None:
      _show_image(axes[r, col * per], images[i], _extent(maps[i].shape))
    im = _show_map(axes[r, col * per + per - 1], maps[i], lims[i],
                   None if titles is None else titles[i], None if shared_scale else label)
  if shared_scale:
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6).set_label(f"{label} ({SIGN})")
  else:
    fig.tight_layout()
  _caption(fig, f"{SIGN.capitalize()}; colour scales symmetric around 0"
           + (", shared." if shared_scale else ", one per map."))
  return fig


def plot_linear_maps(linear_maps: np.ndarray, layer_inputs: np.ndarray,
                     titles: Optional[Sequence[str]] = None, cell: float = 2.0):
  """Layer-0 linear maps (M, H, W, 2C) on white (see `linear_map_image`), each
  under its input (layer_inputs[..., :C]), with a caption saying what they are."""
  m = len(linear_maps)
  c = np.shape(layer_inputs)[-1] // 2
  fig, axes = plt.subplots(2, m, figsize=(cell * m, cell * 2.1), squeeze=False)
  for i in range(m):
    _show_image(axes[0, i], np.asarray(layer_inputs[i])[..., :c])
    axes[1, i].imshow(on_white(linear_map_image(linear_maps[i], layer_inputs[i])),
                      interpolation="nearest", extent=_extent(np.shape(linear_maps[i])))
    if titles is not None:
      axes[0, i].set_title(titles[i], fontsize=8)
  axes[0, 0].set_ylabel("input", fontsize=8)
  axes[1, 0].set_ylabel("linear map", fontsize=8)
  for ax in axes.flat:
    ax.set_xticks([]); ax.set_yticks([])  # pylint: disable=multiple-statements
  fig.tight_layout()
  _caption(fig, f"{LINEAR_CAPTION}\n{GREY_KEY if c == 1 else RGB_KEY}")
  return fig


def plot_true_and_predicted(images: np.ndarray, maps: np.ndarray, labels, preds,
                            names: Sequence[str], cell: float = 2.0):
  """One row per image: the image (titled with its true and predicted class),
  the contribution map of its true class and, only where the prediction is
  wrong, that of the predicted class; each map with its colour bar.

  images (N, H, W, C) in [0, 1]; maps (N, 2, H, W) for (true, predicted).
  Each map has its own symmetric colour limits. Returns the Figure.
  """
  maps = np.asarray(maps, np.float32)
  n, wrong = len(images), np.asarray(labels) != np.asarray(preds)
  ncols = 3 if wrong.any() else 2
  lims = map_limits(maps.reshape(-1, *maps.shape[2:])).reshape(n, 2)
  fig, axes = plt.subplots(n, ncols, figsize=(cell * 1.2 * ncols, cell * n), squeeze=False)
  for i in range(n):
    true, pred = names[labels[i]], names[preds[i]]
    _show_image(axes[i, 0], images[i], _extent(maps[i, 0].shape))
    axes[i, 0].set_title(f"true: {true}, predicted: {pred}" + (" (wrong)" if wrong[i] else ""),
                         fontsize=8)
    _show_map(axes[i, 1], maps[i, 0], lims[i, 0], f"true: {true}",
              f"contribution to class {true}")
    if wrong[i]:
      _show_map(axes[i, 2], maps[i, 1], lims[i, 1], f"pred: {pred}",
                f"contribution to class {pred}")
    elif ncols == 3:
      fig.delaxes(axes[i, 2])
  for ax in axes.flat:
    ax.axis("off")
  fig.tight_layout()
  h, w = maps.shape[2:]
  _caption(fig, f"{CONTRIBUTION_CAPTION}\nImages and maps on the network input's {h}x{w} "
           "pixels.")
  return fig


def write_explanations(model, params, images, labels, class_names: Sequence[str],
                       out_dir: str) -> list:
  """Figures of `model`'s explanations of `images`; returns their paths in out_dir.

  contribution_maps.png: `plot_true_and_predicted`. linear_maps.png: the
  layer-0 linear maps of the predicted classes (`plot_linear_maps`).
  `class_names` may be empty (the classes are then numbered).
  """
  os.makedirs(out_dir, exist_ok=True)
  variables = {"params": params}
  logits = batching.forward(model, variables, images)
  preds = np.asarray(jnp.argmax(logits, -1))
  classes = np.stack([labels, preds], axis=1)
  e = jax.jit(explain.explain, static_argnums=0)(model, variables, images, classes)
  names = class_names or tuple(map(str, range(logits.shape[-1])))
  paths = [save(plot_true_and_predicted(images, np.asarray(e.contributions.sum(-1)), labels,
                                        preds, names),
                os.path.join(out_dir, "contribution_maps.png"))]
  paths.append(save(plot_linear_maps(
      np.asarray(e.linear_map[:, 1]), np.asarray(e.layer_input),
      [f"true: {names[t]}, pred: {names[p]}" for t, p in zip(labels, preds)]),
      os.path.join(out_dir, "linear_maps.png")))
  return paths


def save(fig, path: str) -> str:
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


# ------------------------------------------------- interpretability evaluation
# (--mode evaluate, codajax.evaluation)

METHOD_LABELS = {"ours": "Ours", "grad": "Grad", "ixg": "IxG", "intgrad": "IntGrad",
                 "deeplift": "DeepLIFT", "gradcam": "GradCAM", "occ5": "Occ5",
                 "occ9": "Occ9", "rise": "RISE", "lime": "LIME"}


def plot_localisation(scores: dict, path: str, n: int,
                      intervals: Optional[dict] = None) -> str:
  """Box plots of the localisation scores per method, sorted by mean, with the
  Oracle (1) and Uniform (1/n^2) lines, as the authors' notebook (no fliers).
  Each tick names its method's n (grids and scores). `intervals` {method:
  (mean, low, high)}: the mean (a diamond) and its 95% CI (a bar) beside each
  box; low/high None draws the mean alone."""
  order = sorted(scores, key=lambda m: -np.nanmean(scores[m]))
  fig, ax = plt.subplots(figsize=(1.1 * len(order) + 2, 3.8))
  ax.boxplot([np.ravel(scores[m]) for m in order], showfliers=False, whis=1.5)
  for i, m in enumerate(order, 1):
    mean, low, high = (intervals or {}).get(m, (float(np.nanmean(scores[m])), None, None))
    err = None if low is None else [[mean - low], [high - mean]]
    ax.errorbar(i + 0.3, mean, yerr=err, fmt="D", color="k", ms=4, capsize=3, lw=1,
                label=("mean, 95% CI" if err is not None else "mean") if i == 1 else None)
  ax.set_xticks(range(1, len(order) + 1), [
      f"{METHOD_LABELS.get(m, m)}\nn={np.shape(scores[m])[0]} grids\n({np.size(scores[m])} scores)"
      for m in order], fontsize=8)
  ax.axhline(1.0, color="g", ls="--", lw=1, label="Oracle")
  ax.axhline(1.0 / n ** 2, color="r", ls="--", lw=1, label=f"Uniform (1/{n * n})")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel(f"Localisation ({n}x{n} grids)")
  ax.set_title("Share of positive attribution in the target cell (boxes: quartiles, "
               "whiskers: 1.5 IQR)", fontsize=9)
  ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.94), fontsize=7)  # Below Oracle.
  return save(fig, path)


def plot_pixel_removal(curves: dict, path: str, fraction: float,
                       bands: Optional[dict] = None) -> str:
  """The mean target-class probability against the % of pixels removed, least
  important first; `bands` {method: (low, high)}: its 95% CI per point, shaded.
  The title counts the images; the legend too where methods differ."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  images = {np.shape(v)[0] for v in curves.values()}
  for m in sorted(curves, key=lambda m: -np.mean(curves[m])):
    mean = np.asarray(curves[m]).mean(axis=0)
    x = np.linspace(0, 100 * fraction, len(mean))
    name = METHOD_LABELS.get(m, m)
    line, = ax.plot(x, mean, label=name if len(images) == 1 else f"{name} (n={len(curves[m])})")
    if bands and m in bands:
      ax.fill_between(x, *bands[m], color=line.get_color(), alpha=0.2, lw=0)
  count = f"{images.pop()} images" if len(images) == 1 else "n images per method"
  ax.set_xlabel("% of pixels removed (least important first)")
  ax.set_ylabel("True-class probability")
  ax.set_title(f"Pixel removal, least important first: mean over {count}"
               + (", 95% CI shaded" if bands else ""), fontsize=9)
  ax.legend(fontsize=8)
  return save(fig, path)


def _box_target(ax, grid_shape, n: int) -> None:
  """A rectangle around the top-left cell of an n x n grid (H, W, ...)."""
  h, w = grid_shape[0] / n, grid_shape[1] / n
  ax.add_patch(patches.Rectangle((-0.5, -0.5), w, h, fill=False, ec="lime",
                                            lw=2, label="target cell"))


def plot_comparison(grids: np.ndarray, maps: dict, class_names, path: str) -> str:
  """Per grid (rows): the grid image, then every method's map for the class of
  its first cell (top left, boxed in green on every panel), each on its own
  symmetric colour scale; `class_names` [grid][cell] names each cell's class."""
  methods = list(maps)
  fig, axes = plt.subplots(len(grids), len(methods) + 1,
                           figsize=(1.6 * (len(methods) + 1) + 0.6, 1.7 * len(grids)),
                           squeeze=False)
  for g, grid in enumerate(grids):
    n = int(round(np.sqrt(len(class_names[g]))))
    _show_image(axes[g, 0], grid)
    axes[g, 0].set_title(f"target: {class_names[g][0]}", fontsize=8)
    _box_target(axes[g, 0], np.shape(grid), n)
    for j, m in enumerate(methods, 1):
      target_map = np.asarray(maps[m][g, 0], np.float32)
      _show_map(axes[g, j], target_map, float(map_limits(target_map)[0]),
                METHOD_LABELS.get(m, m) if g == 0 else None)
      _box_target(axes[g, j], target_map.shape, n)
  for ax in axes.ravel():
    ax.set_axis_off()
  cb = fig.colorbar(cm.ScalarMappable(colors.Normalize(-1, 1), "bwr"),
                    ax=axes.ravel().tolist(), shrink=0.8, ticks=[-1, 0, 1])
  cb.ax.set_yticklabels(["−max", "0", "+max"], fontsize=7)
  cb.set_label(f"attribution to the target class\n({SIGN}; per map)", fontsize=7)
  _caption(fig, "Each row: a grid of test images and every method's map for the class of its "
           "boxed (top-left) cell.\nA good map puts its positive (red) attribution in the box.")
  return save(fig, path)
