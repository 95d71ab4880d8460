"""Training and evaluation of CoDA-Nets, read top to bottom.

Phases: 1 workdir and logging, 2 mesh, 3 input, 4 model and optimizer,
5 sharding and initialisation, 6 update and eval steps, 7 restore, 8 loop.
The same code runs on one CPU, on 8 GPUs and on multi-host TPU pods: the batch
is sharded over a 1-D device mesh ('data'), parameters are replicated, and each
host feeds its own slice through `jax.make_array_from_process_local_data`.
"""

import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any, Optional

from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from codajax import checkpoint
from codajax import explain
from codajax import input_pipeline
from codajax import models


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


# ------------------------------------------------------------------ helpers


def learning_rate_fn(config, updates_per_epoch: float, total_updates: int):
  """The lr as a function of the optimizer's update count."""
  base = config.learning_rate
  epoch = lambda count: count / updates_per_epoch
  if config.lr_schedule == "constant":
    return lambda count: base * jnp.ones_like(count, jnp.float32)
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(base, max(1, total_updates))
  step_decay = lambda count: base / config.lr_decay_factor ** jnp.floor(
      epoch(count) / config.lr_decay_every_epochs)
  if config.lr_schedule == "step":
    return step_decay
  if config.lr_schedule == "warmup_step":
    def fn(count):
      e = epoch(count)
      warm = config.warmup_start_lr + (base - config.warmup_start_lr) * e / config.warmup_epochs
      return jnp.where(e < config.warmup_epochs, warm, step_decay(count))
    return fn
  raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: use constant, "
                   "cosine, step or warmup_step.")


def make_optimizer(config, lr_fn) -> optax.GradientTransformation:
  tx = (optax.adamw(lr_fn, weight_decay=config.weight_decay) if config.weight_decay
        else optax.adam(lr_fn))
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx


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
  """Sums over the (padded, masked) batch: top-1, top-5 hits, BCE, count."""
  logits = model.apply({"params": params}, batch["image"])
  labels, mask = batch["label"], batch["mask"]
  k = logits.shape[-1]
  rank = jnp.sum(logits > jnp.take_along_axis(logits, labels[:, None], -1), -1)
  bce = optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, k)).mean(-1)
  return {"top1": jnp.sum((rank < 1) * mask), "top5": jnp.sum((rank < 5) * mask),
          "loss": jnp.sum(bce * mask), "count": jnp.sum(mask)}


def evaluate(p_eval_step, params, config, info, batch_sharding) -> dict:
  totals = None
  for batch in input_pipeline.eval_batches(config, info):
    out = p_eval_step(params, input_pipeline.to_global(batch, batch_sharding))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.tree.map(float, jax.device_get(totals))
  n = max(totals["count"], 1.0)
  return {"eval/top1": totals["top1"] / n, "eval/top5": totals["top5"] / n,
          "eval/loss": totals["loss"] / n, "eval/count": totals["count"]}


class MetricsLog:
  """CLU writer (TensorBoard + log) plus <workdir>/metrics.jsonl, process 0 only."""

  def __init__(self, workdir: str):
    self.primary = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.primary, asynchronous=True)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, scalars: dict) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.primary:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def close(self):
    self.writer.flush()
    self.writer.close()


