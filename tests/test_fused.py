"""The fused CoDA layer against the materialised one; the explanation sweep.

Relative errors are |a - b| / |b| in the 2-norm over a whole array (or over a
whole gradient tree where stated). The two impls round differently and the
difference grows about 1.5x per layer in a deep net (measured on the
ImageNet preset: 5e-7 after the first layer, 1.2e-5 after the ninth). So the
9-layer presets are compared per layer output and over the whole gradient
for CIFAR, and layer by layer (each layer fed the same input) for ImageNet,
all at 1e-5.
"""

import pathlib
import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from codajax import dau
from codajax import explain
from codajax import models

FUSED = ("fused_dot", "fused_conv")
TOL = 1e-5


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _tree_rel(a, b) -> float:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
            for x, y in zip(la, lb))
  den = sum(np.sum(np.asarray(y, np.float64) ** 2) for y in lb)
  return float(np.sqrt(num / den))


def _perturbed_init(model, shape, seed=0, scale=0.05):
  """Initial parameters plus noise, so that the bias b is not zero."""
  x = jnp.zeros((1, *shape[1:]), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(seed), x)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      l + scale * jnp.std(l + 1.0) * jax.random.normal(k, l.shape)
      for l, k in zip(leaves, keys)])


def _layer_outputs(model, variables, x):
  """[y_0, ..., y_{L-1}]: every layer's output."""
  inputs, _ = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  last = model.apply(variables, inputs[-1],
                     method=lambda m, h: m.layers[m.num_layers - 1](h, False))
  return inputs[1:] + [last]


def _outputs_and_vjp(model, variables, x, seed=3):
  """Every layer's output, and the gradients (params, input) of a random
  linear function of all of them."""
  outputs, vjp = jax.vjp(lambda v, x: _layer_outputs(model, v, x), variables, x)
  keys = jax.random.split(jax.random.key(seed), len(outputs))
  cotangents = [jax.random.normal(k, y.shape, y.dtype) for k, y in zip(keys, outputs)]
  return outputs, vjp(cotangents)


class PresetTest(chex.TestCase):

  def test_cifar10_9l_s_whole_network(self):
    shape = (1, 32, 32, 3)
    nets = {impl: models.cifar10_9l_s(impl=impl) for impl in ("fused", "materialized")}
    variables = _perturbed_init(nets["materialized"], shape)
    x = jax.random.uniform(jax.random.key(7), shape)
    run = jax.jit(lambda v, x: {i: _outputs_and_vjp(m, v, x) for i, m in nets.items()})
    res = run(variables, x)
    (y_m, (dv_m, dx_m)), (y_f, (dv_f, dx_f)) = res["materialized"], res["fused"]
    for l, (a, b) in enumerate(zip(y_f, y_m)):
      self.assertLess(_rel(a, b), TOL, f"output of layer {l}")
    self.assertLess(_tree_rel(dv_f, dv_m), TOL)
    self.assertLess(_rel(dx_f, dx_m), TOL)

  def test_imagenet100_9l_l_layer_by_layer(self):
    """Layers of the 9L-L preset at their shapes for 48x48 images, each fed one
    input: the 7x7 stride-3 first layer and a rank-256 64->64 layer."""
    net = models.imagenet100_9l_l()
    shapes = models.layer_shapes(net, (48, 48, 3))

    def compare(l):
      conv = models.CoDAConv(
          features=net.out_channels[l], rank=net.ranks[l], kernel_size=net.kernel_sizes[l],
          stride=net.strides[l], padding=net.paddings[l])
      h = jax.random.uniform(jax.random.key(l), (1, *shapes[l]))
      params = jax.tree.map(lambda a: a + 0.05 * jnp.std(a + 1.0) * jax.random.normal(
          jax.random.key(l + 1), a.shape), conv.init(jax.random.key(l), h)["params"])
      out = {}
      for impl in ("fused", "materialized"):
        y, vjp = jax.vjp(lambda p, h: conv.clone(impl=impl).apply({"params": p}, h), params, h)
        out[impl] = y, vjp(jax.random.normal(jax.random.key(l + 2), y.shape))
      return out

    for l in (0, 7):
      res = jax.jit(compare, static_argnums=0)(l)
      (y_f, (dp_f, dh_f)), (y_m, (dp_m, dh_m)) = res["fused"], res["materialized"]
      self.assertLess(_rel(y_f, y_m), TOL, f"layer {l} output")
      self.assertLess(_rel(dh_f, dh_m), TOL, f"layer {l} input gradient")
      for name in ("A", "B", "b"):
        self.assertLess(_rel(dp_f[name], dp_m[name]), TOL, f"layer {l} d{name}")


