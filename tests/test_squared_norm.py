"""Tests for codajax.squared_norm: |w|^2 without forming w, accurate when the
two terms of w = A z + b nearly cancel, with the Gram form's derivatives."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import models
from codajax import squared_norm


def _cancelling(r=2, d=8, c=512, seed=0):
  """One position, 1x1 kernel, c units; b_o = -A_o z + delta_o with |delta_o|
  about 1e-4 |A_o z|, so w_o is small next to the two terms that form it."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(1, 1, 1, d)).astype(np.float32)
  B = rng.normal(size=(1, 1, d, r)).astype(np.float32)
  A = rng.normal(size=(r, c * d)).astype(np.float32)
  z = x[0, 0, 0].astype(np.float64) @ B[0, 0]
  b = (-(z @ A) + 1e-4 * rng.normal(size=c * d)).astype(np.float32)
  return x, B, A, b


def _cancellation_ratio(impl, contraction, norm):
  """max_o |y_o| / ||P|| when every w_o nearly cancels."""
  x, B, A, b = _cancelling()
  conv = models.CoDAConv(features=A.shape[1] // x.shape[-1], rank=A.shape[0], kernel_size=1,
                         norm=norm, impl=impl, contraction=contraction)
  y = jax.jit(conv.apply)({"params": {"A": A, "B": B, "b": b}}, x)
  return float(jnp.max(jnp.abs(y))) / float(np.linalg.norm(x))


@pytest.mark.parametrize("impl,contraction,norm", [
    ("materialized", "auto", "l2"), ("materialized", "auto", "squash"),
    ("fused", "dot", "squash"), ("fused", "conv", "squash")])
def test_bound_when_weights_cancel(impl, contraction, norm):
  assert _cancellation_ratio(impl, contraction, norm) <= 1.0 + 1e-5


# The plain Gram form zb^T (Ab^T Ab) zb cancels catastrophically in float32
# when |w| is small next to |A z| and |b| (l2 output reached 1.85 ||P||);
# norm_factors splits b to keep |w|^2 as accurate as forming w.
@pytest.mark.parametrize("contraction", ["dot", "conv"])
def test_fused_l2_bound_when_weights_cancel(contraction):
  assert _cancellation_ratio("fused", contraction, "l2") <= 1.0 + 1e-5, contraction


def test_squared_norms_accurate_where_the_gram_form_is_not():
  """Against |w|^2 in float64, where w's two terms cancel to 1e-4: the error
  is ~ eps |A z| / |w| (1e-3 relative), the plain Gram form's ~ eps (|A z| /
  |w|)^2 (order 1)."""
  x, B, A, b = _cancelling(c=64)
  c_out = 64
  z = jnp.asarray(x[0, 0, 0] @ B[0, 0])
  zb = jnp.concatenate([z, jnp.ones(1)])[None]
  factors = jax.jit(squared_norm.norm_factors, static_argnums=2)(A, b, c_out)
  sq = jax.jit(squared_norm.squared_norms)(zb, *factors)[0]
  gram = jnp.einsum("s,sf,f->f", zb[0], factors[0], jnp.repeat(zb[0], c_out)).reshape(-1, c_out)
  gram = jnp.sum(gram, axis=0)                       # zb^T G_o zb in float32.
  w64 = (np.asarray(z, np.float64) @ A.astype(np.float64) + b).reshape(c_out, -1)
  exact = np.sum(w64 ** 2, axis=-1)
  rel = lambda v: np.max(np.abs(np.asarray(v, np.float64) - exact) / exact)
  assert rel(sq) < 1e-2
  assert rel(gram) > 0.1                             # The case really cancels.


def test_squared_norm_gradients_are_the_gram_forms():
  """d/d(zb, A, b) of squared_norms == autodiff of |Ab_o zb|^2."""
  rng = np.random.default_rng(3)
  r, c_out, d = 3, 4, 5
  A = jnp.asarray(rng.normal(size=(r, c_out * d)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(c_out * d,)), jnp.float32)
  zb = jnp.concatenate([jnp.asarray(rng.normal(size=(2, 6, r)), jnp.float32),
                        jnp.ones((2, 6, 1))], axis=-1)
  dsq = jnp.asarray(rng.normal(size=(2, 6, c_out)), jnp.float32)

  def factored(zb, A, b):
    return jnp.sum(dsq * squared_norm.squared_norms(zb, *squared_norm.norm_factors(A, b, c_out)))

  def direct(zb, A, b):
    ab = jnp.concatenate([A, b[None]]).reshape(r + 1, c_out, d)
    w = jnp.einsum("...r,rod->...od", zb, ab)
    return jnp.sum(dsq * jnp.sum(w * w, axis=-1))

  got = jax.jit(jax.value_and_grad(factored, argnums=(0, 1, 2)))(zb, A, b)
  want = jax.jit(jax.value_and_grad(direct, argnums=(0, 1, 2)))(zb, A, b)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_cholesky_solve():
  rng = np.random.default_rng(4)
  m = rng.normal(size=(3, 5, 5))
  g = (m @ m.transpose(0, 2, 1) + 5 * np.eye(5)).astype(np.float32)
  rhs = rng.normal(size=(3, 5)).astype(np.float32)
  l, x = jax.jit(squared_norm.cholesky_solve)(g, rhs)
  np.testing.assert_allclose(l, np.linalg.cholesky(g.astype(np.float64)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x, np.linalg.solve(g.astype(np.float64), rhs[..., None])[..., 0], rtol=1e-4,
                             atol=1e-5)
