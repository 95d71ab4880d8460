"""Tests for codajax.models: the forward of a net against its layers' matrices,
agreement of the impls, parameter counts, numerical safety, configs and input
checks."""

import functools
import inspect
import math
import re

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codajax import architectures
from codajax import dau
from codajax import models

NORMS = architectures.NORMS
# (impl, contraction) of every implementation.
IMPLS = (("fused", "conv"), ("fused", "dot"), ("materialized", "auto"))


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
# The net's forward against its layers' matrices.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_bound_through_the_layer_matrices_of_a_net(norm):
  """Every layer of a net: x_0 = [x, 1 - x], x_{l+1} = dau.matrix(x_l) .
  P(x_l) (the matrix is materialised, the forward fused), |x_{l+1}| <=
  ||P(x_l)||, and the pooled last layer gives the logits."""
  model = models.tiny(num_classes=4, norm=norm)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 11, 9, 3)), jnp.float32)
  variables = random_like(variable_shapes(model, x.shape), seed=1, scale=3.0)
  specs = models.layer_specs(model)

  @jax.jit
  def run(variables, x):
    inputs, logits = model.apply(variables, x, method=models.CoDANet.layer_inputs)
    ys, ps = [], []
    for l, x_l in enumerate(inputs):
      matrix = dau.matrix(variables["params"][f"layer_{l}"], specs[l], x_l)
      p = dau.patches(x_l, specs[l])
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
    assert bool(jnp.all(jnp.abs(ys[l]) <= p_norm * (1 + 1e-6))), f"layer {l}"
  chex.assert_trees_all_close(
      ys[-1].sum(axis=(1, 2)) / model.temperature + model.logit_bias, logits,
      rtol=1e-5, atol=1e-6)


def test_layer_specs_describe_the_layers():
  model = models.cifar10_9l_s(norm="l2")
  specs = models.layer_specs(model)
  assert len(specs) == model.num_layers
  assert specs[2] == dau.Layer(features=32, rank=64, kernel=3, stride=2, padding=1, norm="l2")
  assert specs[-1] == dau.Layer(10, 64, 1, 1, 0, "l2")
  conv = models.CoDAConv(features=32, rank=64, kernel_size=3, stride=2, padding=1, norm="l2")
  assert conv.spec == specs[2]


def test_modules_compute_the_forward_only():
  """No method takes a flag that changes what it returns."""
  assert list(inspect.signature(models.CoDAConv.__call__).parameters) == ["self", "x"]
  for name in ("__call__", "layer_inputs", "encode", "pool"):
    params = inspect.signature(getattr(models.CoDANet, name)).parameters
    assert len(params) == 2, name
  for gone in ("layer_matrix", "layer_transpose"):
    assert not hasattr(models.CoDANet, gone)


# ----------------------------------------------------------------------------
# Implementations.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_impls_agree(norm):
  """All implementations (and remat) give the same logits and gradients."""
  shape = (2, 11, 9, 3)
  nets = [models.tiny(num_classes=4, norm=norm, impl=impl, contraction=contraction)
          for impl, contraction in IMPLS]
  nets.append(models.tiny(num_classes=4, norm=norm, impl="fused", contraction="dot",
                          remat=True))
  variables = random_like(variable_shapes(nets[0], shape), seed=5, scale=2.0)
  x = jnp.asarray(np.random.default_rng(5).uniform(size=shape), jnp.float32)
  slow = lambda net: net.impl == "fused" and net.contraction == "conv"

  @jax.jit
  def run(variables, x):
    # Gradients for all but fused "conv", whose backward compiles slowly on CPU.
    return [net.apply(variables, x) if slow(net) else _logits_and_grads(net, variables, x)
            for net in nets]

  results = run(variables, x)
  reference = results[IMPLS.index(("materialized", "auto"))]  # (logits, grads).
  for net, result in zip(nets, results):
    expected = reference[0] if slow(net) else reference
    chex.assert_trees_all_close(
        result, expected, rtol=1e-4, atol=1e-5,
        custom_message=f"{net.impl} {net.contraction} remat={net.remat}")


