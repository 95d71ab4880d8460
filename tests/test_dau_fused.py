"""Tests for codajax.dau_fused: the fused layer and its explanation transposes
against the reference (codajax.dau, the "materialized" impl).

Relative errors are |a - b| / |b| in the 2-norm over a whole array (or over a
whole gradient tree where stated). The two impls round differently and the
difference grows about 1.5x per layer in a deep net (on the ImageNet preset:
5e-7 after the first layer, 1.2e-5 after the ninth). So the 9-layer presets
are compared per layer output and over the whole gradient for CIFAR, and
layer by layer (each layer fed the same input) for ImageNet, all at 1e-5.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import dau
from codajax import dau_fused
from codajax import models

FUSED = ("dot", "conv")   # The fused layer's contractions.
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


def _layer_outputs(model, variables, x):
  """[y_0, ..., y_{L-1}]: every layer's output."""
  inputs, _ = model.apply(variables, x, method=models.CoDANet.layer_inputs)
  last = model.apply(variables, inputs[-1], method=lambda m, h: m.layers[m.num_layers - 1](h))
  return inputs[1:] + [last]


def _outputs_and_vjp(model, variables, x, seed=3):
  """Every layer's output, and the gradients (params, input) of a random
  linear function of all of them."""
  outputs, vjp = jax.vjp(lambda v, x: _layer_outputs(model, v, x), variables, x)
  keys = jax.random.split(jax.random.key(seed), len(outputs))
  cotangents = [jax.random.normal(k, y.shape, y.dtype) for k, y in zip(keys, outputs)]
  return outputs, vjp(cotangents)


# ----------------------------------------------------------------------------
# The presets.
# ----------------------------------------------------------------------------


def test_cifar10_9l_s_whole_network(perturbed_init):
  shape = (1, 32, 32, 3)
  nets = {impl: models.cifar10_9l_s(impl=impl) for impl in ("fused", "materialized")}
  variables = perturbed_init(nets["materialized"], shape)
  x = jax.random.uniform(jax.random.key(7), shape)
  run = jax.jit(lambda v, x: {i: _outputs_and_vjp(m, v, x) for i, m in nets.items()})
  res = run(variables, x)
  (y_m, (dv_m, dx_m)), (y_f, (dv_f, dx_f)) = res["materialized"], res["fused"]
  for l, (a, b) in enumerate(zip(y_f, y_m)):
    assert _rel(a, b) < TOL, f"output of layer {l}"
  assert _tree_rel(dv_f, dv_m) < TOL
  assert _rel(dx_f, dx_m) < TOL


def test_imagenet100_9l_l_layer_by_layer():
  """Layers of the 9L-L preset at their shapes for 48x48 images, each fed one
  input: the 7x7 stride-3 first layer and a rank-256 64->64 layer."""
  net = models.imagenet100_9l_l()
  shapes = models.layer_shapes(net, (48, 48, 3))
  specs = models.layer_specs(net)

  def compare(l):
    conv = models.CoDAConv(
        features=net.out_channels[l], rank=net.ranks[l], kernel_size=net.kernel_sizes[l],
        stride=net.strides[l], padding=net.paddings[l])
    h = jax.random.uniform(jax.random.key(l), (1, *shapes[l]))
    params = jax.tree.map(lambda a: a + 0.05 * jnp.std(a + 1.0) * jax.random.normal(
        jax.random.key(l + 1), a.shape), conv.init(jax.random.key(l), h)["params"])
    out = {}
    for impl, forward in (("fused", dau_fused.layer), ("materialized", dau.layer)):
      y, vjp = jax.vjp(lambda p, h: forward(p, specs[l], h), params, h)
      out[impl] = y, vjp(jax.random.normal(jax.random.key(l + 2), y.shape))
    return out

  for l in (0, 7):
    res = jax.jit(compare, static_argnums=0)(l)
    (y_f, (dp_f, dh_f)), (y_m, (dp_m, dh_m)) = res["fused"], res["materialized"]
    assert _rel(y_f, y_m) < TOL, f"layer {l} output"
    assert _rel(dh_f, dh_m) < TOL, f"layer {l} input gradient"
    for name in ("A", "B", "b"):
      assert _rel(dp_f[name], dp_m[name]) < TOL, f"layer {l} d{name}"


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


# fused "conv"'s backward compiles slowly on CPU: one architecture; remat on another.
@pytest.mark.parametrize("seed,variants", [(0, FUSED), (1, ("dot", "remat")), (2, ("dot",))])
def test_fused_equals_materialized(seed, variants, perturbed_init):
  arch = _random_architecture(seed)
  shape = (2, 17 + seed, 11 + 2 * seed, 3)    # Non-square.
  nets = {c: models.CoDANet(**arch, impl="fused", contraction=c)
          for c in variants if c != "remat"}
  nets["materialized"] = models.CoDANet(**arch, impl="materialized")
  if "remat" in variants:
    nets["remat"] = models.CoDANet(**arch, impl="fused", contraction="dot", remat=True)
  variables = perturbed_init(nets["materialized"], shape, seed=seed, scale=0.3)
  x = jax.random.uniform(jax.random.key(seed), shape)
  res = jax.jit(lambda v, x: {i: _outputs_and_vjp(m, v, x) for i, m in nets.items()})(
      variables, x)
  y_m, (dv_m, dx_m) = res["materialized"]
  for variant in variants:
    y_f, (dv_f, dx_f) = res[variant]
    msg = f"{variant} {arch}"
    for l, (a, b) in enumerate(zip(y_f, y_m)):
      assert _rel(a, b) < TOL, f"{msg} layer {l}"
    assert _tree_rel(dv_f, dv_m) < TOL, msg
    # Per array too, where the gradient is not ~0 by cancellation (an l2 unit
    # is scale-invariant in w, so e.g. a rank-1 layer's dB can be 1e-7 of
    # the rest): there both impls are only accurate relative to the tree.
    scale = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(dv_m)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(dv_f),
                            jax.tree.leaves(dv_m)):
      if np.linalg.norm(b) > 1e-3 * scale:
        assert _rel(a, b) < TOL, f"{msg} {jax.tree_util.keystr(path)}"
    assert _rel(dx_f, dx_m) < TOL, msg


