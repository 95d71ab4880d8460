"""The squared norms |w_o|^2 of the dynamic weights, without forming w.

What: with zb = [z, 1] in R^{R+1} and Ab_o = [A_o | b_o] in R^{d x (R+1)}, the
DAU's weight is w_o = Ab_o zb, so |w_o|^2 = zb^T G_o zb with G_o = Ab_o^T Ab_o,
an (R+1) x (R+1) matrix of the parameters alone. `norm_factors` prepares, once
per call, what `squared_norms` then evaluates at every position in
C_out*(R+1)^2 multiply-adds instead of C_out*d.

Why a file of its own: zb^T G_o zb loses |w_o|^2 to rounding when w_o is small
next to A_o z and b_o (the two nearly cancel; relative error ~ eps (|A_o z| /
|w_o|)^2), and with the l2 norm such units broke the |y| <= |P| bound. The
values therefore come from a cancellation-free factorisation (`norm_factors`),
the derivatives from the Gram form, through a custom VJP. Used by the fused
layer and the fast explanation transposes (`codajax.dau_fused`).
"""

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def norm_factors(A: jax.Array, b: jax.Array, out_channels: int) -> tuple[jax.Array, ...]:
  """(gmat, quad, lin, ridge), float32, parameters only (once per call): two
  forms of the squared norms |w_o|^2 = |A_o z + b_o|^2, for `squared_norms`.

  gmat, (R+1, (R+1)*C_out), the Gram form: entry [s, r*C_out + o] is
  G_o[r, s], G_o = Ab_o^T Ab_o, so (zb @ gmat)[..., r*C_out + o] = (G_o zb)_r
  and |w_o|^2 = zb^T G_o zb, C_out*(R+1)^2*d multiply-adds. Gradients use it.

  quad (R+1, R*C_out), lin (R+1, C_out) and ridge (C_out,) give the values.
  b_o is split first: b_o = A_o c_o + bp_o, c_o the least-squares
  coefficients, bp_o the residual; with G_AA,o + lam_o I = L_o L_o^T and
  u = z + c_o,
    |w_o|^2 = |L_o^T u|^2 - lam_o |u|^2 + 2 u^T A_o^T bp_o + |bp_o|^2,
  where u and bp_o are differences of vectors, formed as accurately as w
  itself (error ~ eps |A_o z| / |w_o|). (zb @ quad)[..., r*C_out + o] is
  (L_o^T u)_r, zb @ lin the linear and constant terms; the -lam_o |z|^2 term
  is `squared_norms`'s. The identity holds for any c_o, so c_o takes no
  gradient; the ridge lam_o = R*eps*mean(diag G_AA,o) keeps L_o finite for
  rank-deficient A_o and is subtracted again.
  """
  r = A.shape[0]
  f32 = jnp.float32
  # Ab_o for every o, (C_out, R+1, d): one copy of A, batch axis first.
  ab = jnp.concatenate([A.astype(f32).reshape(r, out_channels, -1).transpose(1, 0, 2),
                        b.astype(f32).reshape(out_channels, 1, -1)], axis=1)
  g = jax.lax.dot_general(ab, ab, (((2,), (2,)), ((0,), (0,))), precision=_HI)  # (C_out, R+1, R+1)
  gmat = g.transpose(2, 1, 0).reshape(r + 1, -1)

  g, ab = jax.lax.stop_gradient((g, ab))   # quad, lin and ridge: values only.
  g_aa, g_ab = g[:, :r, :r], g[:, :r, r]
  ridge = r * jnp.finfo(f32).eps * jnp.mean(jnp.diagonal(g_aa, axis1=1, axis2=2), axis=1)
  ridge = ridge + jnp.finfo(f32).tiny
  chol, c = cholesky_solve(g_aa + ridge[:, None, None] * jnp.eye(r, dtype=f32), g_ab)
  # bp = b - A c from the d-dimensional vectors (one read of Ab); A^T bp from G.
  c1 = jnp.concatenate([-c, jnp.ones((out_channels, 1), f32)], axis=1)
  bp = jnp.einsum("osd,os->od", ab, c1, precision=_HI)                           # (C_out, d)
  h = g_ab - jnp.einsum("ors,os->or", g_aa, c, precision=_HI)                    # A^T bp
  lt = chol.transpose(0, 2, 1)                                                   # L_o^T
  shift = jnp.einsum("ors,os->or", lt, c, precision=_HI)                         # L_o^T c_o
  lin_z = 2.0 * (h - ridge[:, None] * c)
  const = (2.0 * jnp.sum(c * h, axis=1) + jnp.sum(bp * bp, axis=1)
           - ridge * jnp.sum(c * c, axis=1))
  quad = jnp.concatenate([lt.transpose(2, 1, 0), shift.T[None]], axis=0)       # (R+1, R, C_out)
  lin = jnp.concatenate([lin_z.T, const[None]], axis=0)                        # (R+1, C_out)
  return gmat, quad.reshape(r + 1, -1), lin, ridge


