"""The Dynamic Alignment Unit layer, as the paper writes it.

A CoDA layer with C_in input channels, C_out DAUs, kernel k, stride s,
padding p and rank R (d = C_in*k*k) computes, at every output position:

  P   = the input patch in R^d, ordered (channel, ky, kx) like torch's unfold,
  z   = conv_kxk(x; B)                           in R^R,
  w_o = A_o z + b_o                              in R^d,    o = 1..C_out,
  y_o = w_o^T P / n(w_o),  n = (1+|w|^2)/|w| ("squash") or |w| ("l2").

So y = M P with the dynamic matrix M = w / n(w) (`matrix`), and a row vector
g of a map out of the layer pulls back to its input as fold(g M)
(`transpose`), which is how explanations compose the network's linear map.

This file exists to be read next to the paper: every function is the formula,
forming w at every position. It is the "materialized" layer of
`models.CoDAConv` and the reference that the fast forms (`codajax.dau_fused`,
which never forms w) are tested against.

Every layer function takes the layer's parameters {"B", "A", "b"}, its
description `Layer` and its input. Shapes: x is NHWC; B is HWIO (k, k, C_in,
R); A is (R, C_out*d) with output channel index o*d + j; b is (C_out*d,).
"""

import dataclasses

import jax
import jax.numpy as jnp

from codajax import architectures

Norm = str  # One of architectures.NORMS.
Params = dict  # {"B": (k, k, C_in, R), "A": (R, C_out*d), "b": (C_out*d,)}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One CoDA layer's shape: C_out DAUs of rank R on k x k patches.

  Frozen and hashable, so it can be a static argument of jax.jit.
  """
  features: int                 # C_out.
  rank: int                     # R.
  kernel: int                   # k.
  stride: int = 1
  padding: int = 0
  norm: Norm = architectures.MODEL_DEFAULTS["norm"]


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Spatial output size of a k x k, stride s, padding p window."""
  return (size + 2 * padding - kernel) // stride + 1


def patches(x: jax.Array, spec: Layer) -> jax.Array:
  """P: (N, H, W, C) -> (N, H', W', C*k*k), feature index c*k*k + ky*k + kx.

  Built from k*k strided slices (pure data movement, exact in any precision).
  """
  k, s, p = spec.kernel, spec.stride, spec.padding
  n, h, w, c = x.shape
  ho, wo = output_size(h, k, s, p), output_size(w, k, s, p)
  if p:
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  if k == 1:
    return x[:, :(ho - 1) * s + 1:s, :(wo - 1) * s + 1:s, :]
  cols = [jax.lax.slice(x, (0, ky, kx, 0), (n, ky + (ho - 1) * s + 1, kx + (wo - 1) * s + 1, c),
                        (1, s, s, 1))
          for ky in range(k) for kx in range(k)]
  return jnp.stack(cols, axis=-1).reshape(n, ho, wo, c * k * k)


