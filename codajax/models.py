"""CoDA layers and CoDA-Nets as pure linen modules that compute the forward pass.

A CoDA-Net is L CoDA layers with no non-linearity in between, a sum pool over
all positions, a division by the temperature T and a logit bias:

  logits = sum_{h,w} y_L[h, w] / T + logit_bias,   x_0 = [x, 1 - x].

The modules hold the parameters and compute the logits (`__call__`) or, for
explanations, the layer inputs with the logits (`CoDANet.layer_inputs`).
A layer's matrix and its transpose are pure functions of that layer's
parameters, its description (`CoDAConv.spec`, every layer's: `layer_specs`)
and its input, in `codajax.dau` and `codajax.dau_fused`. No module carries
flags or state. The fields' defaults, choices and checks are declared without
jax in `codajax.architectures`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codajax import architectures
from codajax import dau
from codajax import dau_fused

DEFAULTS = architectures.MODEL_DEFAULTS
IMPLS = architectures.IMPLS                # The layer forms (see there).
CONTRACTIONS = architectures.CONTRACTIONS  # The fused layer's linear part.
CONFIG_FIELDS = architectures.LAYER_FIELDS + tuple(DEFAULTS)  # CoDANet's fields.


class CoDAConv(nn.Module):
  """A convolutional layer of Dynamic Alignment Units (see `codajax.dau`)."""
  features: int
  rank: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  norm: dau.Norm = DEFAULTS["norm"]
  dtype: Any = jnp.float32
  impl: str = DEFAULTS["impl"]
  contraction: str = DEFAULTS["contraction"]

  @property
  def spec(self) -> dau.Layer:
    """This layer's description, for the functions of `codajax.dau`."""
    return dau.Layer(int(self.features), int(self.rank), int(self.kernel_size),
                     int(self.stride), int(self.padding), self.norm)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """The layer output y (N, H', W', C_out), float32."""
    k, r, c_in = self.kernel_size, self.rank, x.shape[-1]
    d = c_in * k * k
    params = {
        "B": self.param("B", nn.initializers.lecun_normal(), (k, k, c_in, r)),
        "A": self.param("A", nn.initializers.lecun_normal(), (r, self.features * d)),
        "b": self.param("b", nn.initializers.zeros_init(), (self.features * d,)),
    }
    x = x.astype(self.dtype)
    if self.impl == "fused":
      contraction = None if self.contraction == "auto" else self.contraction
      return dau_fused.layer(params, self.spec, x, contraction)
    return dau.layer(params, self.spec, x)