def test_default_contraction_per_backend():
  assert dau_fused.default_contraction("cpu") == "dot"
  assert dau_fused.default_contraction("gpu") == "dot"
  assert dau_fused.default_contraction("tpu") == "conv"
  spec = dau.Layer(features=2, rank=1, kernel=1)
  params = {"B": jnp.ones((1, 1, 3, 1)), "A": jnp.ones((1, 6)), "b": jnp.ones(6)}
  with pytest.raises(ValueError, match="contraction must be one of"):
    dau_fused.layer(params, spec, jnp.ones((1, 2, 2, 3)), "fft")


# ----------------------------------------------------------------------------
# Mixed precision.
# ----------------------------------------------------------------------------


def test_bfloat16_cifar_forward_finite_and_close_to_float32(perturbed_init):
  shape = (2, 32, 32, 3)
  f32 = models.cifar10_9l_s(temperature=10.0)
  bf16 = models.cifar10_9l_s(temperature=10.0, dtype=jnp.bfloat16)
  bf16_mat = models.cifar10_9l_s(temperature=10.0, dtype=jnp.bfloat16, impl="materialized")
  variables = perturbed_init(f32, shape)
  x = jax.random.uniform(jax.random.key(2), shape)
  run = jax.jit(lambda v: [_layer_outputs(m, v, x) for m in (f32, bf16, bf16_mat)])
  y32, y16, y16_mat = run(variables)
  for l, (a, b, c) in enumerate(zip(y16, y32, y16_mat)):
    assert a.dtype == jnp.float32       # Layer outputs, norms: float32.
    assert bool(jnp.all(jnp.isfinite(a))), l
    # bf16 keeps 8 bits (eps 2^-8 = 0.4% at the first layer); the error grows
    # about 1.45x per layer (10% at the ninth), as much as the materialised
    # impl's in bf16: the fused form adds no error of its own.
    assert _rel(a, b) < 0.15, l
    assert _rel(a, b) < 1.1 * _rel(c, b) + 1e-3, l


def test_bfloat16_gradients_finite_and_close_to_float32(perturbed_init):
  shape = (2, 12, 12, 3)
  f32, bf16 = models.tiny(), models.tiny(dtype=jnp.bfloat16)
  variables = perturbed_init(f32, shape)
  x = jax.random.uniform(jax.random.key(2), shape)
  loss = lambda m: lambda v: jnp.sum(jnp.sin(m.apply(v, x)))
  g32, g16 = jax.jit(lambda v: [jax.grad(loss(m))(v) for m in (f32, bf16)])(variables)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g16))
  assert _tree_rel(g16, g32) < 0.05


@pytest.mark.parametrize("contraction", FUSED)
def test_bfloat16_layer_runs_its_contraction_in_bfloat16(contraction):
  conv = models.CoDAConv(features=4, rank=3, kernel_size=3, padding=1, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32)
  variables = jax.eval_shape(conv.init, jax.random.key(0), x)
  hlo = jax.jit(conv.clone(contraction=contraction).apply).lower(variables, x).as_text()
  # The big contraction (and z's) takes bf16 operands.
  assert re.search(r"(dot_general|convolution)[^\n]*bf16", hlo), contraction
  assert jax.eval_shape(conv.apply, variables, x).dtype == jnp.float32


# ----------------------------------------------------------------------------
# The explanation transposes.
# ----------------------------------------------------------------------------


def test_fused_transpose_and_chunks_agree_with_the_reference():
  """dau_fused.transpose_materialized (whole batch, one image at a time, the
  backend's chunk) and dau_fused.transpose against dau.transpose, for K = 1
  and K = 3 rows."""
  spec = dau.Layer(features=5, rank=4, kernel=3, stride=2, padding=1, norm="squash")
  conv = models.CoDAConv(features=5, rank=4, kernel_size=3, stride=2, padding=1)
  x = jax.random.uniform(jax.random.key(0), (3, 9, 8, 4))
  variables = conv.init(jax.random.key(1), x)
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape),
                   variables["params"])

  @jax.jit
  def run(p, g):
    return (dau_fused.transpose_materialized(p, spec, x, g, chunk=x.shape[0]),
            dau_fused.transpose_materialized(p, spec, x, g, chunk=1),
            dau_fused.transpose_materialized(p, spec, x, g),
            dau_fused.transpose(p, spec, x, g), dau.transpose(p, spec, x, g))

  for k in (1, 3):
    ref, chunked, default, fused, explicit = run(
        p, jax.random.normal(jax.random.key(k), (3, 5, 4, 5, k)))
    assert _rel(ref, explicit) < 1e-6
    assert _rel(chunked, ref) < 1e-6
    assert _rel(default, ref) < 1e-6
    assert _rel(fused, ref) < 1e-6
