"""Explanations by explicit composition of the per-layer dynamic matrices.

A CoDA-Net is a dynamic linear map: y_l = M_l(x_{l-1}) . patches(x_{l-1}) at
every position, then logits = sum_{h,w} y_L / T + logit_bias. For a class c
the row of the composed map, from the input of layer l to logit c, is

  g_L = onehot(c) / T at every position          (sum-pool transpose, 1/T)
  g_{l-1} = fold(g_l . M_l)                       (matrix transpose, patch fold)

and g_l (.) x_l sums exactly to logit_c - logit_bias. Every class comes out of
one forward pass: the forward keeps only the layer inputs, and the sweep
recomputes each layer's matrix from its input while passing through it, so at
most one layer's matrix is alive at a time.

This module uses no autodiff: the transposes are written out (`dau.transpose`,
computed by `dau_fused.transpose` or `dau_fused.transpose_materialized`,
whichever costs less; the fused forward's custom VJP serves training only).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from codajax import dau
from codajax import dau_fused
from codajax import models


class Explanation(NamedTuple):
  linear_map: jax.Array   # (N, K, H_l, W_l, C_l): rows of the composed map.
  layer_input: jax.Array  # (N, H_l, W_l, C_l): the input of layer `layer`.
  logits: jax.Array       # (N, num_classes).
  classes: jax.Array      # (N, K): the classes explained.

  @property
  def contributions(self) -> jax.Array:
    return self.linear_map * self.layer_input[:, None].astype(self.linear_map.dtype)


def target_classes(classes, n: int, num_classes: int) -> jax.Array:
  """classes as an (n, K) int array (None: all classes), checked.

  Values out of [0, num_classes) raise a ValueError where they are known
  (outside jit). Under jit they cannot be checked: callers clamp them and give
  their entries NaN maps (`clamp_classes`, `nan_where_out_of_range`).
  """
  if classes is None:
    return jnp.broadcast_to(jnp.arange(num_classes), (n, num_classes))
  classes = jnp.asarray(classes)
  if not jnp.issubdtype(classes.dtype, jnp.integer):
    raise ValueError(f"classes must be integers, got dtype {classes.dtype}.")
  values = models.concrete_values(classes)
  if values is not None and values.size and (
      values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"classes must be in [0, {num_classes - 1}], got "
                     f"{values.min()}..{values.max()}.")
  if classes.ndim == 1:
    return jnp.broadcast_to(classes, (n, classes.shape[0]))
  if classes.ndim == 2 and classes.shape[0] == n:
    return classes
  raise ValueError(
      f"classes must have shape (K,) or (N, K) with N={n}; got {classes.shape}.")


def clamp_classes(classes: jax.Array, num_classes: int) -> jax.Array:
  """classes clipped into [0, num_classes), so that one_hot and gathers of an
  out-of-range class give no silent zeros (one_hot), NaNs or wrapped indices
  (-1: the last class) but some class's map, which `nan_where_out_of_range`
  then replaces."""
  return jnp.clip(classes, 0, num_classes - 1)


def nan_where_out_of_range(maps: jax.Array, classes: jax.Array, num_classes: int) -> jax.Array:
  """maps (N, K, ...) with NaN wherever classes (N, K) is out of [0, num_classes).

  Only traced classes can be out of range (known ones were checked by
  `target_classes`), so known classes return maps untouched.
  """
  if models.concrete_values(classes) is not None:
    return maps
  valid = (classes >= 0) & (classes < num_classes)
  return jnp.where(valid.reshape(valid.shape + (1,) * (maps.ndim - 2)), maps, jnp.nan)


def explain(model: models.CoDANet, variables, x: jax.Array, classes=None,
            layer: int = 0) -> Explanation:
  """The composed linear map from the input of `layer` to the requested logits.

  Args:
    model: a `models.CoDANet`.
    variables: its variables ({"params": ...}).
    x: images (N, H, W, C) in [0, 1].
    classes: None for all classes, an int array (K,), or (N, K) per image.
      A class out of [0, num_classes) is a ValueError where the values are
      known; under jit, where they are not, its rows of the map are NaN
      (never zeros, nor another class's map).
    layer: 0 for the encoded input [x, 1 - x], l for the input of layer l.
  """
  num_layers = model.num_layers
  if not 0 <= layer < num_layers:
    raise ValueError(f"layer must be in [0, {num_layers - 1}], got {layer}.")
  inputs, logits = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  n, all_classes = x.shape[0], classes is None
  classes = target_classes(classes, n, model.num_classes)
  h_out, w_out = _output_hw(model, inputs[-1].shape[1:3], num_layers - 1)
  # Sum-pool transpose and 1/T: every position of the last layer's output
  # carries onehot(c) / T. The sweep keeps the class axis last, (N, H, W, C, K),
  # where every per-layer product is a plain GEMM.
  g = jax.nn.one_hot(clamp_classes(classes, model.num_classes), model.num_classes,
                     dtype=jnp.float32) / model.temperature
  g = jnp.broadcast_to(jnp.swapaxes(g, 1, 2)[:, None, None],
                       (n, h_out, w_out, model.num_classes, classes.shape[1]))
  specs = models.layer_specs(model)
  for l in reversed(range(layer, num_layers)):
    # Layer l's w, if materialised, exists only inside this iteration: the
    # peak memory is one layer's w (on CPU, of one image at a time).
    cost_materialised, cost_fused = _composition_costs(
        model, l, inputs[l].shape[-1], classes.shape[1])
    pull = (dau_fused.transpose if cost_fused < cost_materialised
            else dau_fused.transpose_materialized)
    g = pull(variables["params"][f"layer_{l}"], specs[l], inputs[l].astype(model.dtype), g)
  rows = jnp.moveaxis(g, -1, 1)
  if not all_classes:
    rows = nan_where_out_of_range(rows, classes, model.num_classes)
  return Explanation(rows, inputs[layer], logits, classes)


def _composition_costs(model, l: int, in_channels: int, k: int) -> tuple[int, int]:
  """Multiply-adds per output position to compose K = k rows through layer l.

  With d = C_in*k*k, R the rank, and 1/n(w) from zb
  (`squared_norm.squared_norms`) in both (it scales g: g . (w/n) = (g/n) . w):
    materialised: w = [A|b] zb, (R+1)*C_out*d, then (g/n) . w, K*C_out*d;
    fused: the transposed conv of (g/n) (x) zb with the layer's kernel,
      K*(R+1)*C_out*d, never forming w.
  Fused is cheaper iff K*(R+1) < R+1+K, i.e. K < 1 + 1/R: for one class only
  (K = 1), on every layer. For K >= 2, e.g. all 10 CIFAR classes, the
  materialised form wins by (K*(R+1)) / (R+1+K), 8.7x for K = 10, R = 64.
  """
  d = in_channels * model.kernel_sizes[l] ** 2
  c_out, r = model.out_channels[l], model.ranks[l]
  return (r + 1 + k) * c_out * d, k * (r + 1) * c_out * d


def _output_hw(model, in_hw, l):
  k, s, p = model.kernel_sizes[l], model.strides[l], model.paddings[l]
  return dau.output_size(in_hw[0], k, s, p), dau.output_size(in_hw[1], k, s, p)


def linear_map(model, variables, x, classes=None, layer: int = 0) -> jax.Array:
  """(N, K, H_l, W_l, C_l): per class, the row of the map from layer `layer`'s input
  to that logit, 1/T included. layer=0 is the encoded input (C_0 = 2C)."""
  return explain(model, variables, x, classes, layer).linear_map


def contributions(model, variables, x, classes=None, layer: int = 0) -> jax.Array:
  """`linear_map` times the layer's input: sums to logit - logit_bias."""
  return explain(model, variables, x, classes, layer).contributions


def contribution_maps(model, variables, x, classes=None, layer: int = 0) -> jax.Array:
  """`contributions` summed over channels: (N, K, H_l, W_l)."""
  return contributions(model, variables, x, classes, layer).sum(axis=-1)
