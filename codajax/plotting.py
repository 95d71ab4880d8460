"""Matplotlib figures of explanations (see `codajax.explain`).

`write_explanations` makes the figures the trainer writes for a few test
images; the `plot_*` functions make one figure each from arrays.
"""

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt  # Headless machines fall back to Agg by themselves.
import numpy as np

from codajax import batching
from codajax import explain


def map_limits(maps: np.ndarray, shared: bool = False, percentile: float = 99.5):
  """Symmetric colour limits per map (or one shared limit), robust to outliers."""
  maps = np.asarray(maps, np.float32)
  flat = np.abs(maps.reshape(maps.shape[0], -1)) if maps.ndim > 2 else np.abs(maps)[None].reshape(1, -1)
  lim = np.percentile(flat, percentile, axis=-1) + 1e-12
  return np.full_like(lim, lim.max()) if shared else lim


def linear_map_image(linear_map: np.ndarray, layer_input: np.ndarray,
                     percentile: float = 99.5) -> np.ndarray:
  """RGBA image of a layer-0 linear map (H, W, 2C) for its encoded input (H, W, 2C).

  Each pixel's 2C-vector w is shown as RGB = w[:C] / (w[:C] + w[C:]) after
  clamping negatives (C = 1 gives grey); alpha is the positive contribution
  sum_c w_c x_c, scaled by its `percentile` and clipped to [0, 1].
  """
  w = np.asarray(linear_map, np.float32)
  c = w.shape[-1] // 2
  contrib = (w * np.asarray(layer_input, np.float32)).sum(-1)
  w = np.maximum(w, 0.0)
  rgb = w[..., :c] / (w[..., :c] + w[..., c:] + 1e-12)
  if c == 1:
    rgb = np.repeat(rgb, 3, axis=-1)
  pos = np.maximum(contrib, 0.0)
  alpha = np.clip(pos / (np.percentile(pos, percentile) + 1e-12), 0.0, 1.0)
  return np.concatenate([rgb[..., :3], alpha[..., None]], axis=-1)


def _show_image(ax, image) -> None:
  img = np.asarray(image, np.float32)
  gray = img.shape[-1] == 1
  ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1)


def _show_map(ax, contribution_map, lim, title=None):
  im = ax.imshow(contribution_map, cmap="bwr", vmin=-lim, vmax=lim)
  if title is not None:
    ax.set_title(title, fontsize=8)
  return im


