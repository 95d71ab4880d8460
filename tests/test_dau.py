"""Tests for codajax.dau, the reference DAU layer: the output bound, the
matrix, the transpose and the layer description."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import architectures
from codajax import dau
from codajax import dau_fused

NORMS = architectures.NORMS
# The reference forward and the fused one: both must satisfy the DAU's bounds.
FORWARDS = {"reference": dau.layer, "fused": dau_fused.layer}


def random_params(spec, c_in, seed, scale=1.0):
  """Lecun-normal-like {B, A, b} (built in numpy), b not zero."""
  k, r, d = spec.kernel, spec.rank, c_in * spec.kernel ** 2
  shapes = {"B": (k, k, c_in, r), "A": (r, spec.features * d), "b": (spec.features * d,)}
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(scale * rng.standard_normal(s) / np.sqrt(max(1, np.prod(s[:-1]))),
                            jnp.float32)
          for name, s in shapes.items()}


# ----------------------------------------------------------------------------
# The output bound |y_o| <= ||P||.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outputs(forward, spec, params, x):
  return FORWARDS[forward](params, spec, x), dau.matrix(params, spec, x), dau.patches(x, spec)


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("norm", NORMS)
def test_output_bounded_by_patch_norm(forward, norm):
  """|y_o| <= ||P|| at every unit: squash since |w|^2/(1+|w|^2) < 1, l2 by
  Cauchy-Schwarz; and y = matrix . P."""
  spec = dau.Layer(features=5, rank=3, kernel=3, stride=2, padding=1, norm=norm)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 4)), jnp.float32)
  # Large scales push |w| >> 1, where the squash bound becomes tight.
  for scale in (0.1, 1.0, 30.0):
    params = random_params(spec, 4, seed=int(scale * 10), scale=scale)
    y, matrix, p = _outputs(forward, spec, params, x)
    chex.assert_shape(y, (2, 5, 4, 5))
    chex.assert_shape(matrix, (2, 5, 4, 5, 4 * 9))
    chex.assert_trees_all_close(y, jnp.einsum("nhwod,nhwd->nhwo", matrix, p),
                                rtol=1e-5, atol=1e-6)
    p_norm = jnp.linalg.norm(p, axis=-1, keepdims=True)
    excess = jnp.abs(y) - p_norm * (1 + 1e-6) - 1e-7
    assert float(jnp.max(excess)) <= 0.0, f"scale {scale}"


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("norm", NORMS)
def test_equality_when_weight_parallel_to_patch(forward, norm):
  """With B = 0, w_o = b_o = alpha_o P: l2 gives y_o = sign(alpha_o) ||P||;
  squash gives sign(alpha_o) ||P|| |w|^2 / (1 + |w|^2)."""
  k, c_in, c_out = 3, 2, 4
  d = c_in * k * k
  spec = dau.Layer(features=c_out, rank=2, kernel=k, norm=norm)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(size=(1, k, k, c_in)), jnp.float32)  # 1 position.
  p = np.asarray(dau.patches(x, spec))[0, 0, 0]
  p_norm = np.linalg.norm(p)
  alpha = np.array([1.0, -2.0, 0.3, 5.0], np.float32)
  params = {
      "B": jnp.zeros((k, k, c_in, 2)),
      "A": jnp.asarray(rng.normal(size=(2, c_out * d)), jnp.float32),
      "b": jnp.asarray((alpha[:, None] * p[None]).reshape(-1), jnp.float32),
  }
  y = np.asarray(jax.jit(FORWARDS[forward], static_argnums=1)(params, spec, x))[0, 0, 0]
  if norm == "l2":
    expected = np.sign(alpha) * p_norm
  else:
    w_sq = (alpha * p_norm) ** 2
    expected = np.sign(alpha) * p_norm * w_sq / (1 + w_sq)
  np.testing.assert_allclose(y, expected, rtol=1e-5)


# ----------------------------------------------------------------------------
# Patches, fold and the transpose.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,stride,padding", [(1, 2, 0), (3, 1, 1), (3, 2, 0), (5, 3, 2)])
def test_fold_is_the_transpose_of_patches(kernel, stride, padding):
  """<fold(q), x> = <q, patches(x)> for any x and q."""
  spec = dau.Layer(features=1, rank=1, kernel=kernel, stride=stride, padding=padding)
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, 11, 9, 3)), jnp.float32)
  p = dau.patches(x, spec)
  chex.assert_shape(p, (2, dau.output_size(11, kernel, stride, padding),
                        dau.output_size(9, kernel, stride, padding), 3 * kernel ** 2))
  q = jnp.asarray(rng.normal(size=p.shape), jnp.float32)
  folded = dau.fold(q, (11, 9), spec)
  chex.assert_shape(folded, x.shape)
  np.testing.assert_allclose(jnp.vdot(folded, x), jnp.vdot(q, p), rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_transpose_is_the_adjoint_of_the_frozen_layer(norm):
  """<transpose(g)_k, x> = <g_k, y> per row k: y = M P(x) is linear in x for
  the matrix M frozen at x, and the transpose pulls rows back through it."""
  spec = dau.Layer(features=5, rank=4, kernel=3, stride=2, padding=1, norm=norm)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 9, 8, 4)), jnp.float32)
  params = random_params(spec, 4, seed=1)
  g = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 4, 5, 2)), jnp.float32)
  pulled, y = jax.jit(lambda p, x, g: (dau.transpose(p, spec, x, g), dau.layer(p, spec, x)))(
      params, x, g)
  chex.assert_shape(pulled, (3, 9, 8, 4, 2))
  np.testing.assert_allclose(jnp.einsum("nhwck,nhwc->nk", pulled, x),
                             jnp.einsum("nhwok,nhwo->nk", g, y), rtol=1e-5, atol=1e-6)


def test_inverse_norm_is_finite_and_zero_at_zero():
  for norm in NORMS:
    w = jnp.zeros((2, 3, 7))
    np.testing.assert_array_equal(dau.inverse_norm(w, norm), np.zeros((2, 3, 1)))
    grad = jax.grad(lambda w: jnp.sum(dau.inverse_norm(w, norm)))(w)
    assert bool(jnp.all(jnp.isfinite(grad)))
  with pytest.raises(ValueError, match="norm must be one of"):
    dau.inverse_norm(jnp.ones((2, 3)), "l1")


def test_layer_description_is_a_static_argument():
  """Equal descriptions hash equally, so jit reuses its trace."""
  spec = dau.Layer(features=2, rank=1, kernel=1)
  same = dau.Layer(2, 1, 1, stride=1, padding=0, norm="squash")
  assert spec == same and hash(spec) == hash(same)
  with pytest.raises(AttributeError):
    spec.rank = 3  # pytype: disable=not-writable
  chex.clear_trace_counter()

  @functools.partial(jax.jit, static_argnums=1)
  @chex.assert_max_traces(n=1)
  def f(params, spec, x):
    return dau.layer(params, spec, x)

  params = random_params(spec, 3, seed=0)
  x = jnp.ones((1, 4, 4, 3))
  np.testing.assert_array_equal(f(params, spec, x), f(params, same, x))