def test_same_parameters_for_every_impl_and_remat():
  shape = (1, 12, 12, 3)
  x = jnp.zeros(shape)
  trees = [jax.tree.map(jnp.shape, jax.eval_shape(
      models.tiny(impl=impl, contraction=contraction, remat=remat).init, jax.random.key(0), x))
           for impl, contraction in IMPLS for remat in (False, True)]
  for tree in trees[1:]:
    assert tree == trees[0]


def test_default_is_fused_with_a_per_backend_contraction():
  assert (models.tiny().impl, models.tiny().contraction) == ("fused", "auto")


# ----------------------------------------------------------------------------
# Parameter counts.
# ----------------------------------------------------------------------------


def _formula_count(model, in_channels):
  """sum_l k^2 C_in R (B) + R C_out d (A) + C_out d (b), d = C_in k^2."""
  total, c = 0, 2 * in_channels
  for c_out, r, k in zip(model.out_channels, model.ranks, model.kernel_sizes):
    d = c * k * k
    total += k * k * c * r + r * c_out * d + c_out * d
    c = c_out
  return total


@pytest.mark.parametrize("preset,x_shape,expected", [
    pytest.param(models.cifar10_9l_s, (1, 32, 32, 3), 7_782_816, id="cifar10_9l_s"),
    pytest.param(models.imagenet100_9l_l, (1, 240, 240, 3), 47_517_408, id="imagenet100_9l_l"),
    pytest.param(models.tiny, (1, 32, 32, 3), None, id="tiny"),
])
def test_parameter_count(preset, x_shape, expected):
  model = preset()
  shapes = variable_shapes(model, x_shape)
  count = num_params(shapes)
  assert count == _formula_count(model, x_shape[-1])
  if expected is not None:
    assert count == expected
  # Parameter shapes do not depend on the image size.
  other = variable_shapes(model, (2, x_shape[1] + 7, x_shape[2] + 3, 3))
  chex.assert_trees_all_equal_shapes(shapes, other)


# ----------------------------------------------------------------------------
# Zero inputs, zero weights and bfloat16.
# ----------------------------------------------------------------------------


def _logits_and_grads(model, variables, x):
  def f(variables, x):
    logits = model.apply(variables, x)
    return jnp.sum(logits * jnp.arange(1, logits.shape[-1] + 1)), logits
  (_, logits), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      variables, x)
  return logits, grads


def _assert_finite(tree, what):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    assert bool(jnp.all(jnp.isfinite(leaf))), (
        f"{what}: non-finite at {jax.tree_util.keystr(path)}")


# The default (fused) layer for every norm and dtype; the materialised one
# (the reference) for two of the four.
@pytest.mark.parametrize("norm,dtype,impl", [
    ("squash", "float32", "fused"), ("l2", "float32", "fused"),
    ("squash", "bfloat16", "fused"), ("l2", "bfloat16", "fused"),
    ("l2", "float32", "materialized"), ("squash", "bfloat16", "materialized")])
def test_zero_image_and_zero_weights_are_finite(norm, dtype, impl):
  model = models.tiny(num_classes=4, norm=norm, dtype=jnp.dtype(dtype), impl=impl)
  shape = (2, 11, 9, 3)
  variables = random_like(variable_shapes(model, shape), seed=3)
  zero_vars = jax.tree.map(jnp.zeros_like, variables)
  x = jnp.asarray(np.random.default_rng(3).uniform(size=shape), jnp.float32)
  run = jax.jit(functools.partial(_logits_and_grads, model))

  # x = 0 (x~ = [0, 1]).
  logits, grads = run(variables, jnp.zeros(shape))
  assert logits.dtype == jnp.float32
  _assert_finite((logits, grads), "zero image")
  # The input gradient is not trivially zero, so finiteness means something.
  assert float(jnp.max(jnp.abs(grads[1]))) > 0.0

  # All parameters zero: w = 0 everywhere, every unit outputs 0.
  for image in (x, jnp.zeros(shape)):
    logits, grads = run(zero_vars, image)
    _assert_finite((logits, grads), "zero weights")
    np.testing.assert_array_equal(logits, np.full((2, 4), model.logit_bias, np.float32))


