"""The DAU layer and its transpose without forming w at every position.

What: the same functions as `codajax.dau` (same parameters, same `dau.Layer`),
computed from the augmented form. With zb = [z, 1] in R^{R+1} and
Ab_o = [A_o | b_o] in R^{d x (R+1)}, w_o = Ab_o zb, so

  w_o^T P  = sum_r zb_r Q[r, o],   Q = conv_kxk(x; K)  (K = Ab as a k x k kernel
                                                        to (R+1)*C_out channels),
  |w_o|^2  = zb^T G_o zb,          G_o = Ab_o^T Ab_o   (`codajax.squared_norm`).

Why: per position that is d*(R+1)*C_out multiply-adds for Q (about what
forming w costs) plus (R+1)^2*C_out for the norm, but the largest
intermediate is Q, (R+1)*C_out numbers instead of w's C_out*d (9x smaller for
a 64->64, 3x3, rank-64 layer): the training forward (`layer`, with a
hand-written VJP) is limited by memory traffic, not by multiply-adds. Q and z
come from one set of patches, as a convolution or as the patches x matrix
product (`default_contraction`).

Explanations pull rows back through one layer either without forming w
(`transpose`, cheapest for one row) or forming it from zb in one GEMM a chunk
of images at a time (`transpose_materialized`); `codajax.explain` picks by
cost.
"""

import functools
import math

import jax
import jax.numpy as jnp

from codajax import architectures
from codajax import dau
from codajax import squared_norm

Contraction = str  # One of CONTRACTIONS.
CONTRACTIONS = architectures.LAYER_CONTRACTIONS

# How `layer` computes [Q | z] from x, per jax.default_backend(). "dot":
# explicit patches (k*k strided slices) times the (d, (R+1)*C_out + R)
# weights, one GEMM forward and two backward. "conv": convolutions, whose
# backward XLA lowers to its convolution gradients. GEMMs beat convolutions at
# these shapes on CPU and GPU, in time and peak memory (benchmarks/README.md).
# Not measured on TPU, where the convolution is the native path: "conv" there.
FUSED_CONTRACTION = {"cpu": "dot", "gpu": "dot"}
DEFAULT_CONTRACTION: Contraction = "conv"

# Images per chunk when `transpose_materialized` forms a layer's w, per
# backend; None: the whole batch at once. On XLA:CPU a loop over single images
# keeps each w in cache and reuses one buffer instead of page-faulting a
# batch-sized one (faster; benchmarks/README.md). GPUs want the whole batch.
EXPLAIN_CHUNK = {"cpu": 1}
_HI = jax.lax.Precision.HIGHEST


def default_contraction(backend: str | None = None) -> Contraction:
  """The fused layer's contraction for `backend` (default: jax.default_backend())."""
  return FUSED_CONTRACTION.get(backend or jax.default_backend(), DEFAULT_CONTRACTION)


# ----------------------------------------------------------------------------
# The forward. Q is kept with its channels ordered (r, o), r major:
# Q[..., r*C_out + o] = Ab[r, o, :] . P. Then A reshaped to (R*C_out, d) is the
# GEMM's weight as it is stored (no transposed copy of A, and its gradient
# comes out in A's own layout); the bias row b and B form one more, small,
# weight.


def fused_weights(params: dau.Params, spec: dau.Layer,
                  contraction: Contraction) -> tuple[jax.Array, jax.Array]:
  """The two weights of the fused layer's linear part, in the contraction's layout.

  wa gives Q[..., r*C_out + o] for r < R; ws gives [Q[..., R*C_out + o] | z]
  (the bias row, then the R channels of z). "dot": (R*C_out, d) and
  (C_out + R, d), rows dotted with the (c, ky, kx)-ordered patch. "conv": the
  same as HWIO kernels (k, k, C_in, R*C_out) and (k, k, C_in, C_out + R).
  """
  A, b, B = params["A"], params["b"], params["B"]
  k, _, c_in, r = B.shape
  d = c_in * k * k
  b_rows = b.reshape(spec.features, d).astype(A.dtype)
  if contraction == "dot":
    B_rows = B.transpose(3, 2, 0, 1).reshape(r, d).astype(A.dtype)
    return A.reshape(r * spec.features, d), jnp.concatenate([b_rows, B_rows])
  to_hwio = lambda m: m.reshape(-1, c_in, k, k).transpose(2, 3, 1, 0)
  return (to_hwio(A.reshape(r * spec.features, d)),
          jnp.concatenate([to_hwio(b_rows), B.astype(A.dtype)], axis=-1))


