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

Fused form (`fused_layer`), which never forms w. With zb = [z, 1] in R^{R+1}
and Ab_o = [A_o | b_o] in R^{d x (R+1)}:

  w_o^T P  = sum_r zb_r Q[r, o],   Q = conv_kxk(x; K)  (K = Ab as a k x k kernel
                                                        to (R+1)*C_out channels),
  |w_o|^2  = zb^T G_o zb,          G_o = Ab_o^T Ab_o   ((R+1) x (R+1), params only;
                                   evaluated in a cancellation-free form, `norm_factors`).

Per position that is d*(R+1)*C_out multiply-adds for Q (about what forming w
costs) plus (R+1)^2*C_out for the norm, but the largest intermediate is Q,
(R+1)*C_out numbers instead of w's C_out*d (9x smaller for a 64->64, 3x3,
rank-64 layer). Q and z come from one set of patches, as a convolution or as
the patches x matrix product; see `FUSED_CONTRACTION`.

Explanations (`transpose_layer`) pull row vectors back through one layer,
forming that layer's w only (or not at all, for a single row).
"""

import functools
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp

Norm = Literal["squash", "l2"]
NORMS = ("squash", "l2")
Contraction = Literal["conv", "dot"]
CONTRACTIONS = ("conv", "dot")

# How the fused layer computes [Q | z] from x, per jax.default_backend().
# "dot": explicit patches (k*k strided slices) times the (d, (R+1)*C_out + R)
# weights, one GEMM forward and two backward. "conv": convolutions, whose
# backward XLA lowers to its convolution gradients. Measured, CIFAR 9L-S
# training step, one process per figure (benchmarks/README.md):
#   XLA:CPU (2-core Xeon, batch 64): "dot" 3.39 s, "conv" 5.28 s; at the
#     dominant layer's shape fwd+bwd ran at 148 GFLOP/s as GEMMs, 63 as convs.
#   H200 (jax 0.11.2, batch 256, float32): "dot" 36.4 ms, "conv" 39.2 ms (7%;
#     20 steps each, spreads under 1 ms), "dot" also with the lower peak memory
#     (5.6 vs 7.8 GB); at the dominant layer's shape GEMMs ran 1.5-1.6x faster
#     than convs (CIFAR, float32 and bfloat16), 1.2x (ImageNet 9L-L, float32).
# Not measured on TPU, where the convolution is the native path: "conv" there.
FUSED_CONTRACTION = {"cpu": "dot", "gpu": "dot"}
DEFAULT_CONTRACTION: Contraction = "conv"

# Images per chunk when explanations materialise a layer's w (see
# `transpose_layer`), per backend; None: the whole batch at once. On XLA:CPU a
# loop over single images keeps each w in cache and reuses one buffer instead
# of page-faulting a batch-sized one: measured about 1.3x faster per layer
# (CIFAR 9L-S layers 3 and 6, batch 16). GPUs want the whole batch.
EXPLAIN_CHUNK = {"cpu": 1}


def default_contraction(backend: str | None = None) -> Contraction:
  """The fused layer's contraction for `backend` (default: jax.default_backend())."""
  return FUSED_CONTRACTION.get(backend or jax.default_backend(), DEFAULT_CONTRACTION)


