"""The model side of `codajax.explore`: a trained net, its test images and
the explanations of one image at a time, as arrays and pictures.

`Explorer.from_workdir` (or `from_pretrained`) restores the latest
checkpoint and the run's config, reads N test images with their class names
through the eval pipeline (`codajax.input_pipeline`) and compiles every
computation once for batch 1 (`warm`): the composed linear map of each layer
(`codajax.explain`, one jitted program per layer, the class a traced
argument) and the post-hoc baselines (`codajax.attribution`, jitted there).
Every later call reuses those programs: no recompilation per interaction.
Results are plain numpy; the pictures are RGB uint8 arrays drawn with
matplotlib in the contribution colours of `codajax.plotting` (bwr: red
supports the class, blue opposes it).
"""

import dataclasses
import io
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from PIL import Image

from codajax import attribution
from codajax import checkpoint
from codajax import config_lib
from codajax import explain
from codajax import input_pipeline
from codajax import models
from codajax import plotting
from codajax import pretrained

BASELINES = ("gradcam", "ixg")  # Post-hoc methods of codajax.attribution shown side by side.
MAX_PIXELS = 40_000_000  # Uploads above this (e.g. 8000 x 5000) are refused before decoding.
MAX_BYTES = 50 * 1024 * 1024
DISPLAY = 224  # Side of the displayed images, in pixels (nearest-neighbour upscaling).


class UploadError(ValueError):
  """An upload that cannot be explained; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class View:
  """The explanation of one image for one class at one layer (numpy)."""
  logits: np.ndarray        # (num_classes,)
  probabilities: np.ndarray  # (num_classes,): sigmoid of the logits (the nets train on BCE).
  cls: int
  layer: int
  contributions: np.ndarray  # (H_l, W_l): of layer `layer`'s input, summed over channels.
  linear_map: np.ndarray     # (H, W, 2C): the layer-0 linear map (input to logit cls).
  encoded: np.ndarray        # (H, W, 2C): the encoded input [x, 1 - x].
  baseline: np.ndarray       # (H, W): the post-hoc baseline's map.
  baseline_name: str
  total: float               # Sum of the contributions.
  target: float              # logit - logit_bias.


def read_config(workdir: str, meta: dict) -> ml_collections.ConfigDict:
  """The run's config: the checkpoint's own copy (meta["config"]), else the
  workdir's config.json, else (an imported net) its spec from the repository."""
  saved = meta.get("config")
  if isinstance(saved, dict):
    return ml_collections.ConfigDict(saved)
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  if isinstance(saved, str):
    return config_lib.load_config(saved)
  raise checkpoint.CheckpointError(
      f"{workdir} has a checkpoint but no config (config.json): train it with "
      "python -m codajax.main, or import it with python -m codajax.pretrained.")