def layer(params: dau.Params, spec: dau.Layer, x: jax.Array,
          contraction: Contraction | None = None) -> jax.Array:
  """`dau.layer` (y, (N, H', W', C_out), float32) without forming w.

  The convolution (or GEMM) runs in x.dtype (parameters cast to it); the
  contraction with zb, the norm and the output are float32. contraction:
  "conv" or "dot"; None picks `default_contraction()`.
  """
  contraction = contraction or default_contraction()
  if contraction not in CONTRACTIONS:
    raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}.")
  wa, ws = fused_weights(params, spec, contraction)
  factors = squared_norm.norm_factors(params["A"], params["b"], spec.features)
  return _fused_core(x, wa, ws, factors, spec, contraction)


def _linear(x, wa, ws, spec, contraction):
  """(Q without its bias row, [bias row | z]) in x.dtype, NHWC."""
  wa, ws = wa.astype(x.dtype), ws.astype(x.dtype)
  if contraction == "dot":
    p = dau.patches(x, spec)
    dot = lambda w: jax.lax.dot_general(p, w, (((p.ndim - 1,), (1,)), ((), ())))
    return dot(wa), dot(ws)
  pad = ((spec.padding, spec.padding),) * 2
  conv = lambda w: jax.lax.conv_general_dilated(
      x, w, (spec.stride, spec.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
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
  return num, squared_norm.squared_norms(zb, *factors)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_core(x, wa, ws, factors, spec, contraction):
  num, sq = _num_sq(*_linear(x, wa, ws, spec, contraction), factors)
  return num * dau.inverse_norm_from_sq(sq, spec.norm)


# The backward is written out (the chain rule of the forward, through the
# Gram form of the norm, see `squared_norm.squared_norms`) so that XLA gets
# materialised cotangents in the layouts of the GEMMs. Left to autodiff,
# XLA:CPU fused the next layer's patch fold and the norm's chain rule into
# transposing copies feeding the weight-gradient GEMMs, recomputing them per
# element, which made the training step several times slower (profiled;
# benchmarks/README.md). Residuals: the input, Q and z (C_out*R + C_out + R
# numbers per position); the patches are re-sliced.
def _fused_core_fwd(x, wa, ws, factors, spec, contraction):
  qa, qs = _linear(x, wa, ws, spec, contraction)
  num, sq = _num_sq(qa, qs, factors)
  return num * dau.inverse_norm_from_sq(sq, spec.norm), (x, wa, ws, factors, qa, qs, num, sq)


def _fused_core_bwd(spec, contraction, res, dy):
  x, wa, ws, factors, qa, qs, num, sq = res
  gmat = factors[0]
  f32 = jnp.float32
  r1 = gmat.shape[0]
  c_out = gmat.shape[1] // r1
  lead = qa.shape[:-1]
  dy = jax.lax.optimization_barrier(dy.astype(f32))
  inv, inv_vjp = jax.vjp(lambda s: dau.inverse_norm_from_sq(s, spec.norm), sq)
  dnum = dy * inv
  (dsq,) = inv_vjp(dy * num)
  zb = jnp.concatenate([qs[..., c_out:].astype(f32), jnp.ones((*lead, 1), f32)], axis=-1)
  dzb, dgmat = squared_norm.gram_vjp(zb, gmat, dsq)     # sq_o = zb^T G_o zb.
  dfactors = (dgmat, *map(jnp.zeros_like, factors[1:]))
  # Numerator, num_o = sum_r Q[r, o] zb_r.
  dz = dzb[..., :-1] + jnp.einsum("...ro,...o->...r", qa.reshape(*lead, r1 - 1, c_out), dnum,
                                  preferred_element_type=f32)
  dqa = (zb[..., :-1, None] * dnum[..., None, :]).reshape(qa.shape).astype(qa.dtype)
  dqs = jnp.concatenate([dnum, dz], axis=-1).astype(qs.dtype)
  dqa, dqs = jax.lax.optimization_barrier((dqa, dqs))
  if contraction == "conv":
    _, linear_vjp = jax.vjp(lambda x, wa, ws: _linear(x, wa, ws, spec, contraction), x, wa, ws)
    return (*linear_vjp((dqa, dqs)), dfactors)
  # "dot": the weight gradients as P^T dQ, the input's as fold(dQ W).
  p = dau.patches(x, spec)
  p2 = p.reshape(-1, p.shape[-1])
  dqa2, dqs2 = dqa.reshape(p2.shape[0], -1), dqs.reshape(p2.shape[0], -1)
  tn = (((0,), (0,)), ((), ()))
  dwa = jax.lax.dot_general(p2, dqa2, tn, preferred_element_type=f32).T
  dws = jax.lax.dot_general(p2, dqs2, tn, preferred_element_type=f32).T
  dp = (jnp.dot(dqa2, wa.astype(x.dtype), preferred_element_type=f32)
        + jnp.dot(dqs2, ws.astype(x.dtype), preferred_element_type=f32))
  dx = dau.fold(dp.reshape(p.shape).astype(x.dtype), x.shape[1:3], spec)
  return dx, dwa.astype(wa.dtype), dws.astype(ws.dtype), dfactors


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


# ----------------------------------------------------------------------------
# Explanations: `dau.transpose`, rows g (N, H', W', C_out, K) pulled back to
# the input as fold(g . M), M = w / n(w), computed as (g/n) . w with 1/n from
# `squared_norm.squared_norms`.


def transpose(params: dau.Params, spec: dau.Layer, x: jax.Array, g: jax.Array) -> jax.Array:
  """`dau.transpose` without forming w: ((g/n) (x) zb) . [A; b] as one GEMM from
  C_out*(R+1) to d per position and row, i.e. the transposed convolution of
  (g/n) (x) zb with the fused layer's kernel. Cheapest for one row (K = 1)."""
  ab, factors = _augmented(params, spec)
  ab = ab.reshape(-1, ab.shape[-1])            # Rows (r, o).
  zb, g = _scaled_rows(params, spec, factors, x, g)
  u = zb[..., :, None, None] * g[..., None, :, :]        # (..., R+1, C_out, K)
  g = jnp.einsum("...fk,fj->...jk", u.reshape(*zb.shape[:-1], -1, g.shape[-1]), ab,
                 precision=_HI)
  return dau.fold(g, x.shape[1:3], spec, trailing=1)


def transpose_materialized(params: dau.Params, spec: dau.Layer, x: jax.Array, g: jax.Array,
                           chunk: int | None = None) -> jax.Array:
  """`dau.transpose` with w = [z, 1] @ [A; b] from one GEMM (stored (d, C_out)
  per position), written once and read once by (g/n) . w. Cheapest for
  several rows. `chunk` images at a time (a divisor of the batch is used;
  None: `EXPLAIN_CHUNK` for the backend, else the whole batch) bound the w
  alive at once."""
  ab, factors = _augmented(params, spec)
  c_out = spec.features
  ab = ab.transpose(0, 2, 1).reshape(ab.shape[0], -1)  # w comes out as (d, C_out).

  def pull(x, g):
    zb, g = _scaled_rows(params, spec, factors, x, g)
    w = jnp.dot(zb, ab, precision=_HI).reshape(*zb.shape[:-1], -1, c_out)
    g = jnp.einsum("...jo,...ok->...jk", w, g, precision=_HI)
    return dau.fold(g, x.shape[1:3], spec, trailing=1)

  n = x.shape[0]
  chunk = chunk if chunk is not None else EXPLAIN_CHUNK.get(jax.default_backend(), n)
  chunk = math.gcd(n, chunk)
  if chunk == n:
    return pull(x, g)
  split = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])
  out = jax.lax.map(lambda xg: pull(*xg), (split(x), split(g)))
  return out.reshape(n, *out.shape[2:])


def _augmented(params: dau.Params, spec: dau.Layer):
  """(Ab, the norm's factors): Ab = [A; b] as (R+1, C_out, d) float32, Ab[r, o, j] =
  A[r, o*d + j], Ab[R, o, j] = b[o*d + j]; the factors of `squared_norm.squared_norms`."""
  A, b = params["A"], params["b"]
  ab = jnp.concatenate([A.astype(jnp.float32), b.astype(jnp.float32)[None]],
                       axis=0).reshape(A.shape[0] + 1, spec.features, -1)
  return ab, squared_norm.norm_factors(A, b, spec.features)


def _scaled_rows(params, spec, factors, x, g):
  """(zb = [z, 1], g / n(w)) at every output position: the augmented low-rank
  code (..., R+1) and the rows g (..., C_out, K) divided by the norm."""
  z = dau.low_rank(params, spec, x)
  zb = jnp.concatenate([z.astype(jnp.float32), jnp.ones((*z.shape[:-1], 1), jnp.float32)],
                       axis=-1)
  g = g * dau.inverse_norm_from_sq(squared_norm.squared_norms(zb, *factors),
                                   spec.norm)[..., None]
  return zb, g