def _pad(padding: int) -> Sequence[tuple[int, int]]:
  return ((padding, padding), (padding, padding))


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Spatial output size of a k x k, stride s, padding p window."""
  return (size + 2 * padding - kernel) // stride + 1


def patches(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
  """(N, H, W, C) -> (N, H', W', C*k*k), feature index c*k*k + ky*k + kx.

  Built from k*k strided slices (pure data movement, exact in any precision;
  autodiff transposes it to pads and adds, like `fold`).
  """
  n, h, w, c = x.shape
  ho, wo = output_size(h, kernel, stride, padding), output_size(w, kernel, stride, padding)
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  if kernel == 1:
    return x[:, :(ho - 1) * stride + 1:stride, :(wo - 1) * stride + 1:stride, :]
  cols = [
      jax.lax.slice(x, (0, ky, kx, 0),
                    (n, ky + (ho - 1) * stride + 1, kx + (wo - 1) * stride + 1, c),
                    (1, stride, stride, 1))
      for ky in range(kernel) for kx in range(kernel)]
  return jnp.stack(cols, axis=-1).reshape(n, ho, wo, c * kernel * kernel)


def fold(p: jax.Array, in_hw: tuple[int, int], kernel: int, stride: int,
         padding: int, trailing: int = 0) -> jax.Array:
  """Transpose of `patches`: sums patch entries back onto the input grid.

  p has shape (..., H', W', C*k*k, *T) with `trailing` axes T after the patch
  axis (e.g. classes); the result is (..., H, W, C, *T). Written as a sum of
  k*k strided, zero-interleaved shifts (lax.pad with interior padding), so it
  is an explicit linear map, not a derivative.
  """
  i = p.ndim - 3 - trailing                   # Axis of H'.
  lead, (ho, wo, ckk), trail = p.shape[:i], p.shape[i:i + 3], p.shape[i + 3:]
  c = ckk // (kernel * kernel)
  h, w = in_hw
  hp, wp = h + 2 * padding, w + 2 * padding
  p = p.reshape(*lead, ho, wo, c, kernel, kernel, *trail)
  out = None
  zero = jnp.zeros((), p.dtype)
  no_pad = [(0, 0, 0)] * len(lead)
  for ky in range(kernel):
    for kx in range(kernel):
      # Output row i of the patch grid reads padded input row i*stride + ky.
      hi_y = hp - (ky + (ho - 1) * stride + 1)
      hi_x = wp - (kx + (wo - 1) * stride + 1)
      part = jax.lax.index_in_dim(jax.lax.index_in_dim(p, ky, i + 3, False), kx, i + 3, False)
      shifted = jax.lax.pad(
          part, zero,
          no_pad + [(ky, hi_y, stride - 1), (kx, hi_x, stride - 1)]
          + [(0, 0, 0)] * (1 + trailing))
      out = shifted if out is None else out + shifted
  out = jax.lax.slice_in_dim(out, padding, padding + h, axis=i)
  return jax.lax.slice_in_dim(out, padding, padding + w, axis=i + 1)


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


# ----------------------------------------------------------------------------
# Fused form: never materialises w.
#
# Q is kept with its channels ordered (r, o), r major: Q[..., r*C_out + o] =
# Ab[r, o, :] . P. Then A reshaped to (R*C_out, d) is the GEMM's weight as it
# is stored (no transposed copy of A, and its gradient comes out in A's own
# layout); the bias row b and B form one more, small, weight.


def augmented(A: jax.Array, b: jax.Array, out_channels: int) -> jax.Array:
  """Ab = [A; b] as (R+1, C_out, d): Ab[r, o, j] = A[r, o*d + j], Ab[R, o, j] = b[o*d + j]."""
  return jnp.concatenate([A, b[None]], axis=0).reshape(A.shape[0] + 1, out_channels, -1)


def norm_factors(A: jax.Array, b: jax.Array, out_channels: int) -> tuple[jax.Array, ...]:
  """(gmat, quad, lin, ridge), float32, parameters only (once per call): two
  forms of the squared norms |w_o|^2 = |A_o z + b_o|^2, for `squared_norms`.

  gmat, (R+1, (R+1)*C_out), the Gram form: entry [s, r*C_out + o] is
  G_o[r, s], G_o = Ab_o^T Ab_o, so (zb @ gmat)[..., r*C_out + o] = (G_o zb)_r
  and |w_o|^2 = zb^T G_o zb, C_out*(R+1)^2*d multiply-adds. Gradients use it.

  quad (R+1, R*C_out), lin (R+1, C_out) and ridge (C_out,) give the values.
  zb^T G_o zb loses |w_o|^2 to rounding when w_o is small next to its terms,
  i.e. when b_o nearly cancels A_o z (relative error ~ eps (|A_o z| /
  |w_o|)^2; with the l2 norm such units broke the |y| <= |P| bound). So b_o
  is split first: b_o = A_o c_o + bp_o, c_o the least-squares coefficients,
  bp_o the residual; with G_AA,o + lam_o I = L_o L_o^T and u = z + c_o,
    |w_o|^2 = |L_o^T u|^2 - lam_o |u|^2 + 2 u^T A_o^T bp_o + |bp_o|^2,
  where u and bp_o are differences of vectors, formed as accurately as w
  itself (error ~ eps |A_o z| / |w_o|). (zb @ quad)[..., r*C_out + o] is
  (L_o^T u)_r, zb @ lin the linear and constant terms; the -lam_o |z|^2 term
  is `squared_norms`'s. The identity holds for any c_o, so
  c_o takes no gradient; the ridge lam_o = R*eps*mean(diag G_AA,o) keeps L_o
  finite for rank-deficient A_o and is subtracted again.
  """
  r = A.shape[0]
  f32, hi = jnp.float32, jax.lax.Precision.HIGHEST
  # Ab_o for every o, (C_out, R+1, d): one copy of A, batch axis first.
  ab = jnp.concatenate([A.astype(f32).reshape(r, out_channels, -1).transpose(1, 0, 2),
                        b.astype(f32).reshape(out_channels, 1, -1)], axis=1)
  g = jax.lax.dot_general(ab, ab, (((2,), (2,)), ((0,), (0,))), precision=hi)  # (C_out, R+1, R+1)
  gmat = g.transpose(2, 1, 0).reshape(r + 1, -1)

  g, ab = jax.lax.stop_gradient((g, ab))   # quad, lin and ridge: values only.
  g_aa, g_ab = g[:, :r, :r], g[:, :r, r]
  ridge = r * jnp.finfo(f32).eps * jnp.mean(jnp.diagonal(g_aa, axis1=1, axis2=2), axis=1)
  ridge = ridge + jnp.finfo(f32).tiny
  chol, c = _cholesky_solve(g_aa + ridge[:, None, None] * jnp.eye(r, dtype=f32), g_ab)
  # bp = b - A c from the d-dimensional vectors (one read of Ab); A^T bp from G.
  c1 = jnp.concatenate([-c, jnp.ones((out_channels, 1), f32)], axis=1)
  bp = jnp.einsum("osd,os->od", ab, c1, precision=hi)                            # (C_out, d)
  h = g_ab - jnp.einsum("ors,os->or", g_aa, c, precision=hi)                     # A^T bp
  lt = chol.transpose(0, 2, 1)                                                   # L_o^T
  shift = jnp.einsum("ors,os->or", lt, c, precision=hi)                          # L_o^T c_o
  lin_z = 2.0 * (h - ridge[:, None] * c)
  const = (2.0 * jnp.sum(c * h, axis=1) + jnp.sum(bp * bp, axis=1)
           - ridge * jnp.sum(c * c, axis=1))
  quad = jnp.concatenate([lt.transpose(2, 1, 0), shift.T[None]], axis=0)       # (R+1, R, C_out)
  lin = jnp.concatenate([lin_z.T, const[None]], axis=0)                        # (R+1, C_out)
  return gmat, quad.reshape(r + 1, -1), lin, ridge


# The Cholesky factorisation and solve are loops over the R columns of a
# (C_out, R, R) batch, not jnp.linalg: on CPU those call LAPACK through custom
# calls which, run concurrently by XLA:CPU for several layers, deadlocked here
# (reproduced: the CIFAR 9L-S forward hung in OpenBLAS's thread server).


def _cholesky_solve(g: jax.Array, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(L, x) with L L^T = g (lower L) and g x = rhs, for batches (..., R, R) of
  SPD matrices and (..., R) right-hand sides. One loop factors g and solves
  L y = rhs alongside (row j of L is final after column j-1), then L^T x = y.
  """
  r = g.shape[-1]
  rows = jnp.arange(r)
  hi = jax.lax.Precision.HIGHEST
  take = lambda a, j, axis: jax.lax.dynamic_index_in_dim(a, j, axis, keepdims=False)

  def factor(j, carry):
    l, y = carry
    lj = take(l, j, -2)                      # Row j: columns < j are final, the rest 0.
    v = take(g, j, -1) - jnp.einsum("...ik,...k->...i", l, lj, precision=hi)
    pivot = jnp.sqrt(jnp.maximum(take(v, j, -1), jnp.finfo(g.dtype).tiny))
    yj = (take(rhs, j, -1) - jnp.sum(lj * y, -1)) / pivot
    l = jax.lax.dynamic_update_index_in_dim(l, jnp.where(rows >= j, v / pivot[..., None], 0.0),
                                            j, -1)
    return l, jax.lax.dynamic_update_index_in_dim(y, yj, j, -1)

  l, y = jax.lax.fori_loop(0, r, factor, (jnp.zeros_like(g), jnp.zeros_like(rhs)))
  diag = jnp.diagonal(l, axis1=-2, axis2=-1)

  def back(i, x):                            # L^T x = y, from the last row up.
    j = r - 1 - i
    xj = (take(y, j, -1) - jnp.sum(take(l, j, -1) * x, -1)) / take(diag, j, -1)
    return jax.lax.dynamic_update_index_in_dim(x, xj, j, -1)

  return l, jax.lax.fori_loop(0, r, back, jnp.zeros_like(rhs))