def resolve_config(config, info) -> ml_collections.ConfigDict:
  """Fills num_classes and a last layer of -1 from the data; checks sizes."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.num_classes is None:
    config.num_classes = info.num_classes
  out = list(config.model.out_channels)
  if out[-1] == -1:
    out[-1] = info.num_classes
    config.model.out_channels = tuple(out)
  if out[-1] != info.num_classes:
    raise ValueError(
        f"config.model.out_channels ends in {out[-1]} but the data has "
        f"{info.num_classes} classes; set the last entry to {info.num_classes} (or -1).")
  n_dev = jax.device_count()
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"config.grad_accum_steps={config.grad_accum_steps} (>= 1).")
  micro = config.batch_size // config.grad_accum_steps
  if micro % n_dev:
    raise ValueError(
        f"The per-step batch batch_size // grad_accum_steps = {micro} must be a "
        f"multiple of the {n_dev} devices; change config.batch_size.")
  if config.eval_batch_size % n_dev:
    config.eval_batch_size = n_dev * max(1, config.eval_batch_size // n_dev)
  if config.learning_rate <= 0 or not math.isfinite(config.learning_rate):
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}.")
  return config


# ------------------------------------------------------------------ main


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "train") -> dict:
  """Trains (mode="train"), evaluates ("eval") or explains ("explain").

  Returns the last eval metrics (for "explain": the paths of the figures).
  """
  # 1. Workdir and logging. -------------------------------------------------
  workdir = os.path.abspath(workdir)
  primary = jax.process_index() == 0

  # 2. Mesh: one 'data' axis over every device of every host. --------------
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  # 3. Input. --------------------------------------------------------------
  info = input_pipeline.get_info(config)
  config = resolve_config(config, info)
  per_epoch = input_pipeline.steps_per_epoch(config, info)
  num_steps = (config.num_steps if config.num_steps > 0
               else max(1, int(config.num_epochs * per_epoch)))
  if primary:  # Only once the data is known to be there: no empty workdirs.
    os.makedirs(workdir, exist_ok=True)
  if primary and mode == "train":
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  log = MetricsLog(workdir)

  # 4. Model and optimizer. -------------------------------------------------
  model = models.from_config(config.model)
  accum = config.grad_accum_steps
  lr_fn = learning_rate_fn(config, per_epoch / accum, num_steps // accum)
  tx = make_optimizer(config, lr_fn)

  # 5. Sharding and initialisation: parameters replicated on every device. --
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(rng):
    params = model.init(rng, dummy)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  state = init(init_rng)
  if primary and mode == "train":
    parameter_overview.log_parameter_overview(state.params)

  # 6. Update and eval steps, jitted over the mesh; the state is donated. ---
  p_train_step = jax.jit(
      functools.partial(train_step, model=model, tx=tx, config=config,
                        rng=train_rng, lr_fn=lr_fn),
      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)
  p_eval_step = jax.jit(functools.partial(eval_step, model=model),
                        in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  # 7. Restore the latest checkpoint (or an imported one), if any. ---------
  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  restored = checkpoint.restore(mngr, checkpoint.abstract(state.params),
                                checkpoint.abstract(state.opt_state))
  start = 0
  if restored is not None:
    step, params, opt_state, meta = restored
    if opt_state is None:  # Imported weights: fine-tune from step 0.
      state = state.replace(params=params)
      logging.info("Starting from imported parameters (%s).", meta.get("source"))
    else:
      start = step
      state = TrainState(jnp.asarray(step, jnp.int32), params, opt_state)
      state = jax.device_put(state, replicated)
      logging.info("Resumed from %s/%d.", mngr.directory, step)
  elif mode != "train":
    raise checkpoint.CheckpointError(
        f"--mode={mode} needs a checkpoint in {checkpoint.directory(workdir)}; train "
        "first, or import weights with python -m codajax.convert.")

  if mode == "eval":
    metrics = evaluate(p_eval_step, state.params, config, info, batch_sharding)
    log.write(start, metrics)
    log.close()
    mngr.close()
    return metrics
  if mode == "explain":
    paths = write_explanations(model, state.params, config, info, workdir)
    log.close()
    mngr.close()
    return {"figures": paths}
  if mode != "train":
    raise ValueError(f"mode must be train, eval or explain, got {mode!r}.")

  # 8. The loop. ------------------------------------------------------------
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else per_epoch
  ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                else per_epoch)
  meta = {"model": config.model.to_dict(), "config": config.to_dict()}
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=log.writer)
  preempted = []
  previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True)) \
      if jax.process_count() == 1 else None
  batches = input_pipeline.train_batches(config, info, start)
  metrics, eval_metrics, pending = [], {}, None
  t_log = time.time()
  try:
    for step in range(start + 1, num_steps + 1):
      batch = input_pipeline.to_global(next(batches), batch_sharding)
      state, m = p_train_step(state, batch)
      if pending is not None:
        _check_finite(*pending)
      pending = (step, m["train/loss"])
      metrics.append(m)
      report(step, time.time())
      if step % config.log_every_steps == 0 or step == num_steps:
        means = jax.tree.map(lambda *x: float(np.mean(x)), *jax.device_get(metrics))
        means["train/steps_per_sec"] = len(metrics) / max(time.time() - t_log, 1e-9)
        log.write(step, means)
        metrics, t_log = [], time.time()
      is_eval = step % eval_every == 0 or step == num_steps
      if is_eval:
        eval_metrics = evaluate(p_eval_step, state.params, config, info, batch_sharding)
        log.write(step, eval_metrics)
      stop = bool(preempted) or mngr.reached_preemption(step)
      if step % ckpt_every == 0 or step == num_steps or stop:
        _check_finite(step, m["train/loss"])  # Never checkpoint a diverged state.
        checkpoint.save(mngr, step, state.params, state.opt_state, meta,
                        eval_metrics if is_eval else None)
      if stop:
        logging.warning("Preempted at step %d: checkpoint saved; rerun the same "
                        "command to resume.", step)
        break
    if pending is not None:
      _check_finite(*pending)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  if not eval_metrics and not preempted:  # Already finished: report, don't retrain.
    eval_metrics = evaluate(p_eval_step, state.params, config, info, batch_sharding)
  if config.explain_at_end and not preempted:
    eval_metrics["figures"] = write_explanations(model, state.params, config, info, workdir)
  log.close()
  return eval_metrics


def _check_finite(step, loss):
  loss = float(loss)
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Non-finite training loss ({loss}) at step {step}. Lower "
        "config.learning_rate, or try config.model.dtype='float32'.")


def write_explanations(model, params, config, info, workdir) -> list:
  """Contribution maps of the first num_explain test images, true and predicted class."""
  from codajax import plotting  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return []
  out_dir = os.path.join(workdir, "explanations")
  os.makedirs(out_dir, exist_ok=True)
  n = config.num_explain
  images, labels = [], []
  for batch in input_pipeline.eval_batches(config, info):
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
    if sum(map(len, images)) >= n:
      break
  images = np.concatenate(images)[:n]
  labels = np.concatenate(labels)[:n]
  params = jax.device_get(params)
  variables = {"params": params}
  logits = jax.jit(model.apply)(variables, images)
  preds = np.asarray(jnp.argmax(logits, -1))
  classes = np.stack([labels, preds], axis=1)
  e = jax.jit(explain.explain, static_argnums=0)(model, variables, images, classes)
  maps = np.asarray(e.contributions.sum(-1))  # (n, 2, H, W)
  names = info.class_names or tuple(map(str, range(info.num_classes)))
  titles = [f"{which}: {names[c]}" for l, p in zip(labels, preds)
            for which, c in (("true", l), ("pred", p))]
  paths = [plotting.save(plotting.plot_contribution_maps(
      maps.reshape(-1, *maps.shape[2:]), np.repeat(images, 2, axis=0), titles, ncols=2),
                         os.path.join(out_dir, "contribution_maps.png"))]
  paths.append(plotting.save(plotting.plot_linear_maps(
      np.asarray(e.linear_map[:, 1]), np.asarray(e.layer_input),
      [f"pred: {names[p]}" for p in preds]), os.path.join(out_dir, "linear_maps.png")))
  return paths
