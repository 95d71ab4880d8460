"""Dynamic Alignment Unit math, as pure functions of arrays.

A CoDA layer with C_in input channels, C_out DAUs, kernel k, stride s,
padding p and rank R (d = C_in*k*k) computes, at every output position:

  P   = the input patch in R^d, ordered (channel, ky, kx) like torch's unfold,
  z   = conv_kxk(x; B)                           in R^R,
  w_o = A_o z + b_o                              in R^d,    o = 1..C_out,
  y_o = w_o^T P / n(w_o),  n = (1+|w|^2)/|w| ("squash") or |w| ("l2").

The parameters live in `models.CoDAConv`; everything here takes them as plain
arrays so that another implementation (e.g. a fused one that never forms w)
can slot in behind the same parameters.

Shapes: x is NHWC; B is HWIO (k, k, C_in, R); A is (R, C_out*d) with output
channel index o*d + j; b is (C_out*d,).
"""

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

Norm = Literal["squash", "l2"]
NORMS = ("squash", "l2")


def _pad(padding: int) -> Sequence[tuple[int, int]]:
  return ((padding, padding), (padding, padding))


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Spatial output size of a k x k, stride s, padding p window."""
  return (size + 2 * padding - kernel) // stride + 1


def patches(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """(N, H, W, C) -> (N, H', W', C*k*k), feature index c*k*k + ky*k + kx."""
  return jax.lax.conv_general_dilated_patches(
      x, (kernel, kernel), (stride, stride), _pad(padding),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def fold(p: jax.Array, in_hw: tuple[int, int], kernel: int, stride: int,
         padding: int) -> jax.Array:
  """Transpose of `patches`: sums patch entries back onto the input grid.

  p has shape (..., H', W', C*k*k); the result is (..., H, W, C). Written as a
  sum of k*k strided, zero-interleaved shifts (lax.pad with interior padding),
  so it is an explicit linear map, not a derivative.
  """
  *lead, ho, wo, ckk = p.shape
  c = ckk // (kernel * kernel)
  h, w = in_hw
  hp, wp = h + 2 * padding, w + 2 * padding
  p = p.reshape(*lead, ho, wo, c, kernel, kernel)
  out = None
  zero = jnp.zeros((), p.dtype)
  no_pad = [(0, 0, 0)] * len(lead)
  for ky in range(kernel):
    for kx in range(kernel):
      # Output row i of the patch grid reads padded input row i*stride + ky.
      hi_y = hp - (ky + (ho - 1) * stride + 1)
      hi_x = wp - (kx + (wo - 1) * stride + 1)
      shifted = jax.lax.pad(
          p[..., ky, kx], zero,
          no_pad + [(ky, hi_y, stride - 1), (kx, hi_x, stride - 1), (0, 0, 0)])
      out = shifted if out is None else out + shifted
  return out[..., padding:padding + h, padding:padding + w, :]


def low_rank(x: jax.Array, B: jax.Array, stride: int, padding: int) -> jax.Array:
  """z = conv_kxk(x; B): (N, H, W, C_in) -> (N, H', W', R), no bias."""
  return jax.lax.conv_general_dilated(
      x, B.astype(x.dtype), (stride, stride), _pad(padding),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def dynamic_weights(z: jax.Array, A: jax.Array, b: jax.Array,
                    out_channels: int) -> jax.Array:
  """w = A z + b, reshaped to (..., C_out, d)."""
  w = z @ A.astype(z.dtype) + b.astype(z.dtype)
  return w.reshape(*w.shape[:-1], out_channels, -1)


def inverse_norm(w: jax.Array, norm: Norm) -> jax.Array:
  """1 / n(w) over the last axis, in float32, finite with finite gradients at w = 0.

  squash: |w| / (1 + |w|^2), which is 0 at w = 0; l2: 1 / |w|, set to 0 at w = 0
  (the unit then outputs 0, the limit of the squash case).
  """
  sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-1, keepdims=True)
  return inverse_norm_from_sq(sq, norm)


def inverse_norm_from_sq(sq: jax.Array, norm: Norm) -> jax.Array:
  """1 / n(w) given |w|^2 (float32); guards sq <= 0 (also rounding below 0)."""
  positive = sq > jnp.finfo(jnp.float32).tiny
  safe = jnp.where(positive, sq, 1.0)
  if norm == "squash":
    inv = jnp.sqrt(safe) / (1.0 + safe)
  elif norm == "l2":
    inv = jax.lax.rsqrt(safe)
  else:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  return jnp.where(positive, inv, 0.0)


def normalised_matrix(w: jax.Array, norm: Norm) -> jax.Array:
  """The layer's dynamic matrix w / n(w), shape (..., C_out, d), float32."""
  return w.astype(jnp.float32) * inverse_norm(w, norm)


def apply_matrix(matrix: jax.Array, p: jax.Array) -> jax.Array:
  """y_o = sum_j matrix[o, j] p[j] at every position: (..., C_out, d), (..., d)."""
  return jnp.einsum("...od,...d->...o", matrix, p.astype(matrix.dtype))


def transpose_matrix(g: jax.Array, matrix: jax.Array) -> jax.Array:
  """Row vectors through the matrix: (N, K, H', W', C_out) x (N, H', W', C_out, d)."""
  return jnp.einsum("nkhwo,nhwod->nkhwd", g, matrix.astype(g.dtype))