def squared_norms(zb: jax.Array, gmat: jax.Array, quad: jax.Array, lin: jax.Array,
                  ridge: jax.Array) -> jax.Array:
  """|w_o|^2, float32 (..., C_out), from `norm_factors`: values from quad,
  lin and ridge, derivatives (in zb and gmat) as zb^T G_o zb's, the same
  function."""
  return _squared_norms(zb, gmat, *jax.lax.stop_gradient((quad, lin, ridge)))


@jax.custom_vjp
def _squared_norms(zb, gmat, quad, lin, ridge):
  hi = jax.lax.Precision.HIGHEST
  c_out = lin.shape[-1]
  v = jnp.dot(zb, quad, precision=hi)
  v = v.reshape(*v.shape[:-1], -1, c_out)
  z = zb[..., :-1]
  return (jnp.einsum("...ro,...ro->...o", v, v, precision=hi)
          + jnp.dot(zb, lin, precision=hi)
          - ridge * jnp.sum(z * z, axis=-1, keepdims=True))


def _squared_norms_fwd(zb, gmat, quad, lin, ridge):
  return _squared_norms(zb, gmat, quad, lin, ridge), (zb, gmat, quad, lin, ridge)


def _squared_norms_bwd(res, dsq):
  zb, gmat, *values = res
  dzb, dgmat = _squared_norms_vjp(zb, gmat, dsq)
  return (dzb, dgmat, *map(jnp.zeros_like, values))


