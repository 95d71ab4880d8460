"""Tests for codajax.attribution: each baseline against an independent computation.

XLA compiles dominate the run time, so the tiny model's attributions are
computed once per (method, options) and shared between tests (`_attribution`).
"""

import functools
import inspect
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codajax import attribution
from codajax import dau
from codajax import explain
from codajax import models
from test_explain import init  # Random variables with a non-zero b.

N, H, K = 8, 8, 2


def images(shape, seed=0, lo=0.0, hi=1.0):
  return jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, size=shape), jnp.float32)


MODEL = models.tiny(num_classes=5, temperature=3.0)
X = images((N, H, H, 3), lo=0.1, hi=0.9)
VARIABLES = init(MODEL, X.shape)
CLASSES = jnp.asarray(np.random.default_rng(1).integers(0, 5, size=(N, K)))


@functools.cache
def _attribution(method, **options):
  return np.asarray(attribution.attribute(method, MODEL, VARIABLES, X, CLASSES, **options))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, variables, x):
  return model.apply(variables, x)


def _targets(logits, classes=CLASSES):
  return np.take_along_axis(np.asarray(logits), np.asarray(classes), axis=1)


# ----------------------------------------------------------------------------
# The interface.


@pytest.mark.parametrize("method", [m for m in attribution.METHODS if m != "lime"])
def test_shape_and_dtype(method):
  options = dict(num_masks=64) if method == "rise" else {}
  maps = _attribution(method, **options)
  chex.assert_shape(maps, (N, K, H, H))
  assert maps.dtype == np.float32
  assert np.isfinite(maps).all() and np.abs(maps).max() > 0, method


def test_each_method_has_one_function_taking_its_declared_options():
  """methods.OPTIONS is the one declaration of the options and their defaults:
  the table has a function for every method but LIME (run on the host), and
  each computation takes exactly its method's options, with no defaults of its own."""
  assert set(attribution._FUNCTIONS) == set(attribution.METHODS) - {"lime"}
  for fn, method in ((attribution.integrated_gradients, "intgrad"),
                     (attribution.gradcam, "gradcam"), (attribution.occlusion, "occ5"),
                     (attribution.occlusion, "occ9"), (attribution.rise, "rise")):
    options = {name: p for name, p in inspect.signature(fn).parameters.items()
               if p.kind is p.KEYWORD_ONLY}
    assert set(options) == set(attribution.OPTIONS[method]), method
    assert all(p.default is p.empty for p in options.values()), method
  lime = list(inspect.signature(attribution._lime).parameters)
  assert lime[4:] == list(attribution.OPTIONS["lime"])
  for method in ("ours", "grad", "ixg", "deeplift"):
    assert not attribution.OPTIONS[method]
    assert len(inspect.signature(attribution._FUNCTIONS[method]).parameters) == 4


def test_unknown_method_option_or_value_raises():
  with pytest.raises(ValueError, match=r"unknown method 'smoothgrad'.*'occ9'"):
    attribution.attribute("smoothgrad", MODEL, VARIABLES, X, CLASSES)
  with pytest.raises(ValueError, match=r"'grad' has no option\(s\) \['steps'\].*none"):
    attribution.attribute("grad", MODEL, VARIABLES, X, CLASSES, steps=3)
  with pytest.raises(ValueError, match=r"no option\(s\) \['ks'\].*exact_patch"):
    attribution.attribute("occ5", MODEL, VARIABLES, X, CLASSES, ks=3)
  with pytest.raises(ValueError, match=r"quadrature must be one of.*'riemann'"):
    attribution.attribute("intgrad", MODEL, VARIABLES, X, CLASSES, quadrature="trapezoid")
  with pytest.raises(ValueError, match=r"layer must be in \[-3, -1\]"):
    attribution.attribute("gradcam", MODEL, VARIABLES, X, CLASSES, layer=0)
  with pytest.raises(ValueError, match=r"classes must be in \[0, 4\]"):
    attribution.attribute("grad", MODEL, VARIABLES, X, CLASSES + 5)