def _random_architecture(seed):
  """2-3 layers, kernels 1/3/5, strides 1/2/3, any padding < kernel.

  Ranks are 2..5 and below d = C_in*k*k: a rank-1 l2 unit is nearly
  scale-invariant in z, and with d <= R (w spans its whole space) it is nearly
  so too, which leaves the gradients upstream to rounding in both impls.
  """
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 4))
  kernels = [int(k) for k in rng.choice([1, 3, 5], n)]
  channels = [int(c) for c in rng.integers(3, 8, n)]
  ranks = [min(int(r), c_in * k * k - 1)
           for r, c_in, k in zip(rng.integers(2, 6, n), [6] + channels[:-1], kernels)]
  return dict(
      out_channels=tuple(channels), ranks=tuple(ranks), kernel_sizes=tuple(kernels),
      strides=tuple(int(s) for s in rng.choice([1, 2, 3], n)),
      paddings=tuple(int(rng.integers(0, k)) for k in kernels),
      norm=("squash", "l2")[seed % 2], temperature=float(rng.uniform(1, 20)))


class RandomArchitectureTest(chex.TestCase):

  # fused_conv's backward compiles slowly on CPU: one architecture; remat on another.
  @parameterized.parameters((0, FUSED), (1, ("fused_dot", "remat")), (2, ("fused_dot",)))
  def test_fused_equals_materialized(self, seed, impls):
    arch = _random_architecture(seed)
    shape = (2, 17 + seed, 11 + 2 * seed, 3)    # Non-square.
    nets = {impl: models.CoDANet(**arch, impl=impl) for impl in impls if impl != "remat"}
    nets["materialized"] = models.CoDANet(**arch, impl="materialized")
    if "remat" in impls:
      nets["remat"] = models.CoDANet(**arch, impl="fused_dot", remat=True)
    variables = _perturbed_init(nets["materialized"], shape, seed=seed, scale=0.3)
    x = jax.random.uniform(jax.random.key(seed), shape)
    res = jax.jit(lambda v, x: {i: _outputs_and_vjp(m, v, x) for i, m in nets.items()})(
        variables, x)
    y_m, (dv_m, dx_m) = res["materialized"]
    for impl in impls:
      y_f, (dv_f, dx_f) = res[impl]
      msg = f"{impl} {arch}"
      for l, (a, b) in enumerate(zip(y_f, y_m)):
        self.assertLess(_rel(a, b), TOL, f"{msg} layer {l}")
      self.assertLess(_tree_rel(dv_f, dv_m), TOL, msg)
      # Per array too, where the gradient is not ~0 by cancellation (an l2 unit
      # is scale-invariant in w, so e.g. a rank-1 layer's dB can be 1e-7 of
      # the rest): there both impls are only accurate relative to the tree.
      scale = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(dv_m)))
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dv_f),
                              jax.tree.leaves(dv_m)):
        if np.linalg.norm(b) > 1e-3 * scale:
          self.assertLess(_rel(a, b), TOL, f"{msg} {jax.tree_util.keystr(path)}")
      self.assertLess(_rel(dx_f, dx_m), TOL, msg)