def _squared_norms_vjp(zb, gmat, dsq):
  """Cotangents of zb and gmat for sq_o = zb^T G_o zb (G_o symmetric)."""
  r1 = gmat.shape[0]
  c_out = gmat.shape[1] // r1
  lead = zb.shape[:-1]
  # d gmat[s, (r, o)] = sum zb_s zb_r dsq_o, and d zb = 2 sum_o dsq_o G_o zb =
  # 2 v @ gmat^T with v[(r, o)] = zb_r dsq_o.
  v = (zb[..., None] * dsq[..., None, :]).reshape(*lead, r1 * c_out)
  dgmat = jax.lax.dot_general(zb.reshape(-1, r1), v.reshape(-1, r1 * c_out),
                              (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
  dzb = 2.0 * jnp.dot(v, gmat.T, precision=jax.lax.Precision.HIGHEST)
  return dzb, dgmat


_squared_norms.defvjp(_squared_norms_fwd, _squared_norms_bwd)


def fused_weights(A: jax.Array, b: jax.Array, B: jax.Array, out_channels: int,
                  contraction: Contraction) -> tuple[jax.Array, jax.Array]:
  """The two weights of the fused layer's linear part, in the contraction's layout.

  wa gives Q[..., r*C_out + o] for r < R; ws gives [Q[..., R*C_out + o] | z]
  (the bias row, then the R channels of z). "dot": (R*C_out, d) and
  (C_out + R, d), rows dotted with the (c, ky, kx)-ordered patch. "conv": the
  same as HWIO kernels (k, k, C_in, R*C_out) and (k, k, C_in, C_out + R).
  """
  k, _, c_in, r = B.shape
  d = c_in * k * k
  b_rows = b.reshape(out_channels, d).astype(A.dtype)
  if contraction == "dot":
    B_rows = B.transpose(3, 2, 0, 1).reshape(r, d).astype(A.dtype)
    return A.reshape(r * out_channels, d), jnp.concatenate([b_rows, B_rows])
  to_hwio = lambda m: m.reshape(-1, c_in, k, k).transpose(2, 3, 1, 0)
  return (to_hwio(A.reshape(r * out_channels, d)),
          jnp.concatenate([to_hwio(b_rows), B.astype(A.dtype)], axis=-1))


def fused_layer(x: jax.Array, B: jax.Array, A: jax.Array, b: jax.Array,
                out_channels: int, kernel: int, stride: int, padding: int,
                norm: Norm, contraction: Contraction | None = None) -> jax.Array:
  """The CoDA layer output y (N, H', W', C_out), float32, without forming w.

  The convolution (or GEMM) runs in x.dtype (parameters cast to it); the
  contraction with zb, the norm (`norm_factors`) and the output are float32.
  contraction: "conv" or "dot"; None picks `default_contraction()`.
  """
  contraction = contraction or default_contraction()
  if contraction not in CONTRACTIONS:
    raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}.")
  wa, ws = fused_weights(A, b, B, out_channels, contraction)
  return _fused_core(x, wa, ws, norm_factors(A, b, out_channels), kernel, stride,
                     padding, norm, contraction)


def _linear(x, wa, ws, kernel, stride, padding, contraction):
  """(Q without its bias row, [bias row | z]) in x.dtype, NHWC."""
  wa, ws = wa.astype(x.dtype), ws.astype(x.dtype)
  if contraction == "dot":
    p = patches(x, kernel, stride, padding)
    dot = lambda w: jax.lax.dot_general(p, w, (((p.ndim - 1,), (1,)), ((), ())))
    return dot(wa), dot(ws)
  conv = lambda w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), _pad(padding), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return conv(wa), conv(ws)