class Explorer:
  """A net, its gallery of test images and its compiled explanations."""

  def __init__(self, model: models.CoDANet, variables, config, class_names: Sequence[str],
               images: np.ndarray, labels: np.ndarray):
    self.model, self.variables, self.config = model, variables, config
    self.class_names = list(class_names)
    self.size, self.channels = int(config.image_size), int(model_channels(variables))
    self.images, self.labels = images, labels
    self._explain = jax.jit(self._explain_fn, static_argnames="layer")
    self._logits = jax.jit(model.apply)
    self.predictions = self.predict(images) if len(images) else np.zeros((0,), int)

  @classmethod
  def from_workdir(cls, workdir: str, num_images: int = 12) -> "Explorer":
    """Raises checkpoint.CheckpointError for a workdir without a usable checkpoint."""
    _, params, meta = checkpoint.load_stored_params(workdir)
    config = read_config(workdir, meta)
    model = models.from_config(meta.get("model") or config.model)
    return cls._with_data(model, {"params": params}, config, num_images)

  @classmethod
  def from_pretrained(cls, name: str, num_images: int = 12) -> "Explorer":
    """Raises pretrained.PretrainedError (offline: one line naming the fix)."""
    model, variables = pretrained.load(name)
    config = config_lib.load_config(pretrained.get(name).config)
    return cls._with_data(model, variables, config, num_images)

  @classmethod
  def _with_data(cls, model, variables, config, num_images):
    """Reads the gallery; without the data (not downloaded) the gallery is
    empty and uploads still work."""
    try:
      names = input_pipeline.get_info(config).class_names
      images, labels = input_pipeline.first_test_examples(config, num_images)
    except (input_pipeline.DataError, OSError) as e:
      print(f"codajax.explore: no test images ({str(e).splitlines()[0]}); the gallery is "
            "empty, upload images instead.")
      names = [str(i) for i in range(model.num_classes)]
      shape = (0, config.image_size, config.image_size, model_channels(variables))
      images = np.zeros(shape, np.float32)
      labels = np.zeros((0,), np.int32)
    return cls(model, variables, config, names, images, labels)

  # -------------------------------------------------------------- compiled

  def _explain_fn(self, variables, x, cls, layer):
    """Batch 1: logits, layer `layer`'s linear map and input, for class cls."""
    e = explain.explain(self.model, variables, x, cls.reshape(1, 1), layer)
    return e.logits[0], e.linear_map[0, 0], e.layer_input[0]

  def warm(self) -> None:
    """Compiles every program an interaction can need (all layers, all baselines)."""
    x = np.zeros((1, self.size, self.size, self.channels), np.float32)
    for layer in range(self.model.num_layers):
      jax.block_until_ready(self._explain(self.variables, x, np.int32(0), layer=layer))
    for name in BASELINES:
      jax.block_until_ready(self._baseline(name, x, 0))

  def compiled_programs(self) -> int:
    """How many programs the explanations have compiled (for the tests)."""
    # pylint: disable-next=protected-access
    return self._explain._cache_size() + attribution._attribute._cache_size()

  def _baseline(self, name: str, x, cls: int):
    classes = np.full((1, 1), cls, np.int32)
    return attribution.attribute(name, self.model, self.variables, jnp.asarray(x), classes)

  def _run(self, x, cls: int, layer: int):
    out = jax.device_get(self._explain(self.variables, x, np.int32(cls), layer=layer))
    return tuple(np.asarray(a, np.float32) for a in out)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Predicted classes of images (N, S, S, C), one image at a time (batch 1)."""
    return np.array([int(np.argmax(self._logits(self.variables, im[None]))) for im in images])

  def view(self, image: np.ndarray, cls: Optional[int] = None, layer: int = 0,
           baseline: str = BASELINES[0]) -> View:
    """The explanation of `image` (S, S, C in [0, 1]); cls None: the predicted class."""
    if not 0 <= layer < self.model.num_layers:
      raise ValueError(f"layer must be in [0, {self.model.num_layers - 1}], got {layer}.")
    x = np.asarray(image, np.float32)[None]
    logits = np.asarray(self._logits(self.variables, x))[0]
    cls = int(np.argmax(logits)) if cls is None else int(cls)
    if not 0 <= cls < self.model.num_classes:
      raise ValueError(f"class must be in [0, {self.model.num_classes - 1}], got {cls}.")
    # Layer 0 gives the linear map on the image; `layer` the contributions shown.
    _, lm0, encoded = self._run(x, cls, 0)
    lm, inp = (lm0, encoded) if layer == 0 else self._run(x, cls, layer)[1:]
    contrib = lm * inp
    base = np.asarray(self._baseline(canonical_baseline(baseline), x, cls))[0, 0]
    return View(logits=logits, probabilities=1 / (1 + np.exp(-logits.astype(np.float64))),
                cls=cls, layer=layer, contributions=contrib.sum(-1), linear_map=lm0,
                encoded=encoded, baseline=base, baseline_name=canonical_baseline(baseline),
                total=float(contrib.astype(np.float64).sum()),
                target=float(logits[cls]) - float(self.model.logit_bias))

  # ------------------------------------------------------------------ input

  def decode(self, path: str) -> np.ndarray:
    """An uploaded file as the eval pipeline feeds it: (S, S, C) float32 in [0, 1].

    Raises UploadError (not an image, too large, a channel count the net
    does not read), naming the fix.
    """
    name = os.path.basename(path)
    if os.path.getsize(path) > MAX_BYTES:
      raise UploadError(f"{name} is {os.path.getsize(path) / 2**20:.0f} MB; upload an image "
                        f"file under {MAX_BYTES // 2**20} MB.")
    try:
      img = Image.open(path)
      w, h = img.size  # From the header: nothing decoded yet.
    except (OSError, Image.DecompressionBombError, ValueError):
      raise UploadError(f"{name} is not an image Pillow can read; upload a PNG or JPEG.") from None
    if w * h > MAX_PIXELS:
      raise UploadError(f"{name} is {w} x {h} pixels, more than {MAX_PIXELS:,}; scale it "
                        f"down (the net reads {self.size} x {self.size}) and upload again.")
    img = img.convert("RGBA" if "A" in img.getbands() else "RGB") if img.mode == "P" else img
    img = img.convert("L") if img.mode in ("I", "I;16", "F", "1") else img
    bands = img.getbands()
    if len(bands) != self.channels:
      want = "greyscale (1 channel)" if self.channels == 1 else f"{self.channels}-channel RGB"
      raise UploadError(f"{name} has {len(bands)} channel(s) ({img.mode}); this net reads "
                        f"{want} images: convert it (e.g. to {'L' if self.channels == 1 else 'RGB'}"
                        " mode) and upload again.")
    try:
      pixels = np.asarray(img.convert(img.mode), np.uint8).reshape(h, w, len(bands))
    except OSError as e:  # A truncated or damaged file fails while decoding.
      raise UploadError(f"{name} cannot be decoded ({e}); upload an undamaged image.") from None
    return self.preprocess(pixels)

  def preprocess(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> the eval pipeline's (S, S, C) (resize, centre crop)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    out = input_pipeline.preprocess(self.config, tf.constant(pixels), False,
                                    tf.zeros((2,), tf.int64))
    return out.numpy().astype(np.float32)


def model_channels(variables) -> int:
  """C of the images a net reads: layer 0 takes [x, 1 - x], 2C channels."""
  b = variables["params"]["layer_0"]["B"]  # (k, k, 2C, rank)
  return int(np.shape(b)[2]) // 2


def canonical_baseline(name: str) -> str:
  name = attribution.canonical_method(name)
  if name not in BASELINES:
    raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}.")
  return name


# ------------------------------------------------------------------ pictures


def upscale(image: np.ndarray, side: int = DISPLAY) -> np.ndarray:
  """(H, W, C) in [0, 1] -> uint8 RGB of about side x side, nearest neighbour."""
  img = np.asarray(image, np.float32)
  img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]
  k = max(1, side // max(img.shape[:2]))
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8).repeat(k, 0).repeat(k, 1)


def figure_array(fig) -> np.ndarray:
  """A matplotlib figure as uint8 RGB (and closes it)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  buf.seek(0)
  return np.asarray(Image.open(buf).convert("RGB"))