def plot_contribution_maps(maps: np.ndarray, images: Optional[np.ndarray] = None,
                           titles: Optional[Sequence[str]] = None,
                           shared_scale: bool = False, ncols: Optional[int] = None,
                           cell: float = 2.0):
  """Contribution maps (M, H, W) in blue-white-red centred at 0.

  With `images` (M, H, W, C in [0, 1]) each map is shown next to its image.
  `shared_scale` gives every map the same colour limits. Returns the Figure.
  """
  maps = np.asarray(maps, np.float32)
  m = maps.shape[0]
  lims = map_limits(maps, shared_scale)
  per = 2 if images is not None else 1
  ncols = ncols or min(m, 4)
  nrows = int(np.ceil(m / ncols))
  fig, axes = plt.subplots(nrows, ncols * per, figsize=(cell * ncols * per, cell * nrows),
                           squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for i in range(m):
    r, col = divmod(i, ncols)
    if images is not None:
      _show_image(axes[r, col * per], images[i])
    im = _show_map(axes[r, col * per + per - 1], maps[i], lims[i],
                   None if titles is None else titles[i])
  if shared_scale:
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
  fig.tight_layout() if not shared_scale else None
  return fig


def plot_linear_maps(linear_maps: np.ndarray, layer_inputs: np.ndarray,
                     titles: Optional[Sequence[str]] = None, cell: float = 2.0):
  """Layer-0 linear maps (M, H, W, 2C) as colour images (see `linear_map_image`)."""
  m = len(linear_maps)
  fig, axes = plt.subplots(1, m, figsize=(cell * m, cell), squeeze=False)
  for i, ax in enumerate(axes[0]):
    ax.imshow(linear_map_image(linear_maps[i], layer_inputs[i]))
    ax.set_facecolor("black")
    ax.set_xticks([]); ax.set_yticks([])  # pylint: disable=multiple-statements
    if titles is not None:
      ax.set_title(titles[i], fontsize=8)
  return fig


def plot_true_and_predicted(images: np.ndarray, maps: np.ndarray, labels, preds,
                            names: Sequence[str], cell: float = 2.0):
  """One row per image: the image, the contribution map of its true class and,
  only where the prediction is wrong, that of the predicted class.

  images (N, H, W, C) in [0, 1]; maps (N, 2, H, W) for (true, predicted).
  Each map has its own symmetric colour limits. Returns the Figure.
  """
  maps = np.asarray(maps, np.float32)
  n, wrong = len(images), np.asarray(labels) != np.asarray(preds)
  ncols = 3 if wrong.any() else 2
  lims = map_limits(maps.reshape(-1, *maps.shape[2:])).reshape(n, 2)
  fig, axes = plt.subplots(n, ncols, figsize=(cell * ncols, cell * n), squeeze=False)
  for i in range(n):
    _show_image(axes[i, 0], images[i])
    _show_map(axes[i, 1], maps[i, 0], lims[i, 0], f"true: {names[labels[i]]}")
    if wrong[i]:
      _show_map(axes[i, 2], maps[i, 1], lims[i, 1], f"pred: {names[preds[i]]}")
    elif ncols == 3:
      fig.delaxes(axes[i, 2])
  for ax in fig.axes:
    ax.axis("off")
  fig.tight_layout()
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
      [f"pred: {names[p]}" for p in preds]), os.path.join(out_dir, "linear_maps.png")))
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
  `intervals` {method: (mean, low, high)}: the mean (a diamond) and its 95% CI
  (a bar) beside each box; low/high None draws the mean alone."""
  order = sorted(scores, key=lambda m: -np.nanmean(scores[m]))
  fig, ax = plt.subplots(figsize=(1.1 * len(order) + 2, 3.8))
  ax.boxplot([np.ravel(scores[m]) for m in order], showfliers=False, whis=1.5)
  for i, m in enumerate(order, 1):
    mean, low, high = (intervals or {}).get(m, (float(np.nanmean(scores[m])), None, None))
    err = None if low is None else [[mean - low], [high - mean]]
    ax.errorbar(i + 0.3, mean, yerr=err, fmt="D", color="k", ms=4, capsize=3, lw=1,
                label="mean, 95% CI" if i == 1 else None)
  ax.set_xticks(range(1, len(order) + 1), [METHOD_LABELS.get(m, m) for m in order])
  ax.axhline(1.0, color="g", ls="--", lw=1, label="Oracle")
  ax.axhline(1.0 / n ** 2, color="r", ls="--", lw=1, label=f"Uniform (1/{n * n})")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel(f"Localisation ({n}x{n} grids)")
  grids = {np.shape(v)[0] for v in scores.values()}
  count = f"{grids.pop()} grids, {np.size(scores[order[0]])} scores" if len(grids) == 1 else (
      "grids per method differ")
  ax.set_title(f"Share of positive attribution in the target cell ({count} per method)",
               fontsize=9)
  ax.legend(loc="upper right", fontsize=7)
  return save(fig, path)


def plot_pixel_removal(curves: dict, path: str, fraction: float,
                       bands: Optional[dict] = None) -> str:
  """The mean target-class probability against the % of pixels removed, least
  important first; `bands` {method: (low, high)}: its 95% CI per point, shaded."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for m in sorted(curves, key=lambda m: -np.mean(curves[m])):
    mean = np.asarray(curves[m]).mean(axis=0)
    x = np.linspace(0, 100 * fraction, len(mean))
    line, = ax.plot(x, mean, label=METHOD_LABELS.get(m, m))
    if bands and m in bands:
      ax.fill_between(x, *bands[m], color=line.get_color(), alpha=0.2, lw=0)
  images = {np.shape(v)[0] for v in curves.values()}
  count = f"{images.pop()} images" if len(images) == 1 else "images per method differ"
  ax.set_xlabel("% of pixels removed (least important first)")
  ax.set_ylabel("True-class probability")
  ax.set_title(f"Pixel removal: mean over {count}" + (", 95% CI shaded" if bands else ""),
               fontsize=9)
  ax.legend(fontsize=8)
  return save(fig, path)


def plot_comparison(grids: np.ndarray, maps: dict, class_names, path: str) -> str:
  """Per grid: the grid image, then every method's map for the class of its first
  cell (top left), each on its own symmetric colour scale."""
  methods = list(maps)
  fig, axes = plt.subplots(len(grids), len(methods) + 1,
                           figsize=(1.6 * (len(methods) + 1), 1.7 * len(grids)), squeeze=False)
  for g, grid in enumerate(grids):
    _show_image(axes[g, 0], grid)
    axes[g, 0].set_title(f"target: {class_names[g][0]}", fontsize=8)
    for j, m in enumerate(methods, 1):
      target_map = np.asarray(maps[m][g, 0], np.float32)
      _show_map(axes[g, j], target_map, float(map_limits(target_map)[0]),
                METHOD_LABELS.get(m, m) if g == 0 else None)
  for ax in axes.ravel():
    ax.set_axis_off()
  return save(fig, path)