class StructureTest(chex.TestCase):

  def test_same_parameters_for_every_impl_and_remat(self):
    shape = (1, 12, 12, 3)
    x = jnp.zeros(shape)
    trees = [jax.tree.map(jnp.shape, jax.eval_shape(models.tiny(impl=impl, remat=remat).init,
                                                    jax.random.key(0), x))
             for impl in models.IMPLS for remat in (False, True)]
    for tree in trees[1:]:
      self.assertEqual(tree, trees[0])

  def test_from_config_impl_and_remat(self):
    cfg = dict(out_channels=[4, 3], ranks=[2, 2], kernel_sizes=[3, 1], strides=[1, 1],
               paddings=[1, 0], impl="materialized", remat=1)
    model = models.from_config(cfg)
    self.assertEqual((model.impl, model.remat), ("materialized", True))
    self.assertEqual(models.from_config({**cfg, "impl": "fused"}).impl, "fused")
    with self.assertRaisesRegex(ValueError, "impl"):
      models.from_config({**cfg, "impl": "fast"}).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))

  def test_default_is_fused_with_a_per_backend_contraction(self):
    self.assertEqual(models.tiny().impl, "fused")
    self.assertEqual(dau.default_contraction("cpu"), "dot")
    self.assertEqual(dau.default_contraction("gpu"), "dot")
    self.assertEqual(dau.default_contraction("tpu"), "conv")


class MixedPrecisionTest(chex.TestCase):

  def test_bfloat16_cifar_forward_finite_and_close_to_float32(self):
    shape = (2, 32, 32, 3)
    f32 = models.cifar10_9l_s(temperature=10.0)
    bf16 = models.cifar10_9l_s(temperature=10.0, dtype=jnp.bfloat16)
    bf16_mat = models.cifar10_9l_s(temperature=10.0, dtype=jnp.bfloat16, impl="materialized")
    variables = _perturbed_init(f32, shape)
    x = jax.random.uniform(jax.random.key(2), shape)
    run = jax.jit(lambda v: [_layer_outputs(m, v, x) for m in (f32, bf16, bf16_mat)])
    y32, y16, y16_mat = run(variables)
    for l, (a, b, c) in enumerate(zip(y16, y32, y16_mat)):
      self.assertEqual(a.dtype, jnp.float32)       # Layer outputs, norms: float32.
      self.assertTrue(bool(jnp.all(jnp.isfinite(a))), l)
      # bf16 keeps 8 bits (eps 2^-8 = 0.4% at the first layer); the error grows
      # about 1.45x per layer (10% at the ninth), as much as the materialised
      # impl's in bf16: the fused form adds no error of its own.
      self.assertLess(_rel(a, b), 0.15, l)
      self.assertLess(_rel(a, b), 1.1 * _rel(c, b) + 1e-3, l)

  def test_bfloat16_gradients_finite_and_close_to_float32(self):
    shape = (2, 12, 12, 3)
    f32, bf16 = models.tiny(), models.tiny(dtype=jnp.bfloat16)
    variables = _perturbed_init(f32, shape)
    x = jax.random.uniform(jax.random.key(2), shape)
    loss = lambda m: lambda v: jnp.sum(jnp.sin(m.apply(v, x)))
    g32, g16 = jax.jit(lambda v: [jax.grad(loss(m))(v) for m in (f32, bf16)])(variables)
    self.assertTrue(all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16)))
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g16)))
    self.assertLess(_tree_rel(g16, g32), 0.05)

  def test_bfloat16_layer_runs_its_contraction_in_bfloat16(self):
    conv = models.CoDAConv(features=4, rank=3, kernel_size=3, padding=1, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32)
    variables = jax.eval_shape(conv.init, jax.random.key(0), x)
    for contraction in ("fused_dot", "fused_conv"):
      hlo = jax.jit(conv.clone(impl=contraction).apply).lower(variables, x).as_text()
      # The big contraction (and z's) takes bf16 operands.
      self.assertRegex(hlo, r"(dot_general|convolution)[^\n]*bf16", contraction)
    self.assertEqual(jax.eval_shape(conv.apply, variables, x).dtype, jnp.float32)