def _num_sq(qa, qs, factors):
  """Numerators w_o^T P and squared norms |w_o|^2, float32 (..., C_out)."""
  r1 = factors[0].shape[0]
  c_out = factors[0].shape[1] // r1
  lead = qa.shape[:-1]
  zb = jnp.concatenate([qs[..., c_out:].astype(jnp.float32),
                        jnp.ones((*lead, 1), jnp.float32)], axis=-1)
  num = (jnp.einsum("...ro,...r->...o", qa.reshape(*lead, r1 - 1, c_out), zb[..., :-1],
                    preferred_element_type=jnp.float32)
         + qs[..., :c_out].astype(jnp.float32))
  return num, _squared_norms(zb, *factors)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused_core(x, wa, ws, factors, kernel, stride, padding, norm, contraction):
  num, sq = _num_sq(*_linear(x, wa, ws, kernel, stride, padding, contraction), factors)
  return num * inverse_norm_from_sq(sq, norm)


# The backward is written out (the chain rule of the forward, through the
# Gram form of the norm, see `squared_norms`) so that XLA gets materialised cotangents in
# the layouts of the GEMMs. Left to autodiff, XLA:CPU fused the next layer's
# patch fold and the norm's chain rule into transposing copies feeding the
# weight-gradient GEMMs, recomputing them per element: the training step took
# 3x longer (profiled; benchmarks/README.md). Residuals: the input, Q and z
# (C_out*R + C_out + R numbers per position); the patches are re-sliced.
def _fused_core_fwd(x, wa, ws, factors, kernel, stride, padding, norm, contraction):
  qa, qs = _linear(x, wa, ws, kernel, stride, padding, contraction)
  num, sq = _num_sq(qa, qs, factors)
  return num * inverse_norm_from_sq(sq, norm), (x, wa, ws, factors, qa, qs, num, sq)


def _fused_core_bwd(kernel, stride, padding, norm, contraction, res, dy):
  x, wa, ws, factors, qa, qs, num, sq = res
  gmat = factors[0]
  hi, f32 = jax.lax.Precision.HIGHEST, jnp.float32
  r1 = gmat.shape[0]
  c_out = gmat.shape[1] // r1
  lead = qa.shape[:-1]
  dy = jax.lax.optimization_barrier(dy.astype(f32))
  inv, inv_vjp = jax.vjp(lambda s: inverse_norm_from_sq(s, norm), sq)
  dnum = dy * inv
  (dsq,) = inv_vjp(dy * num)
  zb = jnp.concatenate([qs[..., c_out:].astype(f32), jnp.ones((*lead, 1), f32)], axis=-1)
  dzb, dgmat = _squared_norms_vjp(zb, gmat, dsq)     # sq_o = zb^T G_o zb.
  dfactors = (dgmat, *map(jnp.zeros_like, factors[1:]))
  # Numerator, num_o = sum_r Q[r, o] zb_r.
  dz = dzb[..., :-1] + jnp.einsum("...ro,...o->...r", qa.reshape(*lead, r1 - 1, c_out), dnum,
                       preferred_element_type=f32)
  dqa = (zb[..., :-1, None] * dnum[..., None, :]).reshape(qa.shape).astype(qa.dtype)
  dqs = jnp.concatenate([dnum, dz], axis=-1).astype(qs.dtype)
  dqa, dqs = jax.lax.optimization_barrier((dqa, dqs))
  if contraction == "conv":
    _, linear_vjp = jax.vjp(
        lambda x, wa, ws: _linear(x, wa, ws, kernel, stride, padding, contraction),
        x, wa, ws)
    return (*linear_vjp((dqa, dqs)), dfactors)
  # "dot": the weight gradients as P^T dQ, the input's as fold(dQ W).
  p = patches(x, kernel, stride, padding)
  p2 = p.reshape(-1, p.shape[-1])
  dqa2, dqs2 = dqa.reshape(p2.shape[0], -1), dqs.reshape(p2.shape[0], -1)
  tn = (((0,), (0,)), ((), ()))
  dwa = jax.lax.dot_general(p2, dqa2, tn, preferred_element_type=f32).T
  dws = jax.lax.dot_general(p2, dqs2, tn, preferred_element_type=f32).T
  dp = (jnp.dot(dqa2, wa.astype(x.dtype), preferred_element_type=f32)
        + jnp.dot(dqs2, ws.astype(x.dtype), preferred_element_type=f32))
  dx = fold(dp.reshape(p.shape).astype(x.dtype), x.shape[1:3], kernel, stride, padding)
  return dx, dwa.astype(wa.dtype), dws.astype(ws.dtype), dfactors


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


