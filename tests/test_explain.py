"""Tests for codajax.explain: completeness, agreement with autodiff, jit, shapes.

The main reference in this file is an independent forward of a CoDA-Net
written from the parameters alone (its own patch extraction, no codajax.dau),
with the normalised dynamic weights w / n(w) computed from the actual input
and then frozen with stop_gradient. Its Jacobian is, by definition, the linear
map that explain.py builds by explicit composition. A second one composes
every layer's full matrix with the reference layer's transpose (`dau.transpose`).
"""

import functools
import pathlib
import re

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import dau
from codajax import explain
from codajax import models

NORMS = ("squash", "l2")


# ----------------------------------------------------------------------------
# Independent reference.
# ----------------------------------------------------------------------------


def ref_patches(x, k, s, p):
  """(N, H, W, C) -> (N, H', W', C*k*k), index c*k*k + ky*k + kx; by slicing."""
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
  cols = [xp[:, ky:ky + (ho - 1) * s + 1:s, kx:kx + (wo - 1) * s + 1:s, :]
          for ky in range(k) for kx in range(k)]
  return jnp.stack(cols, axis=-1).reshape(n, ho, wo, c * k * k)


def ref_layer(params, x, k, s, p, c_out, norm):
  """One CoDA layer from its parameters, gradients stopped through w / n(w)."""
  A, B, b = params["A"], params["B"], params["b"]
  c_in, r = B.shape[2], B.shape[3]
  patch = ref_patches(x, k, s, p)                             # (N, H', W', d)
  # B is HWIO (ky, kx, c, r); the patch index is (c, ky, kx).
  b_mat = jnp.transpose(B, (2, 0, 1, 3)).reshape(c_in * k * k, r)
  z = patch @ b_mat                                           # (N, H', W', R)
  w = (z @ A + b).reshape(*z.shape[:-1], c_out, c_in * k * k)  # o*d + j
  size = jnp.sqrt(jnp.sum(w * w, axis=-1, keepdims=True))
  n_w = (1.0 + size**2) / size if norm == "squash" else size
  matrix = jax.lax.stop_gradient(w / n_w)  # Computed from x, then frozen.
  return jnp.einsum("nhwod,nhwd->nhwo", matrix, patch)


def ref_logits(model, params, h, layer):
  """Logits of `model` from the input h of layer `layer`, by the reference."""
  for i in range(layer, model.num_layers):
    h = ref_layer(params[f"layer_{i}"], h, model.kernel_sizes[i],
                  model.strides[i], model.paddings[i], model.out_channels[i],
                  model.norm)
  return jnp.sum(h, axis=(1, 2)) / model.temperature + model.logit_bias


def ref_linear_map(model, params, h, classes, layer):
  """d logit_{classes[n, k]} / d h[n] with frozen dynamic weights: (N, K, H, W, C)."""

  def one_image(h1, cls1):
    f = lambda hh: ref_logits(model, params, hh[None], layer)[0, cls1]
    return jax.jacrev(f)(h1)  # (K, H, W, C)

  return jax.vmap(one_image)(h, classes)


# ----------------------------------------------------------------------------
# Helpers. XLA compiles dominate the run time, so variables and images are
# built in numpy and each case runs as one jitted program.
# ----------------------------------------------------------------------------


def make_model(out_channels, ranks, kernels, strides, paddings, norm,
               temperature=3.0):
  return models.CoDANet(out_channels=tuple(out_channels), ranks=tuple(ranks),
                        kernel_sizes=tuple(kernels), strides=tuple(strides),
                        paddings=tuple(paddings), norm=norm,
                        temperature=temperature)