def _reference_linear_map(model, variables, x, classes):
  """The composition written with every layer's full normalised matrix."""
  inputs, _ = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  g = jax.nn.one_hot(classes, model.num_classes) / model.temperature
  h, w = _layer_outputs(model, variables, x)[-1].shape[1:3]
  g = jnp.broadcast_to(g[:, :, None, None, :], (*classes.shape, h, w, model.num_classes))
  for l in reversed(range(model.num_layers)):
    matrix = model.apply(variables, inputs[l], l, method=models.CoDANet.layer_matrix)
    g = dau.fold(dau.transpose_matrix(g, matrix), inputs[l].shape[1:3],
                 model.kernel_sizes[l], model.strides[l], model.paddings[l])
  return g


class ExplanationSweepTest(chex.TestCase):

  @parameterized.parameters(
      ("cifar10_9l_s", 32, None),   # All classes (the materialised path).
      ("tiny", 12, [3]),            # One class: the fused transposed path.
      ("tiny", 12, [[2, 1], [0, 3]]))
  def test_sweep_equals_full_matrices_and_is_complete(self, preset, size, classes):
    shape = (2, size, size, 3)
    model = models.PRESETS[preset](temperature=10.0)
    variables = _perturbed_init(model, shape)
    x = jax.random.uniform(jax.random.key(4), shape)
    cls = None if classes is None else jnp.asarray(classes)
    e = jax.jit(lambda v, x: explain.explain(model, v, x, cls))(variables, x)
    ref = jax.jit(lambda v, x: _reference_linear_map(model, v, x, e.classes))(variables, x)
    self.assertLess(_rel(e.linear_map, ref), 1e-5)
    totals = jnp.sum(e.contributions, axis=(2, 3, 4))
    target = jnp.take_along_axis(e.logits, e.classes, axis=1) - model.logit_bias
    np.testing.assert_allclose(totals, target, rtol=1e-4, atol=1e-5)

  def test_fused_transposed_path_and_chunks_agree(self):
    """dau.transpose_layer: materialised (whole batch, one image at a time)
    and fused, for K = 1 and K = 3 rows."""
    conv = models.CoDAConv(features=5, rank=4, kernel_size=3, stride=2, padding=1)
    x = jax.random.uniform(jax.random.key(0), (3, 9, 8, 4))
    variables = conv.init(jax.random.key(1), x)
    p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape),
                     variables["params"])
    @jax.jit
    def run(p, g):
      pull = lambda fused, chunk: dau.transpose_layer(
          g, x, p["B"], p["A"], p["b"], 5, 3, 2, 1, "squash", fused=fused, chunk=chunk)
      matrix = conv.apply({"params": p}, x, True)
      explicit = dau.fold(dau.transpose_matrix(jnp.moveaxis(g, -1, 1), matrix),
                          (9, 8), 3, 2, 1)
      return pull(False, None), pull(False, 1), pull(True, None), explicit

    for k in (1, 3):
      ref, chunked, fused, explicit = run(p, jax.random.normal(jax.random.key(k),
                                                               (3, 5, 4, 5, k)))
      self.assertLess(_rel(jnp.moveaxis(ref, -1, 1), explicit), 1e-6)
      self.assertLess(_rel(chunked, ref), 1e-6)
      self.assertLess(_rel(fused, ref), 1e-6)

  def test_cost_rule_picks_fused_only_for_one_row(self):
    model = models.cifar10_9l_s()
    for l, c_in in enumerate((6, 16, 16, 32, 32, 32, 64, 64, 64)):
      for k in (1, 2, 10):
        mat, fused = explain._composition_costs(model, l, c_in, k)  # pylint: disable=protected-access
        self.assertEqual(fused < mat, k == 1, (l, k))

  def test_explain_uses_no_autodiff(self):
    source = pathlib.Path(explain.__file__).read_text()
    self.assertIsNone(re.search(
        r"jax\.(grad|vjp|jacrev|jacfwd|linear_transpose)|custom_vjp|value_and_grad", source))