@pytest.mark.parametrize("impl", ["fused", "materialized"])
@pytest.mark.parametrize("norm", NORMS)
def test_bfloat16_close_to_float32(norm, impl):
  shape = (2, 11, 9, 3)
  f32 = models.tiny(num_classes=4, norm=norm, impl=impl)
  bf16 = models.tiny(num_classes=4, norm=norm, dtype=jnp.bfloat16, impl=impl)
  variables = random_like(variable_shapes(f32, shape), seed=4, scale=2.0)
  x = jnp.asarray(np.random.default_rng(4).uniform(size=shape), jnp.float32)
  logits_32 = jax.jit(f32.apply)(variables, x)
  logits_16 = jax.jit(bf16.apply)(variables, x)
  assert logits_16.dtype == jnp.float32
  # bf16 has an 8-bit mantissa: ~0.4% per rounding, a few roundings per layer.
  scale = float(jnp.max(jnp.abs(logits_32 - f32.logit_bias)))
  assert scale > 1e-2
  chex.assert_trees_all_close(logits_16, logits_32, atol=3e-2 * scale)
  assert not np.array_equal(logits_16, logits_32)  # bf16 really used.


# ----------------------------------------------------------------------------
# Configs, output shapes, input checks.
# ----------------------------------------------------------------------------


def test_from_config_matches_constructor():
  cfg = ml_collections.ConfigDict({
      "out_channels": [8, 6, 5], "ranks": [4, 3, 2], "kernel_sizes": [3, 5, 1],
      "strides": [2, 1, 1], "paddings": [1, 2, 0], "norm": "l2",
      "temperature": 7.0, "logit_bias": -1.5, "dtype": "bfloat16",
      "impl": "materialized", "contraction": "conv", "remat": 1})
  built = models.from_config(cfg)
  expected = models.CoDANet(
      out_channels=(8, 6, 5), ranks=(4, 3, 2), kernel_sizes=(3, 5, 1),
      strides=(2, 1, 1), paddings=(1, 2, 0), norm="l2", temperature=7.0,
      logit_bias=-1.5, dtype=jnp.bfloat16, impl="materialized", contraction="conv",
      remat=True)
  for field in models.CONFIG_FIELDS:
    assert getattr(built, field) == getattr(expected, field), field
  assert built == expected
  assert jnp.dtype(built.dtype) == jnp.bfloat16
  assert built.remat is True
  chex.assert_trees_all_equal_shapes(variable_shapes(built, (1, 12, 10, 3)),
                                     variable_shapes(expected, (1, 12, 10, 3)))


def test_from_config_defaults_and_presets():
  preset = models.cifar10_9l_s()
  cfg = {f: getattr(preset, f) for f in architectures.LAYER_FIELDS}
  cfg["temperature"] = 1000.0
  assert models.from_config(ml_collections.ConfigDict(cfg)) == preset


def test_from_config_impl_contraction_and_remat():
  cfg = dict(out_channels=[4, 3], ranks=[2, 2], kernel_sizes=[3, 1], strides=[1, 1],
             paddings=[1, 0], impl="materialized", remat=1)
  model = models.from_config(cfg)
  assert (model.impl, model.contraction, model.remat) == ("materialized", "auto", True)
  # A config written before `contraction` existed (impl="fused" only).
  assert models.from_config({**cfg, "impl": "fused"}).contraction == "auto"
  assert models.from_config({**cfg, "contraction": "dot"}).contraction == "dot"
  for field, bad in (("impl", "fast"), ("impl", "fused_dot"), ("contraction", "fft")):
    with pytest.raises(ValueError, match=field):
      models.from_config({**cfg, field: bad}).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))


def test_from_config_rejects_unknown_and_missing_fields():
  cfg = {f: getattr(models.tiny(), f) for f in architectures.LAYER_FIELDS}
  with pytest.raises(ValueError, match="unknown fields.*depth"):
    models.from_config({**cfg, "depth": 3})
  del cfg["ranks"]
  with pytest.raises(ValueError, match="missing fields.*ranks"):
    models.from_config(cfg)