class CoDANet(nn.Module):
  """A Convolutional Dynamic Alignment Network.

  Attributes: per-layer sequences `out_channels`, `ranks`, `kernel_sizes`,
  `strides`, `paddings`; `norm` ("squash" or "l2"); `temperature` T;
  `logit_bias`; `dtype` of the convolutions (parameters, norms, pooling and
  logits stay float32); `impl`, one of `IMPLS`, and the fused layer's
  `contraction`, one of `CONTRACTIONS` (same parameters for all); `remat`:
  recompute each layer's activations in the backward pass (`jax.checkpoint`
  per layer), trading compute for memory on large images.
  """
  out_channels: Sequence[int]
  ranks: Sequence[int]
  kernel_sizes: Sequence[int]
  strides: Sequence[int]
  paddings: Sequence[int]
  norm: dau.Norm = DEFAULTS["norm"]
  temperature: float = DEFAULTS["temperature"]
  logit_bias: float = DEFAULTS["logit_bias"]
  dtype: Any = jnp.float32
  impl: str = DEFAULTS["impl"]
  contraction: str = DEFAULTS["contraction"]
  remat: bool = DEFAULTS["remat"]

  def setup(self):
    _validate(self)
    layer_cls = nn.remat(CoDAConv) if self.remat else CoDAConv
    self.layers = [layer_cls(*fields, norm=self.norm, dtype=self.dtype, impl=self.impl,
                             contraction=self.contraction, name=f"layer_{i}")
                   for i, fields in enumerate(_per_layer(self))]

  @property
  def num_layers(self) -> int:
    return len(self.out_channels)

  @property
  def num_classes(self) -> int:
    return self.out_channels[-1]

  def encode(self, x: jax.Array) -> jax.Array:
    """[x, 1 - x] on the channel axis, after checking the image shape."""
    check_input_shape(self, x.shape)
    check_input_values(x)
    self._check_channels(x.shape)
    return jnp.concatenate([x, 1.0 - x], axis=-1)

  def _check_channels(self, shape) -> None:
    """Images must have the channels the parameters were made for (known once
    the parameters exist, i.e. not while initialising)."""
    params = self.variables.get("params", {})
    if "layer_0" not in params:
      return
    expected = params["layer_0"]["B"].shape[2] // 2
    if shape[-1] != expected:
      raise ValueError(
          f"CoDANet: these parameters take images with {expected} channel(s), got "
          f"{shape[-1]} (shape {tuple(shape)}). Convert the images "
          f"({'grayscale to RGB' if expected == 3 and shape[-1] == 1 else 'channels'}) "
          "or use a model trained on such images.")

  def layer_inputs(self, x: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """One forward pass: ([x_0, ..., x_{L-1}], logits), x_l the input of layer l."""
    return self._forward(self.encode(x))

  def encoded_logits(self, h: jax.Array) -> jax.Array:
    """The logits of an input already encoded, h = [x, 1 - x] of shape
    (N, H, W, 2C), possibly edited: pixel removal sets all 2C channels of a
    pixel to 0, which no image encodes to, so that the pixel contributes 0.

    Use as model.apply(variables, h, method=CoDANet.encoded_logits).
    """
    params = self.variables.get("params", {})
    expected = params["layer_0"]["B"].shape[2] if "layer_0" in params else None
    if h.ndim != 4 or h.shape[-1] % 2 or (expected and h.shape[-1] != expected):
      raise ValueError(
          f"CoDANet.encoded_logits expects an encoded input [x, 1 - x] of shape "
          f"(N, H, W, {expected or '2C'}); got shape {tuple(h.shape)}. Encode images "
          "with model.apply(variables, x, method=CoDANet.encode), or call the model "
          "on the images themselves.")
    check_input_shape(self, h.shape)
    return self._forward(h)[1]

  def _forward(self, h: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """The layer loop of `layer_inputs` and `encoded_logits`, from x_0 = h."""
    inputs = []
    for layer in self.layers:
      inputs.append(h)
      h = layer(h)
    return inputs, self.pool(h)

  def pool(self, y: jax.Array) -> jax.Array:
    """Sum pool, 1/T, logit bias: (N, H, W, K) -> (N, K) float32."""
    return jnp.sum(y.astype(jnp.float32), axis=(1, 2)) / self.temperature + self.logit_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layer_inputs(x)[1]


def _per_layer(model: CoDANet):
  """(out_channels, rank, kernel_size, stride, padding) of each layer, in
  `CoDAConv`'s field order."""
  return zip(*(getattr(model, f) for f in architectures.LAYER_FIELDS))


def _validate(model: CoDANet) -> None:
  """One ValueError listing every field that breaks `architectures.model_problems`."""
  fields = {f: getattr(model, f) for f in CONFIG_FIELDS}
  fields["dtype"] = jnp.dtype(model.dtype).name
  problems = architectures.model_problems(fields)
  if problems:
    raise ValueError("\n".join(f"CoDANet: {f}={fields[f]!r}: {rule}" for f, rule in problems))


def layer_specs(model: CoDANet) -> tuple[dau.Layer, ...]:
  """Every layer's `CoDAConv.spec`, for the functions of `codajax.dau` and
  `codajax.dau_fused` (with the parameters variables["params"][f"layer_{l}"])."""
  return tuple(CoDAConv(*fields, norm=model.norm, parent=None).spec
               for fields in _per_layer(model))


def layer_shapes(model: CoDANet, image_shape: Sequence[int]) -> list[tuple[int, int, int]]:
  """(H_l, W_l, C_l) of every layer's input, then of the last output."""
  h, w, c = image_shape[-3:]
  shapes = [(h, w, 2 * c)]
  for co, k, s, p in zip(model.out_channels, model.kernel_sizes, model.strides,
                         model.paddings):
    h, w = dau.output_size(h, k, s, p), dau.output_size(w, k, s, p)
    shapes.append((h, w, co))
  return shapes


def check_input_shape(model: CoDANet, shape: Sequence[int]) -> None:
  """Raises one clear ValueError for images the architecture cannot take."""
  if len(shape) != 4:
    raise ValueError(
        f"CoDANet expects images of shape (N, H, W, C) with values in [0, 1]; got "
        f"shape {tuple(shape)}. Add a batch axis with x[None] for a single image.")
  if shape[0] == 0:
    raise ValueError(
        f"CoDANet got a batch of 0 images (shape {tuple(shape)}); pass at least one "
        "image, or skip the call for an empty batch.")
  h, w = shape[1], shape[2]
  for i, (k, s, p) in enumerate(zip(model.kernel_sizes, model.strides, model.paddings)):
    if h + 2 * p < k or w + 2 * p < k:
      raise ValueError(
          f"CoDANet: image of size {shape[1]}x{shape[2]} is too small: layer {i} "
          f"(kernel {k}, stride {s}, padding {p}) would get a {h}x{w} input. Use "
          "larger images or smaller kernels/strides.")
    h, w = dau.output_size(h, k, s, p), dau.output_size(w, k, s, p)


def concrete_values(x) -> np.ndarray | None:
  """x as a numpy array where its values are known, None where x is traced
  (inside jit), so that checks on values run wherever they can."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_input_values(x) -> None:
  """Raises one clear ValueError for images not in [0, 1]: integer images
  always; float ones when their values are known (outside jit: a traced
  value cannot be checked, so inside jit only the dtype is)."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"CoDANet expects float images with values in [0, 1]; got dtype {x.dtype}. "
        "Scale 0..255 images first: x.astype(jnp.float32) / 255.")
  values = concrete_values(x)
  if values is not None and ((values < 0) | (values > 1)).any():  # NaN is left to the caller.
    raise ValueError(
        f"CoDANet expects images with values in [0, 1]; got {np.nanmin(values)}.."
        f"{np.nanmax(values)}. Scale 0..255 images first: x / 255.")


def cifar10_9l_s(temperature: float = 1000.0, **kw) -> CoDANet:
  """The paper's 9L-S CoDA-Net for CIFAR-10 (7,782,816 parameters)."""
  return CoDANet(**architectures.cifar10_9l_s(), temperature=temperature, **kw)


def imagenet100_9l_l(temperature: float = 100000.0, **kw) -> CoDANet:
  """The paper's 9L-L CoDA-Net for ImageNet-100 (47,517,408 parameters)."""
  return CoDANet(**architectures.imagenet100_9l_l(), temperature=temperature, **kw)


def tiny(num_classes: int = 10, temperature: float = 10.0, **kw) -> CoDANet:
  """A 3-layer net for tests and laptops."""
  return CoDANet(**architectures.tiny(num_classes), temperature=temperature, **kw)


PRESETS = {"cifar10_9l_s": cifar10_9l_s, "imagenet100_9l_l": imagenet100_9l_l,
           "tiny": tiny}


def from_config(cfg) -> CoDANet:
  """A CoDANet from a ConfigDict/mapping with the constructor's fields.

  `dtype` may be a string ("float32", "bfloat16"). Unknown fields raise.
  """
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
  if unknown:
    raise ValueError(f"config.model has unknown fields {unknown}; allowed: {CONFIG_FIELDS}.")
  missing = [f for f in architectures.LAYER_FIELDS if f not in cfg]
  if missing:
    raise ValueError(f"config.model is missing fields {missing}.")
  for f in architectures.LAYER_FIELDS:
    cfg[f] = tuple(int(v) for v in cfg[f])
  if "dtype" in cfg:
    cfg["dtype"] = jnp.dtype(cfg["dtype"])
  if "remat" in cfg:
    cfg["remat"] = bool(cfg["remat"])
  return CoDANet(**cfg)