def cholesky_solve(g: jax.Array, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(L, x) with L L^T = g (lower L) and g x = rhs, for batches (..., R, R) of
  SPD matrices and (..., R) right-hand sides. One loop factors g and solves
  L y = rhs alongside (row j of L is final after column j-1), then L^T x = y.

  Loops over the R columns rather than jnp.linalg: on CPU, jnp.linalg calls
  LAPACK through custom calls, which XLA:CPU runs concurrently for several
  layers, and those deadlocked in OpenBLAS's thread server (the CIFAR 9L-S
  forward hung).
  """
  r = g.shape[-1]
  rows = jnp.arange(r)
  take = lambda a, j, axis: jax.lax.dynamic_index_in_dim(a, j, axis, keepdims=False)

  def factor(j, carry):
    l, y = carry
    lj = take(l, j, -2)                      # Row j: columns < j are final, the rest 0.
    v = take(g, j, -1) - jnp.einsum("...ik,...k->...i", l, lj, precision=_HI)
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
  c_out = lin.shape[-1]
  v = jnp.dot(zb, quad, precision=_HI)
  v = v.reshape(*v.shape[:-1], -1, c_out)
  z = zb[..., :-1]
  return (jnp.einsum("...ro,...ro->...o", v, v, precision=_HI)
          + jnp.dot(zb, lin, precision=_HI)
          - ridge * jnp.sum(z * z, axis=-1, keepdims=True))


def _squared_norms_fwd(zb, gmat, quad, lin, ridge):
  return _squared_norms(zb, gmat, quad, lin, ridge), (zb, gmat, quad, lin, ridge)


def _squared_norms_bwd(res, dsq):
  zb, gmat, *values = res
  dzb, dgmat = gram_vjp(zb, gmat, dsq)
  return (dzb, dgmat, *map(jnp.zeros_like, values))


def gram_vjp(zb: jax.Array, gmat: jax.Array, dsq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cotangents of zb and gmat for sq_o = zb^T G_o zb (G_o symmetric)."""
  r1 = gmat.shape[0]
  c_out = gmat.shape[1] // r1
  lead = zb.shape[:-1]
  # d gmat[s, (r, o)] = sum zb_s zb_r dsq_o, and d zb = 2 sum_o dsq_o G_o zb =
  # 2 v @ gmat^T with v[(r, o)] = zb_r dsq_o.
  v = (zb[..., None] * dsq[..., None, :]).reshape(*lead, r1 * c_out)
  dgmat = jax.lax.dot_general(zb.reshape(-1, r1), v.reshape(-1, r1 * c_out),
                              (((0,), (0,)), ((), ())), precision=_HI)
  dzb = 2.0 * jnp.dot(v, gmat.T, precision=_HI)
  return dzb, dgmat


_squared_norms.defvjp(_squared_norms_fwd, _squared_norms_bwd)
