"""CoDA layers and CoDA-Nets as pure linen modules.

A CoDA-Net is L CoDA layers with no non-linearity in between, a sum pool over
all positions, a division by the temperature T and a logit bias:

  logits = sum_{h,w} y_L[h, w] / T + logit_bias,   x_0 = [x, 1 - x].

Everything the explanations need is returned by methods (`layer_inputs`,
`layer_matrix`); no module carries flags or state.
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from codajax import dau

DEFAULT_LOGIT_BIAS = math.log(0.1 / 0.9)
# "fused" never forms the per-position weights w (see `codajax.dau`), choosing
# its convolution-or-GEMM contraction per backend; "fused_conv" / "fused_dot"
# force one; "materialized" forms w at every position like the PyTorch code.
# All share one parameter tree.
IMPLS = ("fused", "fused_conv", "fused_dot", "materialized")


class CoDAConv(nn.Module):
  """A convolutional layer of Dynamic Alignment Units (see `codajax.dau`)."""
  features: int
  rank: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  norm: dau.Norm = "squash"
  dtype: Any = jnp.float32
  impl: str = "fused"

  @nn.compact
  def __call__(self, x: jax.Array, matrix: bool = False) -> jax.Array:
    """The layer output y (N, H', W', C_out), float32.

    With matrix=True, instead the normalised dynamic matrix w / n(w) of shape
    (N, H', W', C_out, d), float32, such that y = matrix . patches(x).
    """
    k, r, c_in = self.kernel_size, self.rank, x.shape[-1]
    d = c_in * k * k
    B = self.param("B", nn.initializers.lecun_normal(), (k, k, c_in, r))
    A = self.param("A", nn.initializers.lecun_normal(), (r, self.features * d))
    b = self.param("b", nn.initializers.zeros_init(), (self.features * d,))
    x = x.astype(self.dtype)
    if not matrix and self.impl != "materialized":
      contraction = {"fused": None, "fused_conv": "conv", "fused_dot": "dot"}[self.impl]
      return dau.fused_layer(x, B, A, b, self.features, k, self.stride,
                             self.padding, self.norm, contraction)
    # Materialised (and, for any impl, the matrix of one layer on demand).
    z = dau.low_rank(x, B, self.stride, self.padding)
    w = dau.dynamic_weights(z, A, b, self.features)
    if matrix:
      return dau.normalised_matrix(w, self.norm)
    p = dau.patches(x, k, self.stride, self.padding)
    num = jnp.einsum("...od,...d->...o", w, p, preferred_element_type=jnp.float32)
    return num * dau.inverse_norm(w, self.norm)[..., 0]

  def transpose(self, x: jax.Array, g: jax.Array, fused: bool = False) -> jax.Array:
    """Rows g (N, H', W', C_out, K) pulled back to the input: (N, H, W, C_in, K).

    fold(g . matrix) for this layer's normalised matrix at input x, float32,
    materialising w or not (`fused`); see `dau.transpose_layer`. Needs bound
    parameters (model.apply).
    """
    p = self.variables["params"]
    return dau.transpose_layer(g, x.astype(self.dtype), p["B"], p["A"], p["b"],
                               self.features, self.kernel_size, self.stride,
                               self.padding, self.norm, fused)


class CoDANet(nn.Module):
  """A Convolutional Dynamic Alignment Network.

  Attributes: per-layer sequences `out_channels`, `ranks`, `kernel_sizes`,
  `strides`, `paddings`; `norm` ("squash" or "l2"); `temperature` T;
  `logit_bias`; `dtype` of the convolutions (parameters, norms, pooling and
  logits stay float32); `impl`, one of `IMPLS` (same parameters for all);
  `remat`: recompute each layer's activations in the backward pass
  (`jax.checkpoint` per layer), trading compute for memory on large images.
  """
  out_channels: Sequence[int]
  ranks: Sequence[int]
  kernel_sizes: Sequence[int]
  strides: Sequence[int]
  paddings: Sequence[int]
  norm: dau.Norm = "squash"
  temperature: float = 1.0
  logit_bias: float = DEFAULT_LOGIT_BIAS
  dtype: Any = jnp.float32
  impl: str = "fused"
  remat: bool = False

  def setup(self):
    _validate(self)
    # static_argnums counts self: argument 2 is `matrix`.
    layer_cls = nn.remat(CoDAConv, static_argnums=(2,)) if self.remat else CoDAConv
    self.layers = [
        layer_cls(features=c, rank=r, kernel_size=k, stride=s, padding=p,
                  norm=self.norm, dtype=self.dtype, impl=self.impl, name=f"layer_{i}")
        for i, (c, r, k, s, p) in enumerate(zip(
            self.out_channels, self.ranks, self.kernel_sizes, self.strides,
            self.paddings))]

  @property
  def num_layers(self) -> int:
    return len(self.out_channels)

  @property
  def num_classes(self) -> int:
    return self.out_channels[-1]

  def encode(self, x: jax.Array) -> jax.Array:
    """[x, 1 - x] on the channel axis, after checking the image shape."""
    check_input_shape(self, x.shape)
    return jnp.concatenate([x, 1.0 - x], axis=-1)

  def layer_inputs(self, x: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """One forward pass: ([x_0, ..., x_{L-1}], logits), x_l the input of layer l."""
    h = self.encode(x)
    inputs = []
    for layer in self.layers:
      inputs.append(h)
      h = layer(h, False)
    return inputs, self.pool(h)

  def pool(self, y: jax.Array) -> jax.Array:
    """Sum pool, 1/T, logit bias: (N, H, W, K) -> (N, K) float32."""
    return jnp.sum(y.astype(jnp.float32), axis=(1, 2)) / self.temperature + self.logit_bias

  def layer_matrix(self, x_l: jax.Array, layer: int) -> jax.Array:
    """Layer `layer`'s normalised dynamic matrix for its input x_l."""
    return self.layers[layer](x_l, True)

  def layer_transpose(self, x_l: jax.Array, g: jax.Array, layer: int,
                      fused: bool = False) -> jax.Array:
    """Rows g of a map out of layer `layer` pulled back to its input x_l.

    g: (N, H', W', C_out, K) -> (N, H, W, C_in, K), K rows (row axis last),
    the same as folding g . layer_matrix(x_l, layer) per row. fused=False
    materialises that layer's w (only); fused=True never forms it (see
    `dau.transpose_layer`).
    """
    return self.layers[layer].transpose(x_l, g, fused)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layer_inputs(x)[1]