# ----------------------------------------------------------------------------
# Explanations: row vectors through one layer, materialising w for it only.


def transpose_layer(g: jax.Array, x: jax.Array, B: jax.Array, A: jax.Array,
                    b: jax.Array, out_channels: int, kernel: int, stride: int,
                    padding: int, norm: Norm, fused: bool = False,
                    chunk: int | None | str = "auto") -> jax.Array:
  """Rows of a map out of the layer, pulled back through it to its input x.

  g holds K rows with the row axis last, (N, H', W', C_out, K), the layout
  in which every product below is a plain GEMM; the result is fold(g . M),
  (N, H, W, C_in, K), float32, with M = w / n(w) the layer's normalised
  matrix: per class, `fold(transpose_matrix(g, normalised_matrix(w)))`.
  It is computed as (g/n) . w, with 1/n from `squared_norms`, in one of two ways:

    materialised (fused=False): w = [z, 1] @ [A; b] from one GEMM (stored
      (d, C_out) per position), written once and read once by (g/n) . w;
      `chunk` images at a time (None: all; "auto": `EXPLAIN_CHUNK` for the
      backend) bound the w alive at once.
    fused (fused=True): never forms w; ((g/n) (x) zb) . [A; b] as one GEMM
      from C_out*(R+1) to d per position and row, i.e. the transposed
      convolution of (g/n) (x) zb with the fused layer's kernel.
  """
  if chunk == "auto":
    chunk = EXPLAIN_CHUNK.get(jax.default_backend())
  r1 = A.shape[0] + 1
  ab = augmented(A.astype(jnp.float32), b.astype(jnp.float32), out_channels)  # (R+1, C_out, d)
  factors = norm_factors(A, b, out_channels)
  if fused:
    ab = ab.reshape(r1 * out_channels, -1)     # Rows (r, o).
  else:
    ab = ab.transpose(0, 2, 1).reshape(r1, -1)  # w comes out as (d, C_out).
  in_hw = x.shape[1:3]
  hi = jax.lax.Precision.HIGHEST

  def pull(x, g):
    z = low_rank(x, B, stride, padding)
    lead = z.shape[:-1]
    zb = jnp.concatenate([z.astype(jnp.float32), jnp.ones((*lead, 1), jnp.float32)], axis=-1)
    g = g * inverse_norm_from_sq(squared_norms(zb, *factors), norm)[..., None]
    if fused:
      u = zb[..., :, None, None] * g[..., None, :, :]        # (..., R+1, C_out, K)
      g = jnp.einsum("...fk,fj->...jk", u.reshape(*lead, -1, g.shape[-1]), ab,
                     precision=hi)
    else:
      w = jnp.dot(zb, ab, precision=hi).reshape(*lead, -1, out_channels)
      g = jnp.einsum("...jo,...ok->...jk", w, g, precision=hi)
    return fold(g, in_hw, kernel, stride, padding, trailing=1)

  n = x.shape[0]
  chunk = math.gcd(n, chunk) if (chunk and not fused) else n
  if chunk == n:
    return pull(x, g)
  split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])
  out = jax.lax.map(lambda xg: pull(*xg), (split(x), split(g)))
  return out.reshape(n, *out.shape[2:])
