"""Tests of the update step and the lr schedules (codajax.steps).

The equivalence tests (sharded vs one device, accumulated vs one big batch)
compare Adam moments and parameters, so each can fail on a wrong reduction or
optimizer count; the schedules are checked value by value against the papers'.
"""

import functools

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from codajax import architectures
from codajax import batching
from codajax import config_lib
from codajax import models
from codajax import steps
from configs import cifar10 as cifar10_config
from configs import digits as digits_config
from configs import imagenet100 as imagenet100_config


def digits(**overrides):
  """digits:tiny with the given overrides."""
  c = digits_config.get_config("tiny")
  c.update(overrides)
  return c


# ------------------------------------------------------------ equivalences


def _tiny_setup(config):
  """A 3-layer net on 8x8 images (fast to compile) and the trainer's step."""
  config.model = config_lib.model_config(**architectures.tiny(10), temperature=10.0)
  model = models.from_config(config.model)
  lr_fn = steps.learning_rate_fn(config, 10.0, 100)
  tx = steps.make_optimizer(config, lr_fn)
  params = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))["params"]
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  step = functools.partial(steps.train_step, model=model, tx=tx, config=config,
                           rng=jax.random.key(2), lr_fn=lr_fn)
  return state, step


def _batches(n, size, seed=0):
  rng = np.random.RandomState(seed)
  return [{"image": rng.uniform(size=(size, 8, 8, 1)).astype(np.float32),
           "label": rng.randint(0, 10, size).astype(np.int32)} for _ in range(n)]


def assert_same_training(got, want, lr):
  """Same Adam moments (to float precision) and the same parameters.

  The moments are running means of the gradients and their squares: they
  differ if any gradient does. Adam then divides each coordinate by its RMS,
  which turns rounding noise in a near-zero gradient coordinate into a
  parameter change of up to a fraction of lr, so parameters get lr / 100.
  """
  for moment, atol in (("mu", 1e-8), ("nu", 1e-12)):
    chex.assert_trees_all_close(optax.tree_utils.tree_get(got.opt_state, moment),
                                optax.tree_utils.tree_get(want.opt_state, moment),
                                rtol=1e-4, atol=atol)
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=lr / 100)


@pytest.mark.parametrize("matrix_reg_lambda", [0.0, 0.5])
def test_sharded_training_matches_one_device(matrix_reg_lambda):
  """8 devices (batch P('data'), params replicated) == 1 device, same batches."""
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  lr = 1e-2
  config = digits(learning_rate=lr, lr_schedule="constant",
                  matrix_reg_lambda=matrix_reg_lambda)
  batches = _batches(3, 16)
  finals = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = Mesh(np.array(devices), ("data",))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    state, step = _tiny_setup(config)
    init_params = jax.device_get(state.params)
    state = jax.device_put(state, replicated)
    p_step = jax.jit(step, in_shardings=(replicated, data),
                     out_shardings=(replicated, replicated), donate_argnums=0)
    losses = []
    for batch in batches:
      batch = batching.to_mesh(batch, data)
      assert batch["image"].sharding.num_devices == len(devices)
      state, metrics = p_step(state, batch)
      losses.append(float(metrics["train/loss"]))
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(devices)
    finals.append((jax.device_get(state), losses))
  (sharded, losses8), (single, losses1) = finals
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert_same_training(sharded, single, lr)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(single.params), jax.tree.leaves(init_params)))
  assert moved > 1e-3  # The comparison is not between untouched parameters.


def test_gradient_accumulation_2x8_equals_one_step_of_16():
  """Two updates: 2 x 8 with grad_accum_steps=2 == 1 x 16 (make_optimizer's Adam)."""
  lr = 1e-2
  batches = _batches(2, 16, seed=3)
  results = {}
  for accum in (1, 2):
    config = digits(learning_rate=lr, lr_schedule="constant", grad_accum_steps=accum)
    state, step = _tiny_setup(config)
    step = jax.jit(step)
    for batch in batches:
      for i in range(accum):
        micro = jax.tree.map(lambda x: x[i * 16 // accum:(i + 1) * 16 // accum], batch)
        before = state.params
        state, metrics = step(state, micro)
        if i < accum - 1:  # MultiSteps only accumulates until the last micro-step.
          chex.assert_trees_all_equal(state.params, before)
    np.testing.assert_allclose(float(metrics["train/lr"]), lr)
    results[accum] = jax.device_get(state)
  # Two Adam updates in both runs.
  assert int(results[1].opt_state[0].count) == 2
  assert int(results[2].opt_state.inner_opt_state[0].count) == 2
  assert int(results[2].step) == 4 and int(results[1].step) == 2
  assert_same_training(results[2], results[1], lr)


# --------------------------------------------------------------- schedules


def test_lr_schedules_follow_the_paper():
  cifar = cifar10_config.get_config("9L-S-CoDA-SQ-1000")
  per_epoch = 7.0  # Any size: the schedule is in epochs.
  lr = steps.learning_rate_fn(cifar, per_epoch, 200 * 7)
  for epoch in range(0, 200, 10):
    np.testing.assert_allclose(float(lr(jnp.asarray(epoch * per_epoch))),
                               2.5e-4 / 1.5 ** (epoch // 30), rtol=1e-6)


def test_imagenet100_warmup_is_the_authors_schedule():
  """Constant within each epoch: linspace(2.5e-4, 1e-3, 15)[epoch] for epochs
  0-14 (1e-3 at epoch 14), then 1e-3 / 2 ** floor(epoch / 20)."""
  imagenet = imagenet100_config.get_config()
  per_epoch = 7
  lr = steps.learning_rate_fn(imagenet, float(per_epoch), 60 * per_epoch)
  warmup = np.linspace(2.5e-4, 1e-3, 15)
  for epoch in range(60):
    want = warmup[epoch] if epoch < 15 else 1e-3 / 2 ** (epoch // 20)
    for count in range(epoch * per_epoch, (epoch + 1) * per_epoch):
      np.testing.assert_allclose(float(lr(jnp.asarray(count))), want, rtol=1e-6,
                                 err_msg=f"epoch {epoch}, update {count}")


# ------------------------------------------------------------------ eval step


class _FixedLogits:
  """A stand-in model whose logits are the batch's "logits"."""

  def apply(self, variables, images):
    return images


@pytest.mark.parametrize("logits, top1, top5", [
    (np.zeros((2, 10)), 0, 0),                    # All equal: wrong, as argmax counts it.
    (np.eye(10)[[3, 4]], 1, 1),                   # Unique max at the label; tied with 8 below 1.
    (np.eye(10)[[3, 4]] - np.arange(10) / 100, 1, 2),  # Unique max; rank 1 of 10.
    (np.where(np.arange(10) < 5, 1.0, 0.0)[None].repeat(2, 0), 0, 2),  # 5-way tie: top-5.
    (np.where(np.arange(10) < 6, 1.0, 0.0)[None].repeat(2, 0), 0, 0),  # 6-way: not.
    (np.full((2, 10), np.nan), 0, 0),             # NaN: wrong, and counted as non-finite.
])
def test_eval_step_counts_ties_and_nans_as_wrong(logits, top1, top5):
  batch = {"image": jnp.asarray(logits, jnp.float32), "label": jnp.array([3, 3]),
           "mask": jnp.array([1.0, 1.0])}
  out = jax.jit(functools.partial(steps.eval_step, model=_FixedLogits()))({}, batch)
  assert (float(out["top1"]), float(out["top5"])) == (top1, top5)
  assert float(out["count"]) == 2
  assert float(out["nonfinite"]) == (2 if np.isnan(logits).any() else 0)