def _validate(model) -> None:
  n = len(model.out_channels)
  fields = ("ranks", "kernel_sizes", "strides", "paddings")
  lengths = {f: len(getattr(model, f)) for f in fields}
  bad = {f: l for f, l in lengths.items() if l != n}
  if bad:
    raise ValueError(
        f"CoDANet: out_channels has {n} layers but {bad} differ; give one "
        "value per layer in each of out_channels, ranks, kernel_sizes, strides, "
        "paddings.")
  if model.impl not in IMPLS:
    raise ValueError(f"CoDANet: impl must be one of {IMPLS}, got {model.impl!r}.")
  if model.norm not in dau.NORMS:
    raise ValueError(f"CoDANet: norm must be one of {dau.NORMS}, got {model.norm!r}.")
  if not model.temperature > 0:
    raise ValueError(f"CoDANet: temperature must be > 0, got {model.temperature}.")
  for f in ("out_channels", "ranks", "kernel_sizes", "strides"):
    if any(int(v) < 1 for v in getattr(model, f)):
      raise ValueError(f"CoDANet: every entry of {f} must be >= 1, got {tuple(getattr(model, f))}.")
  if any(int(p) < 0 or int(p) >= int(k) for p, k in zip(model.paddings, model.kernel_sizes)):
    raise ValueError(
        f"CoDANet: paddings {tuple(model.paddings)} must satisfy 0 <= p < kernel "
        f"size {tuple(model.kernel_sizes)}.")


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
  h, w = shape[1], shape[2]
  for i, (k, s, p) in enumerate(zip(model.kernel_sizes, model.strides, model.paddings)):
    if h + 2 * p < k or w + 2 * p < k:
      raise ValueError(
          f"CoDANet: image of size {shape[1]}x{shape[2]} is too small: layer {i} "
          f"(kernel {k}, stride {s}, padding {p}) would get a {h}x{w} input. Use "
          "larger images or smaller kernels/strides.")
    h, w = dau.output_size(h, k, s, p), dau.output_size(w, k, s, p)


def cifar10_9l_s(temperature: float = 1000.0, **kw) -> CoDANet:
  """The paper's 9L-S CoDA-Net for CIFAR-10 (7,782,816 parameters)."""
  return CoDANet(
      out_channels=(16, 16, 32, 32, 32, 64, 64, 64, 10),
      ranks=(32, 32) + (64,) * 7,
      kernel_sizes=(3,) * 8 + (1,),
      strides=(1, 1, 2, 1, 1, 2, 1, 1, 1),
      paddings=(1,) * 8 + (0,),
      temperature=temperature, **kw)


def imagenet100_9l_l(temperature: float = 100000.0, **kw) -> CoDANet:
  """The paper's 9L-L CoDA-Net for ImageNet-100 (47,517,408 parameters)."""
  return CoDANet(
      out_channels=(16, 32, 32, 64, 64, 64, 64, 64, 100),
      ranks=(64,) * 3 + (128,) * 3 + (256,) * 3,
      kernel_sizes=(7,) + (3,) * 8,
      strides=(3, 1, 1, 2, 1, 1, 2, 1, 1),
      paddings=(3,) + (1,) * 8,
      temperature=temperature, **kw)


def tiny(num_classes: int = 10, temperature: float = 10.0, **kw) -> CoDANet:
  """A 3-layer net for tests and laptops."""
  return CoDANet(
      out_channels=(8, 8, num_classes), ranks=(4, 4, 4), kernel_sizes=(3, 3, 1),
      strides=(1, 2, 1), paddings=(1, 1, 0), temperature=temperature, **kw)


PRESETS = {"cifar10_9l_s": cifar10_9l_s, "imagenet100_9l_l": imagenet100_9l_l,
           "tiny": tiny}

CONFIG_FIELDS = ("out_channels", "ranks", "kernel_sizes", "strides", "paddings",
                 "norm", "temperature", "logit_bias", "dtype", "impl", "remat")


def from_config(cfg) -> CoDANet:
  """A CoDANet from a ConfigDict/mapping with the constructor's fields.

  `dtype` may be a string ("float32", "bfloat16"). Unknown fields raise.
  """
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(cfg) - set(CONFIG_FIELDS))
  if unknown:
    raise ValueError(f"config.model has unknown fields {unknown}; allowed: {CONFIG_FIELDS}.")
  missing = [f for f in CONFIG_FIELDS[:5] if f not in cfg]
  if missing:
    raise ValueError(f"config.model is missing fields {missing}.")
  for f in CONFIG_FIELDS[:5]:
    cfg[f] = tuple(int(v) for v in cfg[f])
  if "dtype" in cfg:
    cfg["dtype"] = jnp.dtype(cfg["dtype"])
  if "remat" in cfg:
    cfg["remat"] = bool(cfg["remat"])
  return CoDANet(**cfg)