@pytest.mark.parametrize("preset,x_shape,num_classes", [
    pytest.param(models.tiny, (3, 13, 7, 3), 10, id="tiny"),
    pytest.param(functools.partial(models.tiny, num_classes=4), (1, 5, 17, 1), 4,
                 id="tiny_grey"),
    pytest.param(models.cifar10_9l_s, (2, 32, 24, 3), 10, id="cifar"),
    pytest.param(models.imagenet100_9l_l, (1, 64, 96, 3), 100, id="imagenet"),
])
def test_output_shape_non_square(preset, x_shape, num_classes):
  model = preset()
  shapes = variable_shapes(model, x_shape)
  out = jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct(x_shape, jnp.float32))
  assert out.shape == (x_shape[0], num_classes)
  assert out.dtype == jnp.float32
  assert model.num_classes == num_classes


@pytest.mark.parametrize("shape", [(11, 9, 3), (1, 1, 11, 9, 3)])
def test_wrong_rank_input_raises(shape):
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    variable_shapes(models.tiny(), shape)


@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_empty_batch_raises_one_clear_error(impl):
  """A batch of 0 images: one ValueError naming it (not a ZeroDivisionError
  from deep inside a reshape)."""
  model = models.tiny(impl=impl)
  x = jnp.zeros((0, 8, 8, 3))
  variables = variable_shapes(model, (1, 8, 8, 3))
  with pytest.raises(ValueError, match="batch of 0 images"):
    jax.eval_shape(model.apply, variables, x)
  with pytest.raises(ValueError, match="batch of 0 images"):
    models.check_input_shape(model, x.shape)


@pytest.mark.parametrize("shape,message", [
    ((1, 4, 9, 3), "4x9 is too small: layer 0"),
    ((1, 6, 6, 3), "6x6 is too small: layer 1 .* 2x2 input"),
])
def test_too_small_image_raises(shape, message):
  model = models.CoDANet(out_channels=(4, 3), ranks=(2, 2), kernel_sizes=(5, 3),
                         strides=(1, 1), paddings=(0, 0))
  with pytest.raises(ValueError, match=message):
    variable_shapes(model, shape)


@pytest.mark.parametrize("field", ["ranks", "kernel_sizes", "strides", "paddings"])
def test_mismatched_layer_lengths_raise(field):
  kw = dict(out_channels=(4, 3), ranks=(2, 2), kernel_sizes=(3, 1),
            strides=(1, 1), paddings=(1, 0))
  kw[field] = kw[field] + (1,)
  with pytest.raises(ValueError, match=f"{field}=.*: has 3 entries but out_channels has 2"):
    variable_shapes(models.CoDANet(**kw), (1, 8, 8, 3))


@pytest.mark.parametrize("field, bad", [
    ("norm", "l1"), ("impl", "fast"), ("contraction", "fft"), ("dtype", "float16"),
    ("temperature", 0.0), ("ranks", (4, 0, 4)), ("paddings", (3, 1, 0)),
    ("out_channels", (8, 8, -1))])
def test_config_and_model_reject_a_field_by_one_rule(field, bad):
  """architectures.model_problems is the one check: config_lib.validate and
  CoDANet report the same rule (a config's last out_channels may be -1, to be
  set from the data; a model's may not)."""
  from codajax import config_lib  # pylint: disable=g-import-not-at-top
  fields = {**architectures.tiny(4), **architectures.MODEL_DEFAULTS, field: bad}
  rule = dict(architectures.model_problems(fields))[field]
  with pytest.raises(ValueError, match=re.escape(f"CoDANet: {field}={bad!r}: {rule}")):
    variable_shapes(models.from_config(fields), (1, 8, 8, 3))
  config = config_lib.base_config()
  config.model[field] = bad
  problems = str(pytest.raises(config_lib.ConfigError, config_lib.validate, config).value)
  config_rules = dict(architectures.model_problems(config.model, last_from_data=True))
  if field == "out_channels":
    assert field not in config_rules and f"config.model.{field}" not in problems
  else:
    assert f"config.model.{field}={bad!r}: {rule}" in problems


