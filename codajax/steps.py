"""The update and eval steps of codajax training, as pure functions.

What one step of training computes, apart from the loop that runs it
(`codajax.train`): the lr schedule, the optimizer, the loss (BCE-with-logits on
one-hot targets, as the paper, plus the optional lambda * mean|M| on the
layer-0 linear map), the update, and the eval step's sums. Kept free of the
input pipeline (TensorFlow), checkpoints and writers, so that the benchmarks
time exactly this step without them.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from codajax import explain


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_fn(config, updates_per_epoch: float, total_updates: int):
  """The lr as a function of the optimizer's update count.

  "step": lr / lr_decay_factor ** floor(epoch / lr_decay_every_epochs), with
  the fractional epoch count / updates_per_epoch. "warmup_step" holds the lr
  constant within each epoch e = floor(count / updates_per_epoch), as the
  authors' ImageNet schedule does: linspace(warmup_start_lr, lr,
  warmup_epochs)[e] for the first warmup_epochs epochs (the last of them
  reaches lr), then the "step" decay.
  """
  base = config.learning_rate
  epoch = lambda count: count / updates_per_epoch
  step_decay = lambda count: base / config.lr_decay_factor ** jnp.floor(
      epoch(count) / config.lr_decay_every_epochs)

  def warmup_step():
    warmup = int(config.warmup_epochs)  # Whole epochs.
    ramp = np.linspace(config.warmup_start_lr, base, max(warmup, 1)).astype(np.float32)

    def fn(count):
      e = jnp.floor(epoch(count)).astype(jnp.int32)
      warm = jnp.asarray(ramp)[jnp.clip(e, 0, len(ramp) - 1)]
      return jnp.where(e < warmup, warm, step_decay(count))
    return fn

  # One entry per config_lib.LR_SCHEDULES (config_lib.validate admits no other).
  schedules = {
      "constant": lambda: lambda count: base * jnp.ones_like(count, jnp.float32),
      "cosine": lambda: optax.cosine_decay_schedule(base, max(1, total_updates)),
      "step": lambda: step_decay,
      "warmup_step": warmup_step}
  return schedules[config.lr_schedule]()


def make_optimizer(config, lr_fn) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay); the first config.freeze_layers layers get
  zero updates (so no decay either); optax.MultiSteps when accumulating."""
  tx = (optax.adamw(lr_fn, weight_decay=config.weight_decay) if config.weight_decay
        else optax.adam(lr_fn))
  frozen = config.get("freeze_layers", 0)
  if frozen:  # Only then: the optimizer state of every other run stays as it was.
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               functools.partial(layer_labels, frozen=frozen))
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


def layer_labels(params, frozen: int):
  """{"layer_<i>": {name: "frozen" if i < frozen else "train"}}: the labels of
  optax.multi_transform for config.freeze_layers."""
  return {layer: jax.tree.map(lambda _, f=int(layer.split("_")[-1]) < frozen:
                              "frozen" if f else "train", sub)
          for layer, sub in params.items()}


def loss_fn(params, model, images, labels, rng, config):
  """BCE-with-logits on one-hot targets, plus lambda * mean|M| if requested."""
  variables = {"params": params}
  k = model.num_classes
  if config.matrix_reg_lambda > 0:
    # M: the layer-0 linear map for the true class and n - 1 random others,
    # differentiated through the explicit composition.
    n_other = config.matrix_reg_classes - 1
    others = (labels[:, None] + jax.random.randint(
        rng, (labels.shape[0], n_other), 1, k)) % k
    classes = jnp.concatenate([labels[:, None], others], axis=1)
    e = explain.explain(model, variables, images, classes)
    logits, reg = e.logits, jnp.mean(jnp.abs(e.linear_map))
  else:
    logits, reg = model.apply(variables, images), 0.0
  bce = optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, k)).mean()
  return bce + config.matrix_reg_lambda * reg, (logits, bce)


def train_step(state: TrainState, batch, *, model, tx, config, rng, lr_fn):
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, bce)), grads = grad_fn(state.params, model, batch["image"],
                                         batch["label"], step_rng, config)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  count = (opt_state.gradient_step if config.grad_accum_steps > 1
           else state.step)
  metrics = {"train/loss": loss, "train/bce": bce,
             "train/accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "train/lr": lr_fn(count)}
  return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch, *, model):
  """Sums over the (padded, masked) batch: top-1, top-5 hits, BCE, count.

  The true class's rank counts the other classes whose logit is not below it,
  so a tie counts as wrong (as argmax accuracy counts it: all-equal logits score
  0), and so does a NaN. "nonfinite" counts the examples with a NaN or inf
  logit; `codajax.train.accuracy` refuses to report metrics when it is not 0.
  """
  logits = model.apply({"params": params}, batch["image"])
  labels, mask = batch["label"], batch["mask"]
  k = logits.shape[-1]
  true = jnp.take_along_axis(logits, labels[:, None], -1)
  others = jax.nn.one_hot(labels, k, dtype=jnp.bool_) == 0
  rank = jnp.sum(jnp.logical_not(logits < true) & others, -1)
  bce = optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, k)).mean(-1)
  nonfinite = jnp.logical_not(jnp.all(jnp.isfinite(logits), -1))
  return {"top1": jnp.sum((rank < 1) * mask), "top5": jnp.sum((rank < 5) * mask),
          "loss": jnp.sum(bce * mask), "count": jnp.sum(mask),
          "nonfinite": jnp.sum(nonfinite * mask)}
