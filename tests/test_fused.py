"""The fused CoDA layer against the materialised one (issue 4).

Same parameters, same function: outputs and gradients agree on the presets and
on random architectures; bf16 is finite and close to float32; explanations of
a fused model are complete.
"""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from codajax import explain
from codajax import models


def _loss(model, params, x):
  logits = model.apply({"params": params}, x)
  return jnp.sum(jnp.sin(logits))  # Mixes every logit with distinct weights.


def _grads(model, params, x):
  return jax.jit(jax.grad(functools.partial(_loss, model), argnums=(0, 1)))(params, x)


def _assert_rel_close(a, b, rtol):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    scale = max(np.abs(v).max(), 1e-30)
    np.testing.assert_array_less(np.abs(u - v).max() / scale, rtol)


class FusedEqualsMaterialisedTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("cifar10_9l_s", models.cifar10_9l_s, (1, 32, 32, 3)),
      ("imagenet100_9l_l_small_image", models.imagenet100_9l_l, (1, 27, 30, 3)))
  def test_presets(self, preset, shape):
    x = jax.random.uniform(jax.random.key(0), shape)
    fused, mat = preset(10.0, impl="fused"), preset(10.0, impl="materialized")
    params = jax.jit(fused.init)(jax.random.key(1), x)["params"]
    # Larger-than-init weights so the norms are far from the zero guard.
    params = jax.tree.map(lambda p: 3.0 * p + 0.01, params)
    _assert_rel_close(jax.jit(fused.apply)({"params": params}, x),
                      jax.jit(mat.apply)({"params": params}, x), 1e-5)
    if preset is models.cifar10_9l_s:
      _assert_rel_close(_grads(fused, params, x), _grads(mat, params, x), 1e-4)

  @parameterized.parameters(
      dict(k=(3, 5, 1), s=(2, 1, 1), p=(1, 2, 0), r=(3, 5, 2), norm="squash", hw=(11, 9)),
      dict(k=(5, 3, 1), s=(3, 2, 1), p=(0, 1, 0), r=(6, 2, 4), norm="l2", hw=(13, 16)),
      dict(k=(1, 3, 3), s=(1, 3, 1), p=(0, 0, 1), r=(2, 4, 3), norm="l2", hw=(10, 12)))
  def test_random_architectures(self, k, s, p, r, norm, hw):
    x = jax.random.uniform(jax.random.key(2), (2, *hw, 3))
    kw = dict(out_channels=(5, 7, 4), ranks=r, kernel_sizes=k, strides=s, paddings=p,
              norm=norm, temperature=3.0)
    fused = models.CoDANet(**kw, impl="fused")
    mat = models.CoDANet(**kw, impl="materialized")
    params = fused.init(jax.random.key(3), x)["params"]
    params = jax.tree.map(lambda q: q + 0.05, params)
    _assert_rel_close(fused.apply({"params": params}, x),
                      mat.apply({"params": params}, x), 1e-5)
    _assert_rel_close(_grads(fused, params, x), _grads(mat, params, x), 1e-4)


class MixedPrecisionTest(parameterized.TestCase):

  @parameterized.parameters("fused", "materialized")
  def test_bf16_finite_and_close_to_f32(self, impl):
    x = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3))
    f32 = models.cifar10_9l_s(100.0, impl=impl)
    bf16 = models.cifar10_9l_s(100.0, impl=impl, dtype=jnp.bfloat16)
    params = jax.jit(f32.init)(jax.random.key(5), x)["params"]
    a = jax.jit(f32.apply)({"params": params}, x)
    b = jax.jit(bf16.apply)({"params": params}, x)
    chex.assert_tree_all_finite(b)
    self.assertEqual(b.dtype, jnp.float32)  # Logits stay float32.
    spread = float(jnp.abs(a - f32.logit_bias).max())
    # bf16 keeps 8 mantissa bits through 9 layers: about 7% of the logit spread
    # at init was measured; a wrong dtype path is off by the whole spread.
    self.assertLess(float(jnp.abs(a - b).max()), 0.15 * spread)
    chex.assert_tree_all_finite(_grads(bf16, params, x))


class FusedExplanationTest(parameterized.TestCase):

  @parameterized.parameters("squash", "l2")
  def test_complete_and_equal_to_materialised(self, norm):
    x = jax.random.uniform(jax.random.key(6), (2, 12, 10, 3))
    kw = dict(out_channels=(6, 8, 5), ranks=(3, 4, 2), kernel_sizes=(3, 3, 1),
              strides=(1, 2, 1), paddings=(1, 1, 0), norm=norm, temperature=2.0)
    fused = models.CoDANet(**kw, impl="fused")
    mat = models.CoDANet(**kw, impl="materialized")
    variables = fused.init(jax.random.key(7), x)
    for layer in range(3):
      e = explain.explain(fused, variables, x, None, layer)
      np.testing.assert_allclose(e.contributions.sum((2, 3, 4)),
                                 e.logits - fused.logit_bias, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(
          e.linear_map, explain.linear_map(mat, variables, x, None, layer),
          rtol=1e-4, atol=1e-6)