def fold(p: jax.Array, in_hw: tuple[int, int], spec: Layer, trailing: int = 0) -> jax.Array:
  """The transpose of `patches`: sums patch entries back onto the input grid.

  p has shape (..., H', W', C*k*k, *T) with `trailing` axes T after the patch
  axis (e.g. classes); the result is (..., H, W, C, *T). A sum of k*k strided,
  zero-interleaved shifts (lax.pad with interior padding): an explicit linear
  map, not a derivative.
  """
  k, s, pad = spec.kernel, spec.stride, spec.padding
  i = p.ndim - 3 - trailing                   # Axis of H'.
  lead, (ho, wo, ckk), trail = p.shape[:i], p.shape[i:i + 3], p.shape[i + 3:]
  h, w = in_hw
  hp, wp = h + 2 * pad, w + 2 * pad
  p = p.reshape(*lead, ho, wo, ckk // (k * k), k, k, *trail)
  out = None
  no_pad = [(0, 0, 0)] * len(lead)
  for ky in range(k):
    for kx in range(k):
      # Output row i of the patch grid reads padded input row i*stride + ky.
      part = jax.lax.index_in_dim(jax.lax.index_in_dim(p, ky, i + 3, False), kx, i + 3, False)
      shifted = jax.lax.pad(
          part, jnp.zeros((), p.dtype),
          no_pad + [(ky, hp - (ky + (ho - 1) * s + 1), s - 1),
                    (kx, wp - (kx + (wo - 1) * s + 1), s - 1)] + [(0, 0, 0)] * (1 + trailing))
      out = shifted if out is None else out + shifted
  out = jax.lax.slice_in_dim(out, pad, pad + h, axis=i)
  return jax.lax.slice_in_dim(out, pad, pad + w, axis=i + 1)


def low_rank(params: Params, spec: Layer, x: jax.Array) -> jax.Array:
  """z = conv_kxk(x; B): (N, H, W, C_in) -> (N, H', W', R), no bias."""
  pad = ((spec.padding, spec.padding),) * 2
  return jax.lax.conv_general_dilated(
      x, params["B"].astype(x.dtype), (spec.stride, spec.stride), pad,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def dynamic_weights(params: Params, spec: Layer, z: jax.Array) -> jax.Array:
  """w = A z + b, reshaped to (..., C_out, d)."""
  w = z @ params["A"].astype(z.dtype) + params["b"].astype(z.dtype)
  return w.reshape(*w.shape[:-1], spec.features, -1)


def inverse_norm_from_sq(sq: jax.Array, norm: Norm) -> jax.Array:
  """1 / n(w) given |w|^2 (float32), finite with finite gradients at w = 0.

  squash: |w| / (1 + |w|^2), which is 0 at w = 0; l2: 1 / |w|, set to 0 at
  w = 0 (the unit then outputs 0, the limit of the squash case). Guards
  sq <= 0 (also rounding below 0).
  """
  positive = sq > jnp.finfo(jnp.float32).tiny
  safe = jnp.where(positive, sq, 1.0)
  if norm == "squash":
    inv = jnp.sqrt(safe) / (1.0 + safe)
  elif norm == "l2":
    inv = jax.lax.rsqrt(safe)
  else:
    raise ValueError(f"norm must be one of {architectures.NORMS}, got {norm!r}")
  return jnp.where(positive, inv, 0.0)


def inverse_norm(w: jax.Array, norm: Norm) -> jax.Array:
  """1 / n(w) over the last axis of w, in float32, keeping that axis (size 1)."""
  sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-1, keepdims=True)
  return inverse_norm_from_sq(sq, norm)


def layer(params: Params, spec: Layer, x: jax.Array) -> jax.Array:
  """The layer output y = w^T P / n(w): (N, H, W, C_in) -> (N, H', W', C_out), float32.

  The products run in x.dtype (parameters cast to it), the sums, the norm and
  y in float32.
  """
  z = low_rank(params, spec, x)                      # z = conv(x; B).
  w = dynamic_weights(params, spec, z)               # w_o = A_o z + b_o.
  p = patches(x, spec)                               # P.
  num = jnp.einsum("...od,...d->...o", w, p, preferred_element_type=jnp.float32)  # w_o^T P.
  return num * inverse_norm(w, spec.norm)[..., 0]    # / n(w_o), finite at w_o = 0.


def matrix(params: Params, spec: Layer, x: jax.Array) -> jax.Array:
  """The layer's dynamic matrix M = w / n(w), (N, H', W', C_out, d), float32.

  y = M P at every position (`layer`, up to rounding).
  """
  w = dynamic_weights(params, spec, low_rank(params, spec, x))
  return w.astype(jnp.float32) * inverse_norm(w, spec.norm)


def transpose(params: Params, spec: Layer, x: jax.Array, g: jax.Array) -> jax.Array:
  """Rows g of a map out of the layer, pulled back to its input x: fold(g M).

  g: (N, H', W', C_out, K), K rows with the row axis last; the result is
  (N, H, W, C_in, K). `codajax.dau_fused` computes the same, faster.
  """
  m = matrix(params, spec, x)
  gm = jnp.einsum("nhwok,nhwod->nhwdk", g, m.astype(g.dtype))    # g M per position.
  return fold(gm, x.shape[1:3], spec, trailing=1)              # Onto the input grid.