def test_method_names_are_case_insensitive_or_suggested():
  assert attribution.canonical_method("GradCAM") == "gradcam"
  assert [attribution.canonical_method(m.upper()) for m in attribution.METHODS] == list(
      attribution.METHODS)
  np.testing.assert_array_equal(
      attribution.attribute("IxG", MODEL, VARIABLES, X, CLASSES), _attribution("ixg"))
  with pytest.raises(ValueError, match=r"^attribute: unknown method 'Grad-CAM' \(did you mean "
                     r"'gradcam'"):
    attribution.attribute("Grad-CAM", MODEL, VARIABLES, X, CLASSES)


# Under jit, out-of-range classes: one of num_classes = 5, one of -1.
BAD = np.asarray(CLASSES).copy()
BAD[0, 0], BAD[1, 1] = 5, -1


@pytest.mark.parametrize("method", [m for m in attribution.METHODS if m != "lime"])
def test_out_of_range_classes_under_jit_give_nan_maps(method):
  options = dict(num_masks=64) if method == "rise" else {}
  maps = np.asarray(jax.jit(functools.partial(attribution.attribute, method, MODEL, **options))(
      VARIABLES, X, jnp.asarray(BAD)))
  bad = np.zeros(BAD.shape, bool)
  bad[0, 0] = bad[1, 1] = True
  assert np.isnan(maps[bad]).all(), method        # Not zeros, nor the last class's map.
  np.testing.assert_allclose(maps[~bad], _attribution(method, **options)[~bad],
                             rtol=1e-5, atol=1e-6)


def test_lime_under_jit_is_refused():
  with pytest.raises(ValueError, match="'lime' runs on the host .* outside jax.jit"):
    jax.jit(functools.partial(attribution.attribute, "lime", MODEL))(VARIABLES, X, CLASSES)


def test_lime_without_the_package_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "lime", None)  # `import lime` now raises ImportError.
  with pytest.raises(ImportError, match=r"bash launch/setup.sh lime \(or "
                                       r"\.venv/bin/pip install -e '\.\[lime\]'\)"):
    attribution.attribute("lime", MODEL, VARIABLES, X, CLASSES)


# ----------------------------------------------------------------------------
# Gradient methods.


def test_ours_is_contribution_maps():
  want = jax.jit(explain.contribution_maps, static_argnums=0)(MODEL, VARIABLES, X, CLASSES)
  chex.assert_trees_all_close(_attribution("ours"), want, rtol=1e-6, atol=1e-7)


def test_deeplift_is_ixg_and_one_right_riemann_step_is_ixg():
  ixg = _attribution("ixg")
  np.testing.assert_array_equal(_attribution("deeplift"), ixg)
  chex.assert_trees_all_close(_attribution("intgrad", steps=1, quadrature="riemann"), ixg,
                              rtol=1e-6, atol=1e-7)


def test_grad_matches_finite_differences():
  """d logit / d x summed over RGB at a pixel is the derivative along (1, 1, 1) there."""
  grad = _attribution("grad")
  pixels = [(0, 0), (3, 5), (7, 2), (4, 4)]
  eps = 1e-2
  bumps = np.zeros((2 * len(pixels), H, H, 3), np.float32)
  for i, (r, c) in enumerate(pixels):
    bumps[2 * i, r, c], bumps[2 * i + 1, r, c] = eps, -eps
  perturbed = (X[:, None] + bumps[None]).reshape(-1, H, H, 3)
  logits = np.asarray(_logits(MODEL, VARIABLES, perturbed)).reshape(N, len(pixels), 2, -1)
  fd = (logits[:, :, 0] - logits[:, :, 1]) / (2 * eps)                 # (N, pixels, classes)
  fd = np.take_along_axis(fd, np.asarray(CLASSES)[:, None, :], axis=2)  # (N, pixels, K)
  got = np.stack([grad[:, :, r, c] for r, c in pixels], axis=1)
  scale = np.abs(got).max()
  assert scale > 1e-3
  np.testing.assert_allclose(got, fd, rtol=1e-2, atol=1e-3 * scale)


