"""What every mode of codajax.train shares: the `Run` that `train.setup`
builds, its `MetricsLog`, and the phases of `setup` that are more than a few
lines: `check_workdir` (1), `compile_steps` (4-6: the optimizer, the
replicated initial state, the jitted update and eval steps) and `restore` (7).

The numbers are those of `train.setup`'s phases, which reads top to bottom.
"""

import dataclasses
import functools
import json
import logging
import os
from typing import Callable, Optional

from clu import metric_writers
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import ml_collections
import orbax.checkpoint as ocp

from codajax import checkpoint
from codajax import input_pipeline
from codajax import models
from codajax import steps
from codajax import workdir as workdir_lib


class MetricsLog:
  """CLU writer (TensorBoard + log) plus <workdir>/metrics.jsonl, process 0 only.

  Both are opened at the first write, so a run that fails before it leaves no
  file. `resumed_at`: the step a training run resumed from; lines after it,
  logged by a run killed before its next checkpoint, are dropped then, so no
  step is logged twice. `enabled=False` (a read-only workdir): logs only.
  """

  def __init__(self, workdir: str, *, resumed_at: Optional[int] = None, enabled: bool = True):
    self.primary = jax.process_index() == 0 and enabled
    self.workdir, self.resumed_at, self._writer = workdir, resumed_at, None
    self.path = os.path.join(workdir, "metrics.jsonl")

  @property
  def writer(self) -> metric_writers.MetricWriter:
    if self._writer is None:
      if self.primary and self.resumed_at is not None and os.path.exists(self.path):
        _drop_lines_after(self.path, self.resumed_at)
      self._writer = metric_writers.create_default_writer(
          self.workdir, just_logging=not self.primary, asynchronous=True)
    return self._writer

  def write_scalars(self, step: int, scalars: dict) -> None:
    """TensorBoard and the log only (CLU's writer interface, for ReportProgress)."""
    self.writer.write_scalars(step, scalars)

  def write(self, step: int, scalars: dict) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self.writer.write_scalars(step, scalars)
    if self.primary:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def close(self):
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def _drop_lines_after(path: str, step: int) -> None:
  """Keeps the complete lines of metrics.jsonl up to `step` (atomically)."""
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        pass  # A line cut short by the kill.
  with workdir_lib.atomic_path(path) as tmp, open(tmp, "w") as f:
    f.writelines(keep)


@dataclasses.dataclass(kw_only=True)
class Run:
  """What the modes share, built once by `train.setup`."""
  config: ml_collections.ConfigDict  # Resolved against the data.
  workdir: str
  info: input_pipeline.DatasetInfo
  model: models.CoDANet
  steps_per_epoch: int
  num_steps: int
  batch_sharding: NamedSharding
  state: steps.TrainState  # Initialised, then restored if there is a checkpoint.
  start: int  # The restored step (0: fresh or imported).
  restored: bool  # A checkpoint (trained or imported) was restored.
  train_step_fn: Callable
  eval_step_fn: Callable
  mngr: ocp.CheckpointManager
  log: MetricsLog
  wd: workdir_lib.Workdir
  meta: dict = dataclasses.field(default_factory=dict)  # The restored checkpoint's meta item.

  def close(self):
    """Waits for pending checkpoints, closes the manager and the writers, and
    releases the workdir (removing what this run created and left empty)."""
    try:
      self.mngr.wait_until_finished()
      self.mngr.close()
    finally:
      try:
        self.log.close()
      finally:
        self.wd.close(tidy=True)


def check_workdir(wd: workdir_lib.Workdir, read_only_ok: bool) -> bool:
  """Phase 1: whether the run can write `wd`; if it cannot, one line now
  (not orbax's retries after the work), or a warning if `read_only_ok`."""
  writable = wd.writable() is None
  if jax.process_index() == 0 and not writable:
    if not read_only_ok:
      wd.check_writable()
    logging.warning("%s is not writable: the eval metrics are printed, not written.",
                    wd.path)
  return writable


def compile_steps(config, model, info, per_epoch, num_steps, batch_sharding, replicated):
  """Phases 4-6: the optimizer, the initial state (replicated on every device)
  and the update and eval steps, jitted over the mesh (the state is donated)."""
  # 4. Optimizer. ------------------------------------------------------------
  accum = config.grad_accum_steps
  lr_fn = steps.learning_rate_fn(config, per_epoch / accum, num_steps // accum)
  tx = steps.make_optimizer(config, lr_fn)

  # 5. Sharding and initialisation: parameters replicated on every device. --
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  dummy = jnp.zeros((1, *info.image_shape), jnp.float32)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(rng):
    params = model.init(rng, dummy)["params"]
    return steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  state = init(init_rng)

  # 6. Update and eval steps, jitted over the mesh; the state is donated. ---
  train_step_fn = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, config=config,
                        rng=train_rng, lr_fn=lr_fn),
      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)
  eval_step_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                         in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  return state, train_step_fn, eval_step_fn


def restore(wd: workdir_lib.Workdir, config, state, replicated, training: bool):
  """Phase 7: (the checkpoint manager, the state, the restored step, the
  checkpoint's meta item or None if none was restored). When `training`,
  unreadable checkpoints newer than the restored one are set aside in
  checkpoints/corrupt/, so that training can save those steps again."""
  if wd.locked:  # Saves that a killed run left unfinished, before orbax reads.
    checkpoint.remove_unfinished(wd.path)
  mngr = checkpoint.manager(wd.path, keep=config.keep_checkpoints)
  try:
    restored = checkpoint.restore(mngr, checkpoint.abstract(state.params),
                                  checkpoint.abstract(state.opt_state), set_aside=training)
  except BaseException:
    mngr.close()
    raise
  if restored is None:
    return mngr, state, 0, None
  step, params, opt_state, meta = restored
  if opt_state is None:  # Imported weights: fine-tune from step 0.
    logging.info("Starting from imported parameters (%s).", meta.get("source"))
    return mngr, state.replace(params=params), 0, meta
  state = steps.TrainState(jnp.asarray(step, jnp.int32), params, opt_state)
  logging.info("Resumed from %s/%d.", mngr.directory, step)
  return mngr, jax.device_put(state, replicated), step, meta
