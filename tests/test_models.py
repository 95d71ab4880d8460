"""Tests for codajax.models: DAU bounds, parameter counts, numerical safety,
configs and input checks."""

import functools
import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codajax import dau
from codajax import models

NORMS = ("squash", "l2")
IMPLS = ("fused_conv", "fused_dot", "materialized")


def random_like(tree, seed, scale=1.0):
  """Lecun-normal-like random arrays (built in numpy) for a tree of shapes."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s.shape)
                            / np.sqrt(max(1, np.prod(s.shape[:-1]))), jnp.float32),
      tree)


def variable_shapes(model, x_shape):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(x_shape, jnp.float32))


def num_params(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# (c) The DAU output is bounded by the patch norm.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _conv_outputs(conv, variables, x):
  y = conv.apply(variables, x)
  matrix = conv.apply(variables, x, matrix=True)
  p = dau.patches(x, conv.kernel_size, conv.stride, conv.padding)
  return y, matrix, p


class BoundTest(chex.TestCase):

  @parameterized.parameters(*NORMS)
  def test_output_bounded_by_patch_norm(self, norm):
    """|y_o| <= ||P|| at every unit: squash since |w|^2/(1+|w|^2) < 1, l2 by
    Cauchy-Schwarz; and y = matrix . P."""
    conv = models.CoDAConv(features=5, rank=3, kernel_size=3, stride=2,
                           padding=1, norm=norm)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 4)),
                    jnp.float32)
    shapes = jax.eval_shape(conv.init, jax.random.key(0), x)
    # Large scales push |w| >> 1, where the squash bound becomes tight.
    for scale in (0.1, 1.0, 30.0):
      variables = random_like(shapes, seed=int(scale * 10), scale=scale)
      y, matrix, p = _conv_outputs(conv, variables, x)
      chex.assert_shape(y, (2, 5, 4, 5))
      chex.assert_shape(matrix, (2, 5, 4, 5, 4 * 9))
      chex.assert_trees_all_close(y, jnp.einsum("nhwod,nhwd->nhwo", matrix, p),
                                  rtol=1e-5, atol=1e-6)
      p_norm = jnp.linalg.norm(p, axis=-1, keepdims=True)
      excess = jnp.abs(y) - p_norm * (1 + 1e-6) - 1e-7
      self.assertLessEqual(float(jnp.max(excess)), 0.0, f"scale {scale}")

  @parameterized.parameters(*NORMS)
  def test_bound_through_layer_matrix_of_a_net(self, norm):
    """Every layer of a net: x_0 = [x, 1 - x], x_{l+1} = layer_matrix(x_l) .
    P(x_l) (the matrix is materialised, the forward fused), |x_{l+1}| <=
    ||P(x_l)||, and the pooled last layer gives the logits."""
    model = models.tiny(num_classes=4, norm=norm)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 11, 9, 3)),
                    jnp.float32)
    variables = random_like(variable_shapes(model, x.shape), seed=1, scale=3.0)

    @jax.jit
    def run(variables, x):
      inputs, logits = model.apply(variables, x,
                                   method=models.CoDANet.layer_inputs)
      ys, ps = [], []
      for l, x_l in enumerate(inputs):
        matrix = model.apply(variables, x_l, l,
                             method=models.CoDANet.layer_matrix)
        p = dau.patches(x_l, model.kernel_sizes[l], model.strides[l],
                        model.paddings[l])
        ys.append(jnp.einsum("nhwod,nhwd->nhwo", matrix, p))
        ps.append(p)
      return inputs, logits, ys, ps

    inputs, logits, ys, ps = run(variables, x)
    np.testing.assert_array_equal(inputs[0], jnp.concatenate([x, 1 - x], -1))
    for l in range(model.num_layers):
      if l + 1 < model.num_layers:
        chex.assert_trees_all_close(ys[l], inputs[l + 1], rtol=1e-5, atol=1e-6,
                                    custom_message=f"layer {l}")
      p_norm = jnp.linalg.norm(ps[l], axis=-1, keepdims=True)
      self.assertTrue(bool(jnp.all(jnp.abs(ys[l]) <= p_norm * (1 + 1e-6))),
                      f"layer {l}")
    chex.assert_trees_all_close(
        ys[-1].sum(axis=(1, 2)) / model.temperature + model.logit_bias, logits,
        rtol=1e-5, atol=1e-6)

  @parameterized.parameters(*NORMS)
  def test_equality_when_weight_parallel_to_patch(self, norm):
    """With B = 0, w_o = b_o = alpha_o P: l2 gives y_o = sign(alpha_o) ||P||;
    squash gives sign(alpha_o) ||P|| |w|^2 / (1 + |w|^2)."""
    k, c_in, c_out = 3, 2, 4
    d = c_in * k * k
    conv = models.CoDAConv(features=c_out, rank=2, kernel_size=k, norm=norm)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(size=(1, k, k, c_in)), jnp.float32)  # 1 position.
    p = np.asarray(dau.patches(x, k, 1, 0))[0, 0, 0]
    p_norm = np.linalg.norm(p)
    alpha = np.array([1.0, -2.0, 0.3, 5.0], np.float32)
    params = {
        "B": jnp.zeros((k, k, c_in, 2)),
        "A": jnp.asarray(rng.normal(size=(2, c_out * d)), jnp.float32),
        "b": jnp.asarray((alpha[:, None] * p[None]).reshape(-1), jnp.float32),
    }
    y = np.asarray(jax.jit(conv.apply)({"params": params}, x))[0, 0, 0]
    if norm == "l2":
      expected = np.sign(alpha) * p_norm
    else:
      w_sq = (alpha * p_norm) ** 2
      expected = np.sign(alpha) * p_norm * w_sq / (1 + w_sq)
    np.testing.assert_allclose(y, expected, rtol=1e-5)


def _cancellation_ratio(impl, norm):
  """max_o |y_o| / ||P|| when every w_o = A_o z + b_o nearly cancels.

  One position, 1x1 kernel, 512 units; b_o = -A_o z + delta_o with |delta_o|
  about 1e-4 |A_o z|, so w_o is small next to the two terms that form it.
  """
  r, d, c = 2, 8, 512
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(1, 1, 1, d)).astype(np.float32)
  B = rng.normal(size=(1, 1, d, r)).astype(np.float32)
  A = rng.normal(size=(r, c * d)).astype(np.float32)
  z = x[0, 0, 0].astype(np.float64) @ B[0, 0]
  b = (-(z @ A) + 1e-4 * rng.normal(size=c * d)).astype(np.float32)
  conv = models.CoDAConv(features=c, rank=r, kernel_size=1, norm=norm, impl=impl)
  y = jax.jit(conv.apply)({"params": {"A": A, "B": B, "b": b}}, x)
  return float(jnp.max(jnp.abs(y))) / float(np.linalg.norm(x))


class CancellationTest(chex.TestCase):

  @parameterized.parameters(("materialized", "l2"), ("materialized", "squash"),
                            ("fused_dot", "squash"), ("fused_conv", "squash"))
  def test_bound_when_weights_cancel(self, impl, norm):
    self.assertLessEqual(_cancellation_ratio(impl, norm), 1.0 + 1e-5)

  # The plain Gram form zb^T (Ab^T Ab) zb cancels catastrophically in float32
  # when |w| is small next to |A z| and |b| (l2 output reached 1.85 ||P||);
  # dau.norm_factors splits b to keep |w|^2 as accurate as forming w.
  def test_fused_l2_bound_when_weights_cancel(self):
    for impl in ("fused_dot", "fused_conv"):
      self.assertLessEqual(_cancellation_ratio(impl, "l2"), 1.0 + 1e-5, impl)


class ImplTest(chex.TestCase):

  @parameterized.parameters(*NORMS)
  def test_impls_agree(self, norm):
    """All implementations (and remat) give the same logits and gradients."""
    shape = (2, 11, 9, 3)
    nets = [models.tiny(num_classes=4, norm=norm, impl=impl) for impl in IMPLS]
    nets.append(models.tiny(num_classes=4, norm=norm, impl="fused_dot",
                            remat=True))
    variables = random_like(variable_shapes(nets[0], shape), seed=5, scale=2.0)
    x = jnp.asarray(np.random.default_rng(5).uniform(size=shape), jnp.float32)

    @jax.jit
    def run(variables, x):
      # Gradients for all but fused_conv, whose backward compiles slowly on CPU.
      return [_logits_and_grads(net, variables, x) if net.impl != "fused_conv"
              else net.apply(variables, x) for net in nets]

    results = run(variables, x)
    reference = results[IMPLS.index("materialized")]  # (logits, grads).
    for net, result in zip(nets, results):
      expected = reference[0] if net.impl == "fused_conv" else reference
      chex.assert_trees_all_close(result, expected, rtol=1e-4, atol=1e-5,
                                  custom_message=f"{net.impl} remat={net.remat}")


# ----------------------------------------------------------------------------
# (f) Parameter counts.
# ----------------------------------------------------------------------------


def _formula_count(model, in_channels):
  """sum_l k^2 C_in R (B) + R C_out d (A) + C_out d (b), d = C_in k^2."""
  total, c = 0, 2 * in_channels
  for c_out, r, k in zip(model.out_channels, model.ranks, model.kernel_sizes):
    d = c * k * k
    total += k * k * c * r + r * c_out * d + c_out * d
    c = c_out
  return total


class ParamCountTest(chex.TestCase):

  @parameterized.named_parameters(
      ("cifar10_9l_s", models.cifar10_9l_s, (1, 32, 32, 3), 7_782_816),
      ("imagenet100_9l_l", models.imagenet100_9l_l, (1, 240, 240, 3),
       47_517_408),
      ("tiny", models.tiny, (1, 32, 32, 3), None),
  )
  def test_parameter_count(self, preset, x_shape, expected):
    model = preset()
    shapes = variable_shapes(model, x_shape)
    count = num_params(shapes)
    self.assertEqual(count, _formula_count(model, x_shape[-1]))
    if expected is not None:
      self.assertEqual(count, expected)
    # Parameter shapes do not depend on the image size.
    other = variable_shapes(model, (2, x_shape[1] + 7, x_shape[2] + 3, 3))
    chex.assert_trees_all_equal_shapes(shapes, other)


# ----------------------------------------------------------------------------
# (g) Zero inputs, zero weights and bfloat16.
# ----------------------------------------------------------------------------


def _logits_and_grads(model, variables, x):
  def f(variables, x):
    logits = model.apply(variables, x)
    return jnp.sum(logits * jnp.arange(1, logits.shape[-1] + 1)), logits
  (_, logits), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      variables, x)
  return logits, grads


def _assert_finite(test, tree, what):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    test.assertTrue(bool(jnp.all(jnp.isfinite(leaf))),
                    f"{what}: non-finite at {jax.tree_util.keystr(path)}")


class NumericsTest(chex.TestCase):

  # The default (fused) layer for every norm and dtype; the materialised one
  # (which explanations use) for two of the four.
  @parameterized.parameters(
      ("squash", "float32", "fused"), ("l2", "float32", "fused"),
      ("squash", "bfloat16", "fused"), ("l2", "bfloat16", "fused"),
      ("l2", "float32", "materialized"), ("squash", "bfloat16", "materialized"))
  def test_zero_image_and_zero_weights_are_finite(self, norm, dtype, impl):
    model = models.tiny(num_classes=4, norm=norm, dtype=jnp.dtype(dtype),
                        impl=impl)
    shape = (2, 11, 9, 3)
    variables = random_like(variable_shapes(model, shape), seed=3)
    zero_vars = jax.tree.map(jnp.zeros_like, variables)
    x = jnp.asarray(np.random.default_rng(3).uniform(size=shape), jnp.float32)
    run = jax.jit(functools.partial(_logits_and_grads, model))

    # x = 0 (x~ = [0, 1]).
    logits, grads = run(variables, jnp.zeros(shape))
    self.assertEqual(logits.dtype, jnp.float32)
    _assert_finite(self, (logits, grads), "zero image")
    # The input gradient is not trivially zero, so finiteness means something.
    self.assertGreater(float(jnp.max(jnp.abs(grads[1]))), 0.0)

    # All parameters zero: w = 0 everywhere, every unit outputs 0.
    for image in (x, jnp.zeros(shape)):
      logits, grads = run(zero_vars, image)
      _assert_finite(self, (logits, grads), "zero weights")
      np.testing.assert_array_equal(logits, np.full((2, 4), model.logit_bias,
                                                    np.float32))

  @parameterized.product(norm=NORMS, impl=("fused", "materialized"))
  def test_bfloat16_close_to_float32(self, norm, impl):
    shape = (2, 11, 9, 3)
    f32 = models.tiny(num_classes=4, norm=norm, impl=impl)
    bf16 = models.tiny(num_classes=4, norm=norm, dtype=jnp.bfloat16, impl=impl)
    variables = random_like(variable_shapes(f32, shape), seed=4, scale=2.0)
    x = jnp.asarray(np.random.default_rng(4).uniform(size=shape), jnp.float32)
    logits_32 = jax.jit(f32.apply)(variables, x)
    logits_16 = jax.jit(bf16.apply)(variables, x)
    self.assertEqual(logits_16.dtype, jnp.float32)
    # bf16 has an 8-bit mantissa: ~0.4% per rounding, a few roundings per layer.
    scale = float(jnp.max(jnp.abs(logits_32 - f32.logit_bias)))
    self.assertGreater(scale, 1e-2)
    chex.assert_trees_all_close(logits_16, logits_32, atol=3e-2 * scale)
    self.assertFalse(np.array_equal(logits_16, logits_32))  # bf16 really used.


# ----------------------------------------------------------------------------
# Configs, output shapes, input checks.
# ----------------------------------------------------------------------------


class ConfigAndShapeTest(chex.TestCase):

  def test_from_config_matches_constructor(self):
    cfg = ml_collections.ConfigDict({
        "out_channels": [8, 6, 5], "ranks": [4, 3, 2], "kernel_sizes": [3, 5, 1],
        "strides": [2, 1, 1], "paddings": [1, 2, 0], "norm": "l2",
        "temperature": 7.0, "logit_bias": -1.5, "dtype": "bfloat16",
        "impl": "materialized", "remat": 1})
    built = models.from_config(cfg)
    expected = models.CoDANet(
        out_channels=(8, 6, 5), ranks=(4, 3, 2), kernel_sizes=(3, 5, 1),
        strides=(2, 1, 1), paddings=(1, 2, 0), norm="l2", temperature=7.0,
        logit_bias=-1.5, dtype=jnp.bfloat16, impl="materialized", remat=True)
    for field in models.CONFIG_FIELDS:
      self.assertEqual(getattr(built, field), getattr(expected, field), field)
    self.assertEqual(built, expected)
    self.assertEqual(jnp.dtype(built.dtype), jnp.bfloat16)
    self.assertIs(built.remat, True)
    chex.assert_trees_all_equal_shapes(variable_shapes(built, (1, 12, 10, 3)),
                                       variable_shapes(expected, (1, 12, 10, 3)))

  def test_from_config_defaults_and_presets(self):
    preset = models.cifar10_9l_s()
    cfg = {f: getattr(preset, f) for f in models.CONFIG_FIELDS[:5]}
    cfg["temperature"] = 1000.0
    self.assertEqual(models.from_config(ml_collections.ConfigDict(cfg)), preset)

  def test_from_config_rejects_unknown_and_missing_fields(self):
    cfg = {f: getattr(models.tiny(), f) for f in models.CONFIG_FIELDS[:5]}
    with self.assertRaisesRegex(ValueError, "unknown fields.*depth"):
      models.from_config({**cfg, "depth": 3})
    del cfg["ranks"]
    with self.assertRaisesRegex(ValueError, "missing fields.*ranks"):
      models.from_config(cfg)

  @parameterized.named_parameters(
      ("tiny", models.tiny, (3, 13, 7, 3), 10),
      ("tiny_grey", functools.partial(models.tiny, num_classes=4),
       (1, 5, 17, 1), 4),
      ("cifar", models.cifar10_9l_s, (2, 32, 24, 3), 10),
      ("imagenet", models.imagenet100_9l_l, (1, 64, 96, 3), 100),
  )
  def test_output_shape_non_square(self, preset, x_shape, num_classes):
    model = preset()
    shapes = variable_shapes(model, x_shape)
    out = jax.eval_shape(model.apply, shapes,
                         jax.ShapeDtypeStruct(x_shape, jnp.float32))
    self.assertEqual(out.shape, (x_shape[0], num_classes))
    self.assertEqual(out.dtype, jnp.float32)
    self.assertEqual(model.num_classes, num_classes)

  @parameterized.parameters((11, 9, 3), (1, 1, 11, 9, 3))
  def test_wrong_rank_input_raises(self, *shape):
    with self.assertRaisesRegex(ValueError, r"\(N, H, W, C\)"):
      variable_shapes(models.tiny(), shape)

  @parameterized.parameters(
      ((1, 4, 9, 3), "4x9 is too small: layer 0"),
      ((1, 6, 6, 3), "6x6 is too small: layer 1 .* 2x2 input"),
  )
  def test_too_small_image_raises(self, shape, message):
    model = models.CoDANet(out_channels=(4, 3), ranks=(2, 2), kernel_sizes=(5, 3),
                           strides=(1, 1), paddings=(0, 0))
    with self.assertRaisesRegex(ValueError, message):
      variable_shapes(model, shape)

  @parameterized.parameters("ranks", "kernel_sizes", "strides", "paddings")
  def test_mismatched_layer_lengths_raise(self, field):
    kw = dict(out_channels=(4, 3), ranks=(2, 2), kernel_sizes=(3, 1),
              strides=(1, 1), paddings=(1, 0))
    kw[field] = kw[field] + (1,)
    with self.assertRaisesRegex(ValueError, f"2 layers .*{field}"):
      variable_shapes(models.CoDANet(**kw), (1, 8, 8, 3))

  def test_bad_norm_raises(self):
    with self.assertRaisesRegex(ValueError, "norm must be one of"):
      variable_shapes(models.tiny(norm="l1"), (1, 8, 8, 3))


if __name__ == "__main__":
  absltest.main()