def init(model, x_shape, seed=0):
  """Random variables: lecun-normal A and B as in the model, and a non-zero b."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct(x_shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    if path[-1].key == "b":
      value = 0.3 * rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def four_layer(norm):
  """Kernels 3/1/3/1, strides 2/1/3/1, 4 classes; 11x9 -> 6x5 -> 6x5 -> 2x2."""
  return make_model((6, 5, 7, 4), (3, 2, 4, 3), (3, 1, 3, 1), (2, 1, 3, 1),
                    (1, 0, 1, 0), norm)


# ----------------------------------------------------------------------------
# Completeness.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _contribution_sums(model, variables, x, shared, per_image):
  """Per layer: contributions summed over (H, W, C) for all classes, then for
  chosen classes, shared (K,) at even layers and per-image (N, K) at odd ones."""
  sums = []
  for layer in range(model.num_layers):
    chosen = shared if layer % 2 == 0 else per_image
    sums.append([explain.contributions(model, variables, x, classes, layer)
                 .sum(axis=(2, 3, 4)) for classes in (None, chosen)])
  return model.apply(variables, x), sums


@pytest.mark.parametrize("norm", NORMS)
def test_contributions_sum_to_logit_minus_bias(norm):
  model = four_layer(norm)
  x = images((3, 11, 9, 2))
  variables = init(model, x.shape)
  shared = jnp.array([3, 0, 3])                      # With a repeat.
  per_image = jnp.array([[1, 2], [0, 0], [3, 1]])
  logits, sums = _contribution_sums(model, variables, x, shared, per_image)
  target = logits - model.logit_bias
  scale = float(jnp.max(jnp.abs(target)))
  assert scale > 1e-2  # Otherwise the check below is vacuous.
  for layer in range(model.num_layers):
    chosen = (target[:, shared] if layer % 2 == 0
              else jnp.take_along_axis(target, per_image, axis=1))
    for got, want in zip(sums[layer], (target, chosen)):
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5 * scale,
                                  custom_message=f"layer {layer}")


def test_explanation_fields_match_forward():
  model = four_layer("squash")
  x = images((2, 11, 9, 2), seed=3)
  variables = init(model, x.shape)

  @jax.jit
  def run(variables, x):
    e = explain.explain(model, variables, x, jnp.array([2]), layer=2)
    inputs, _ = model.apply(variables, x, method=models.CoDANet.layer_inputs)
    e_0 = explain.explain(model, variables, x, jnp.array([1]), layer=0)
    return e, e.contributions, inputs[2], model.apply(variables, x), e_0

  e, contributions, input_2, logits, e_0 = run(variables, x)
  chex.assert_trees_all_close(e_0.layer_input, jnp.concatenate([x, 1.0 - x], axis=-1))
  chex.assert_trees_all_close(e.logits, logits, rtol=1e-6)
  chex.assert_trees_all_close(e.layer_input, input_2, rtol=1e-6)
  np.testing.assert_array_equal(e.classes, [[2], [2]])
  chex.assert_trees_all_close(contributions, e.linear_map * input_2[:, None], rtol=1e-6)


# ----------------------------------------------------------------------------
# Explicit composition == Jacobian with frozen dynamic weights.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def _explicit_and_autodiff(model, variables, x, classes, layers):
  inputs, logits = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  params = variables["params"]
  per_image = jnp.broadcast_to(classes, (x.shape[0], classes.shape[-1]))
  maps = [(explain.linear_map(model, variables, x, classes, layer),
           ref_linear_map(model, params, inputs[layer], per_image, layer))
          for layer in layers]
  # From the image itself: x_0 = [x, 1 - x].
  x_0 = jnp.concatenate([x, 1.0 - x], axis=-1)
  return logits, ref_logits(model, params, x_0, 0), maps


def _check_against_autodiff(model, x, classes, layers, seed=0):
  variables = init(model, x.shape, seed)
  logits, ref, maps = _explicit_and_autodiff(model, variables, x, classes,
                                             tuple(layers))
  # The reference forward is an independent implementation of the model.
  chex.assert_trees_all_close(ref, logits, rtol=1e-5, atol=1e-5)
  for layer, (got, expected) in zip(layers, maps):
    chex.assert_shape(got, expected.shape)
    scale = float(jnp.max(jnp.abs(expected)))
    assert scale > 0.0, "all-zero Jacobian: the comparison would be vacuous"
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5 * scale,
                                custom_message=f"layer {layer}")


# Every kernel and stride, paddings 0..k//2 between them, norms alternating.
_GRID = [(1, 1, 0), (1, 2, 0), (1, 3, 0),
         (3, 1, 1), (3, 2, 0), (3, 3, 1),
         (5, 1, 0), (5, 2, 1), (5, 3, 2)]


# The varied layer and a 1x1 classifier on an 11x9 image; deeper stacks and
# intermediate layers are covered by test_every_layer and the random ones.
# Classes alternate between a shared (K,) array and a per-image (N, K) one.
@pytest.mark.parametrize("k,s,p,norm,per_image", [
    pytest.param(k, s, p, NORMS[i % 2], i % 3 == 0, id=f"k{k}_s{s}_p{p}_{NORMS[i % 2]}")
    for i, (k, s, p) in enumerate(_GRID)])
def test_linear_map_equals_frozen_jacobian(k, s, p, norm, per_image):
  model = make_model((4, 3), (3, 2), (k, 1), (s, 1), (p, 0), norm)
  x = images((2, 11, 9, 2), seed=k * 10 + s)
  classes = jnp.array([[2, 0], [1, 1]]) if per_image else jnp.array([2, 0])
  _check_against_autodiff(model, x, classes, layers=(0,))


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                            hypothesis.HealthCheck.filter_too_much])
@hypothesis.given(data=st.data())
def test_random_architectures(data):
  num_layers = data.draw(st.integers(1, 3), label="num_layers")
  kernels = [data.draw(st.sampled_from((1, 3, 5))) for _ in range(num_layers)]
  strides = [data.draw(st.sampled_from((1, 2, 3))) for _ in range(num_layers)]
  paddings = [data.draw(st.integers(0, k // 2)) for k in kernels]
  ranks = [data.draw(st.integers(1, 4)) for _ in range(num_layers)]
  channels = [data.draw(st.integers(1, 4)) for _ in range(num_layers)]
  norm = data.draw(st.sampled_from(NORMS), label="norm")
  shape = (2, data.draw(st.integers(5, 13)), data.draw(st.integers(5, 13)),
           data.draw(st.integers(1, 3)))
  model = make_model(channels, ranks, kernels, strides, paddings, norm)
  try:
    models.check_input_shape(model, shape)
    fits = True
  except ValueError:
    fits = False
  hypothesis.assume(fits)
  layer = data.draw(st.integers(0, num_layers - 1), label="layer")
  classes_shape = data.draw(st.sampled_from(((1,), (3,), (2, 1), (2, 2))),
                            label="classes_shape")
  classes = np.array(data.draw(
      st.lists(st.integers(0, channels[-1] - 1),
               min_size=int(np.prod(classes_shape)),
               max_size=int(np.prod(classes_shape))))).reshape(classes_shape)
  seed = data.draw(st.integers(0, 1000), label="seed")
  _check_against_autodiff(model, images(shape, seed), jnp.asarray(classes),
                          layers=(layer,), seed=seed)


def test_every_layer():
  # Kernels 3/1/3/1, strides 2/1/3/1; the grid above alternates the norms.
  _check_against_autodiff(four_layer("l2"), images((2, 11, 9, 2), seed=5),
                          jnp.array([[3, 1], [0, 3]]), layers=(0, 1, 2, 3))


# ----------------------------------------------------------------------------
# jit.
# ----------------------------------------------------------------------------


def _maps(model, variables, x, classes):
  return [explain.contribution_maps(model, variables, x, classes, layer)
          for layer in range(model.num_layers)]


@functools.partial(jax.jit, static_argnums=0)
def _ref_maps(model, variables, x, classes):
  """Contribution maps from the reference Jacobian: sum_C J * x_l."""
  inputs, _ = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  return [(ref_linear_map(model, variables["params"], inputs[l], classes, l)
           * inputs[l][:, None]).sum(axis=-1) for l in range(model.num_layers)]


def _two_layer():
  """Two layers keep the op-by-op (no jit) run short."""
  return make_model((6, 5), (3, 2), (3, 1), (2, 1), (1, 0), "squash")


@pytest.fixture(name="case")
def _case():
  chex.clear_trace_counter()
  model = _two_layer()
  x = images((2, 11, 9, 3), seed=7)
  return model, x, init(model, x.shape, seed=7)


@pytest.mark.parametrize("with_jit", [True, False])
def test_contribution_maps_same_with_and_without_jit(case, with_jit):
  model, x, variables = case
  classes = jnp.array([[4, 0], [1, 1]])
  # The model is static (bound here); variables, x and classes are traced.
  # Both variants must match the same jitted reference tightly, so they agree
  # with each other to 2e-5.
  fn = functools.partial(_maps, model)
  maps = (jax.jit(fn) if with_jit else fn)(variables, x, classes)
  expected = _ref_maps(model, variables, x, classes)
  for layer in range(model.num_layers):
    scale = float(jnp.max(jnp.abs(expected[layer])))
    chex.assert_trees_all_close(maps[layer], expected[layer], rtol=1e-5, atol=1e-6 * scale,
                                custom_message=f"layer {layer}")


def test_linear_map_does_not_retrace(case):
  model, x, variables = case

  @functools.partial(jax.jit, static_argnames=("model", "layer"))
  @chex.assert_max_traces(n=1)
  def fn(model, variables, x, classes, layer):
    return explain.linear_map(model, variables, x, classes, layer)

  first = fn(model, variables, x, jnp.array([0, 3]), layer=1)
  x2 = images(x.shape, seed=8)
  v2 = init(model, x2.shape, seed=8)
  c2 = jnp.array([4, 2])
  # New values, same shapes: with the same model object and an equal new one.
  second = fn(model, v2, x2, c2, layer=1)
  third = fn(_two_layer(), v2, x2, c2, layer=1)
  expected = jax.jit(explain.linear_map, static_argnums=(0, 4))(model, v2, x2, c2, 1)
  chex.assert_trees_all_close(second, expected, rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(third, expected, rtol=1e-6, atol=1e-8)
  assert not np.allclose(first, second)  # Not a stale result.


# ----------------------------------------------------------------------------
# Shapes and argument checks (by tracing only: jax.eval_shape).
# ----------------------------------------------------------------------------


_SHAPE_MODEL = models.tiny(num_classes=7)  # kernels 3/3/1, strides 1/2/1.
_SHAPE_X = jax.ShapeDtypeStruct((2, 11, 9, 3), jnp.float32)


def _shape(fn, classes, layer):
  variables = jax.eval_shape(_SHAPE_MODEL.init, jax.random.key(0), _SHAPE_X)
  return jax.eval_shape(lambda v, x: fn(_SHAPE_MODEL, v, x, classes, layer), variables,
                        _SHAPE_X).shape


@pytest.mark.parametrize("layer,classes,hwc,k", [
    # layer, classes, (H_l, W_l, C_l), K.
    (0, None, (11, 9, 6), 7),           # C_0 = 2C.
    (1, np.array([3]), (11, 9, 8), 1),
    (2, np.array([[1, 2, 6], [0, 0, 5]]), (6, 5, 8), 3),
])
def test_shapes(layer, classes, hwc, k):
  assert _shape(explain.linear_map, classes, layer) == (2, k, *hwc)
  assert _shape(explain.contributions, classes, layer) == (2, k, *hwc)
  assert _shape(explain.contribution_maps, classes, layer) == (2, k, *hwc[:2])
  assert models.layer_shapes(_SHAPE_MODEL, _SHAPE_X.shape)[layer] == hwc


@pytest.mark.parametrize("layer", [-1, 3, 10])
def test_bad_layer_raises(layer):
  with pytest.raises(ValueError, match=r"layer must be in \[0, 2\]"):
    _shape(explain.linear_map, None, layer)


@pytest.mark.parametrize("classes", [
    pytest.param(np.array(3), id="scalar"),
    pytest.param(np.zeros((3, 2), np.int32), id="wrong_batch"),
    pytest.param(np.zeros((2, 1, 1), np.int32), id="rank_3"),
    pytest.param(np.array([1.0, 2.0]), id="float"),
])
def test_bad_classes_raises(classes):
  with pytest.raises(ValueError, match="classes must"):
    _shape(explain.linear_map, classes, 0)


def test_out_of_range_classes_are_rejected():
  model = models.tiny()
  x = jnp.full((2, 8, 8, 3), 0.5)
  variables = model.init(jax.random.key(0), x)
  for bad in ([10], [-1], [[0], [10]]):
    with pytest.raises(ValueError, match="classes must be in"):
      explain.linear_map(model, variables, x, jnp.array(bad))


def test_out_of_range_classes_under_jit_give_nan_rows(case):
  # Traced classes cannot be checked: num_classes and -1 must give NaN rows,
  # not zeros (one_hot) nor the last class (-1 wrapped), and leave the others
  # exactly as with in-range classes in the same program.
  model, x, variables = case  # 5 classes.
  fn = jax.jit(functools.partial(explain.explain, model, layer=1))
  bad = fn(variables, x, jnp.array([[5, 0], [1, -1]]))
  good = fn(variables, x, jnp.array([[4, 0], [1, 4]]))
  nan = np.isnan(np.asarray(bad.linear_map))
  assert nan[0, 0].all() and nan[1, 1].all() and not nan[0, 1].any() and not nan[1, 0].any()
  assert np.isnan(np.asarray(bad.contributions))[[0, 1], [0, 1]].all()
  np.testing.assert_array_equal(bad.linear_map[[0, 1], [1, 0]], good.linear_map[[0, 1], [1, 0]])
  np.testing.assert_array_equal(bad.logits, good.logits)
  np.testing.assert_array_equal(bad.classes, [[5, 0], [1, -1]])


def test_empty_batch_raises_one_clear_error():
  model = models.tiny()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="batch of 0 images"):
    jax.eval_shape(lambda v, x: explain.contributions(model, v, x), variables,
                   jnp.zeros((0, 8, 8, 3)))


# ----------------------------------------------------------------------------
# The sweep against every layer's full matrix; the cost rule.
# ----------------------------------------------------------------------------


def _reference_linear_map(model, variables, x, classes):
  """The composition written with every layer's full matrix (`dau.transpose`)."""
  inputs, _ = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  specs = models.layer_specs(model)
  h, w = models.layer_shapes(model, x.shape)[-1][:2]
  g = jax.nn.one_hot(classes, model.num_classes) / model.temperature   # (N, K, C)
  g = jnp.broadcast_to(jnp.swapaxes(g, 1, 2)[:, None, None],
                       (x.shape[0], h, w, model.num_classes, classes.shape[1]))
  for l in reversed(range(model.num_layers)):
    g = dau.transpose(variables["params"][f"layer_{l}"], specs[l], inputs[l], g)
  return jnp.moveaxis(g, -1, 1)


