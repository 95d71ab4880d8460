"""Matplotlib figures of explanations (see `codajax.explain`)."""

from typing import Optional, Sequence

import matplotlib.pyplot as plt  # Headless machines fall back to Agg by themselves.
import numpy as np


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
      img = np.asarray(images[i], np.float32)
      axes[r, col * per].imshow(img[..., 0] if img.shape[-1] == 1 else img,
                                cmap="gray" if img.shape[-1] == 1 else None,
                                vmin=0, vmax=1)
    ax = axes[r, col * per + per - 1]
    im = ax.imshow(maps[i], cmap="bwr", vmin=-lims[i], vmax=lims[i])
    if titles is not None:
      ax.set_title(titles[i], fontsize=8)
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


def save(fig, path: str) -> str:
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path