def map_picture(m: np.ndarray, label: str) -> np.ndarray:
  """A signed map in bwr, symmetric limits, with its colour bar named `label`."""
  lim = float(plotting.map_limits(np.asarray(m)[None])[0])
  fig, ax = plt.subplots(figsize=(3.4, 2.8))
  im = ax.imshow(m, cmap="bwr", vmin=-lim, vmax=lim, interpolation="nearest")
  ax.axis("off")
  bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  bar.set_label(label, fontsize=8)
  bar.ax.tick_params(labelsize=7)
  fig.tight_layout()
  return figure_array(fig)


def linear_map_picture(linear_map: np.ndarray, encoded: np.ndarray) -> np.ndarray:
  """The layer-0 linear map as a colour image on white, as the trainer's
  figures show it (`plotting.linear_map_image`)."""
  rgba = plotting.linear_map_image(linear_map, encoded)
  alpha = rgba[..., 3:]
  return upscale(rgba[..., :3] * alpha + (1 - alpha))


def sum_check(view: View, class_name: str) -> str:
  """Σ contributions = logit - bias, with its rounding error."""
  err = abs(view.total - view.target)
  return (f"Sum check (class {class_name}, layer {view.layer}): Σ contributions = "
          f"{view.total:.6f}; "
          f"logit − bias = {view.target:.6f}; |error| = {err:.1e} "
          f"({err / max(abs(view.target), 1e-12):.1e} relative).")