@functools.partial(jax.jit, static_argnums=0)
def _input_gradients(model, variables, x, classes):
  return attribution.input_gradients(lambda x: model.apply(variables, x), x, classes)


def test_grad_fused_matches_materialized_on_9l_s():
  x = images((1, 32, 32, 3), seed=2)
  fused = models.cifar10_9l_s(impl="fused")
  variables = init(fused, x.shape)
  classes = jnp.array([[3, 8]])
  got = _input_gradients(fused, variables, x, classes)
  want = _input_gradients(models.cifar10_9l_s(impl="materialized"), variables, x, classes)
  scale = float(jnp.abs(want).max())
  assert scale > 0
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_intgrad_is_complete():
  """sum_p IG(p) = logit(x) - logit(0) (Gauss-Legendre, 20 steps, smooth path)."""
  total = _attribution("intgrad").sum(axis=(2, 3))
  logits = _logits(MODEL, VARIABLES, X)
  want = _targets(logits) - _targets(_logits(MODEL, VARIABLES, jnp.zeros_like(X)))
  scale = np.abs(want).max()
  assert scale > 1e-2
  np.testing.assert_allclose(total, want, rtol=1e-3, atol=1e-3 * scale)


def test_quadrature_rules():
  a, w = attribution.quadrature_rule(20, "gausslegendre")
  np.testing.assert_allclose(w.sum(), 1.0)
  np.testing.assert_allclose((w * a**7).sum(), 1 / 8)   # Exact for polynomials of degree < 40.
  a, w = attribution.quadrature_rule(4, "riemann")
  np.testing.assert_allclose(a, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(w, [0.25] * 4)


# ----------------------------------------------------------------------------
# GradCAM.


@jax.jit
def _last_layer_output(variables, x):
  def run(module, x):
    h = module.encode(x)
    for layer in module.layers:
      h = layer(h)
    return h
  return MODEL.apply(variables, x, method=run)


def test_gradcam_is_relu_class_map_over_t_upsampled_nearest():
  y = np.asarray(_last_layer_output(VARIABLES, X))                         # (N, 4, 4, 5)
  maps = np.maximum(np.take_along_axis(y, np.asarray(CLASSES)[:, None, None, :], axis=3), 0)
  want = np.moveaxis(maps, 3, 1).repeat(2, axis=2).repeat(2, axis=3) / MODEL.temperature
  assert (want > 0).any() and (want == 0).any()
  chex.assert_trees_all_close(_attribution("gradcam"), want, rtol=1e-5, atol=1e-7)


@jax.jit
def _last_features_and_jacobian(variables, x):
  """The last layer's input and d logits / d input, by autodiff of `dau.layer`."""
  inputs, _ = MODEL.apply(variables, x, method=models.CoDANet.layer_inputs)
  spec = models.layer_specs(MODEL)[-1]
  params = variables["params"][f"layer_{MODEL.num_layers - 1}"]
  logits = lambda a: (dau.layer(params, spec, a[None]).sum((1, 2))[0] / MODEL.temperature
                      + MODEL.logit_bias)
  return inputs[-1], jax.vmap(jax.jacrev(logits))(inputs[-1])


def test_gradcam_on_features_matches_autodiff_of_materialized_last_layer():
  feats, jac = _last_features_and_jacobian(VARIABLES, X)   # (N, 4, 4, 8), (N, 5, 4, 4, 8)
  jac = np.take_along_axis(np.asarray(jac), np.asarray(CLASSES)[..., None, None, None], axis=1)
  cam = np.maximum(np.einsum("nkc,nhwc->nkhw", jac.mean(axis=(2, 3)), feats), 0)
  want = cam.repeat(2, axis=2).repeat(2, axis=3)
  assert (want > 0).any()
  chex.assert_trees_all_close(_attribution("gradcam", layer=-2), want, rtol=1e-4,
                              atol=1e-6 * want.max())


def test_upsample_nearest_matches_torch_rule_for_non_integer_ratio():
  maps = np.arange(3.0)[:, None] * 10 + np.arange(3.0)
  got = np.asarray(attribution.upsample_nearest(jnp.asarray(maps), (5, 4)))
  rows, cols = np.floor(np.arange(5) * 3 / 5).astype(int), np.floor(np.arange(4) * 3 / 4).astype(int)
  np.testing.assert_array_equal(got, maps[rows][:, cols])


# ----------------------------------------------------------------------------
# Occlusion.


def brute_force_occlusion(logits_fn, x, ks, stride, exact_patch):
  """The authors' loop (explainers/occlusion.py, odd ks): one mask per anchor."""
  x = np.asarray(x)
  n, h, w, _ = x.shape
  half = (ks - 1) // 2
  masks = []
  for a in range(0, h, stride):
    for b in range(0, w, stride):
      mask = np.ones((h, w), np.float32)
      mask[max(0, a - half):a + half + exact_patch, max(0, b - half):b + half + exact_patch] = 0
      masks.append(mask)
  masks = np.stack(masks)
  base = np.asarray(logits_fn(jnp.asarray(x)))
  pert = np.asarray(logits_fn(jnp.asarray((x[:, None] * masks[None, ..., None])
                                          .reshape(-1, h, w, x.shape[-1])))).reshape(n, len(masks), -1)
  part = 1.0 - masks
  influence = (base[:, None] - pert)[..., None, None] * part[None, :, None] / part.sum(
      axis=(1, 2))[None, :, None, None, None]
  return influence.sum(axis=1)                                              # (N, classes, H, W)


@pytest.mark.parametrize("method,exact_patch", [("occ5", False), ("occ9", False),
                                                ("occ5", True)])
def test_occlusion_matches_the_authors_loop(method, exact_patch):
  logits_fn = functools.partial(_logits, MODEL, VARIABLES)
  want = brute_force_occlusion(logits_fn, X, int(method[3:]), 2, int(exact_patch))
  want = np.take_along_axis(want, np.asarray(CLASSES)[:, :, None, None], axis=1)
  options = dict(exact_patch=True, chunk=5) if exact_patch else {}  # chunk 5: a padded chunk.
  chex.assert_trees_all_close(_attribution(method, **options), want, rtol=1e-5,
                              atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("ks,exact_patch,covering", [(5, False, 4), (5, True, 6), (9, False, 16)])
def test_occlusion_of_a_function_linear_in_one_pixel(ks, exact_patch, covering):
  """logit_k = w_k * x[4, 5, :].sum(): every mask covering (4, 5) sees the drop
  w_k * x[4, 5].sum() and spreads it over its pixels; no other pixel gets any."""
  weights = jnp.array([1.0, -2.0, 0.5])
  logits_fn = lambda x: x[:, 4, 5, :].sum(-1, keepdims=True) * weights
  x = images((2, 12, 12, 3), seed=4)
  options = dict(attribution.OPTIONS[f"occ{ks}"], exact_patch=exact_patch)
  maps = np.asarray(attribution.occlusion(logits_fn, x, ks, **options))
  effect = np.asarray(logits_fn(x))                                          # (2, 3)
  np.testing.assert_allclose(maps.sum(axis=(2, 3)), covering * effect, rtol=1e-5)
  half = (ks - 1) // 2
  reach = np.zeros((12, 12), bool)  # Pixels sharing a mask with (4, 5).
  for a in range(0, 12, 2):
    for b in range(0, 12, 2):
      rows, cols = slice(max(0, a - half), a + half + exact_patch), slice(max(0, b - half),
                                                                          b + half + exact_patch)
      if rows.start <= 4 < rows.stop and cols.start <= 5 < cols.stop:
        reach[rows, cols] = True
  assert (maps[..., ~reach] == 0).all() and (maps[..., reach] != 0).all()


# ----------------------------------------------------------------------------
# RISE and LIME.


def test_rise_masks_upsample_as_skimage():
  skimage_transform = pytest.importorskip("skimage.transform")
  grid = np.random.default_rng(5).uniform(size=(6, 6))
  for n_out in (42, 35, 14):
    want = skimage_transform.resize(grid, (n_out, n_out), order=1, mode="reflect",
                                    anti_aliasing=False)
    m = attribution.resize_matrix(6, n_out)
    np.testing.assert_allclose(m @ grid @ m.T, want, rtol=1e-5, atol=1e-6)


def test_rise_is_seeded_and_unbiased():
  """With a constant score sigmoid(c), RISE gives sigmoid(c) * mean(m) / p, and a
  mask pixel is on with probability p (interpolation weights sum to 1)."""
  x = images((2, 12, 12, 3), seed=6)
  logits_fn = lambda x: jnp.zeros((x.shape[0], 1)) + jnp.array([1.5])
  options = dict(attribution.OPTIONS["rise"], num_masks=3000, chunk=64)
  del options["seed"]
  run = functools.partial(attribution.rise, logits_fn, x, **options)
  a, b, c = np.asarray(run(seed=0)), np.asarray(run(seed=0)), np.asarray(run(seed=1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  np.testing.assert_allclose(a.mean(), jax.nn.sigmoid(1.5), rtol=0.03)
  np.testing.assert_allclose(a, jax.nn.sigmoid(1.5), rtol=0.25)


def test_rise_of_the_model_matches_a_brute_force_sum():
  """Same masks (seed), summed one by one: sal_k = sum_i sigmoid(logit_k(x m_i)) m_i / (n p)."""
  num_masks, s, p = 64, 6, 0.1
  got = _attribution("rise", num_masks=num_masks)
  key_grid, key_shift = jax.random.split(jax.random.key(42))
  grids = np.asarray(jax.random.uniform(key_grid, (num_masks, s, s)) < p, np.float32)
  cell = -(-H // s)
  shifts = np.asarray(jax.random.randint(key_shift, (num_masks, 2), 0, jnp.asarray([cell, cell])))
  up = attribution.resize_matrix(s, (s + 1) * cell)
  masks = np.stack([(up @ g @ up.T)[dy:dy + H, dx:dx + H] for g, (dy, dx) in zip(grids, shifts)])
  scores = jax.nn.sigmoid(_logits(MODEL, VARIABLES, (X[:, None] * masks[None, ..., None])
                                  .reshape(-1, H, H, 3))).reshape(N, num_masks, -1)
  want = np.einsum("nmk,mhw->nkhw", scores, masks) / (num_masks * p)
  want = np.take_along_axis(want, np.asarray(CLASSES)[:, :, None, None], axis=1)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_lime_is_seeded_binary_mask():
  pytest.importorskip("lime")
  x = images((2, 24, 24, 3), seed=7)
  run = functools.partial(attribution.attribute, "lime", MODEL, VARIABLES, x,
                          jnp.array([[0, 3], [1, 1]]), num_samples=16, batch_size=16)
  a, b, c = np.asarray(run(seed=0)), np.asarray(run(seed=0)), np.asarray(run(seed=1))
  chex.assert_shape(a, (2, 2, 24, 24))
  assert a.dtype == np.float32 and set(np.unique(a)) <= {0.0, 1.0} and a.max() == 1
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[1, 0], a[1, 1])  # Same class, same map.
  assert (a != c).any()


# ----------------------------------------------------------------------------
# Data parallelism.


@pytest.mark.parametrize("method", ["occ5"])
def test_attribute_on_a_batch_sharded_over_data(method):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x = jax.device_put(X, NamedSharding(mesh, P("data")))
  got = attribution.attribute(method, MODEL, VARIABLES, x, CLASSES)
  chex.assert_trees_all_close(got, _attribution(method), rtol=1e-5, atol=1e-6)


def test_lime_on_grey_images():
  """quickshift needs RGB: lime gets the grey image and the model one channel."""
  pytest.importorskip("lime")
  model = models.tiny(10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  x = images((1, 16, 16, 1), seed=3)
  a = np.asarray(attribution.attribute("lime", model, variables, x, jnp.array([[2]]),
                                       num_samples=16, batch_size=16))
  chex.assert_shape(a, (1, 1, 16, 16))
  assert set(np.unique(a)) <= {0.0, 1.0}