@pytest.mark.parametrize("preset,size,classes", [
    ("cifar10_9l_s", 32, None),   # All classes (the materialised path).
    ("tiny", 12, [3]),            # One class: the fused transposed path.
    ("tiny", 12, [[2, 1], [0, 3]])])
def test_sweep_equals_full_matrices_and_is_complete(preset, size, classes, perturbed_init):
  shape = (2, size, size, 3)
  model = models.PRESETS[preset](temperature=10.0)
  variables = perturbed_init(model, shape)
  x = jax.random.uniform(jax.random.key(4), shape)
  cls = None if classes is None else jnp.asarray(classes)
  e = jax.jit(lambda v, x: explain.explain(model, v, x, cls))(variables, x)
  ref = jax.jit(lambda v, x: _reference_linear_map(model, v, x, e.classes))(variables, x)
  assert _rel(e.linear_map, ref) < 1e-5
  totals = jnp.sum(e.contributions, axis=(2, 3, 4))
  target = jnp.take_along_axis(e.logits, e.classes, axis=1) - model.logit_bias
  np.testing.assert_allclose(totals, target, rtol=1e-4, atol=1e-5)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_cost_rule_picks_fused_only_for_one_row():
  model = models.cifar10_9l_s()
  for l, c_in in enumerate((6, 16, 16, 32, 32, 32, 64, 64, 64)):
    for k in (1, 2, 10):
      mat, fused = explain._composition_costs(model, l, c_in, k)  # pylint: disable=protected-access
      assert (fused < mat) == (k == 1), (l, k)


def test_explain_uses_no_autodiff():
  source = pathlib.Path(explain.__file__).read_text()
  assert re.search(
      r"jax\.(grad|vjp|jacrev|jacfwd|linear_transpose)|custom_vjp|value_and_grad", source) is None


# ------------------------------------------------- issue 9: images not in [0, 1]


def test_explain_rejects_uint8_and_0_255_images():
  model = models.tiny()
  x = np.full((1, 8, 8, 3), 0.5, np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  explain.explain(model, variables, x, classes=[0])
  with pytest.raises(ValueError, match=r"got dtype uint8\. Scale 0\.\.255 images first"):
    explain.explain(model, variables, np.full((1, 8, 8, 3), 128, np.uint8), classes=[0])
  with pytest.raises(ValueError, match=r"values in \[0, 1\]; got 128\.0\.\.128\.0"):
    explain.contribution_maps(model, variables, np.full((1, 8, 8, 3), 128.0, np.float32))