def test_bad_norm_raises():
  with pytest.raises(ValueError, match=r"norm='l1': use one of \('squash', 'l2'\)"):
    variable_shapes(models.tiny(norm="l1"), (1, 8, 8, 3))


# ------------------------------------------------- issue 9: images not in [0, 1]


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32, jnp.bool_])
def test_integer_images_are_rejected(dtype):
  """0..255 images used to go into the model unchecked (x and 255 - x)."""
  model = models.tiny()
  variables = variable_shapes(model, (1, 8, 8, 3))
  x = jnp.ones((2, 8, 8, 3), dtype)
  message = (f"CoDANet expects float images with values in [0, 1]; got dtype "
             f"{jnp.dtype(dtype)}. Scale 0..255 images first: x.astype(jnp.float32) / 255.")
  with pytest.raises(ValueError) as e:
    model.apply(variables, x)
  assert str(e.value) == message
  with pytest.raises(ValueError, match="expects float images"):  # Also under jit.
    jax.jit(model.apply)(variables, x)


@pytest.mark.parametrize("value", [255.0, 1.5, -0.5])
def test_float_images_outside_0_1_are_rejected_when_known(value):
  model = models.tiny()
  x = np.full((2, 8, 8, 3), 0.5, np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  x[1, 3, 4, 2] = value
  for images in (x, jnp.asarray(x), jnp.asarray(x, jnp.bfloat16)):
    with pytest.raises(ValueError) as e:
      model.apply(variables, images)
    assert str(e.value) == (
        f"CoDANet expects images with values in [0, 1]; got {min(value, 0.5)}.."
        f"{max(value, 0.5)}. Scale 0..255 images first: x / 255.")
  jax.jit(model.apply)(variables, x)  # Traced values cannot be checked.
  x[1, 3, 4, 2] = 1.0
  model.apply(variables, x)  # 0 and 1 are in range, and NaN is the caller's.
  x[0, 0, 0, 0], x[1, 3, 4, 2] = 0.0, np.nan
  model.apply(variables, x)


@pytest.mark.parametrize("channels", [1, 4])
def test_wrong_channel_count_is_one_clear_error(channels):
  # Was a Flax ScopeParamShapeError about parameter "B" of layer_0.
  model = models.tiny(10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  x = jnp.zeros((1, 16, 16, channels))
  for apply in (model.apply, jax.jit(model.apply)):
    with pytest.raises(ValueError, match=f"take images with 3 channel.*got {channels}"):
      apply(variables, x)


# ------------------------------------------------- the forward on an encoded input


@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_encoded_logits_of_the_encoded_image_are_the_logits(impl):
  model = models.tiny(impl=impl)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
  variables = random_like(variable_shapes(model, x.shape), seed=1)
  h = model.apply(variables, x, method=models.CoDANet.encode)
  encoded = jax.jit(functools.partial(model.apply, method=models.CoDANet.encoded_logits))
  logits = jax.jit(model.apply)(variables, x)
  chex.assert_trees_all_close(encoded(variables, h), logits, rtol=1e-6)
  # A removed pixel (0 in all 2C channels) is outside what images encode to.
  removed = encoded(variables, h.at[0, 3, 4].set(0.0))
  assert jnp.abs(removed[0] - logits[0]).max() > 0


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (8, 8, 6), (2, 8, 8, 5)])
def test_encoded_logits_rejects_inputs_that_are_not_encoded(shape):
  model = models.tiny()
  variables = random_like(variable_shapes(model, (1, 8, 8, 3)), seed=0)
  with pytest.raises(ValueError, match=r"expects an encoded input \[x, 1 - x\] of shape "
                     r"\(N, H, W, 6\).*method=CoDANet.encode"):
    model.apply(variables, jnp.zeros(shape), method=models.CoDANet.encoded_logits)
