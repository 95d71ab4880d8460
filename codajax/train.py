"""Training and evaluation of CoDA-Nets, read top to bottom.

`train_and_evaluate(config, workdir, mode)` checks the mode, then `setup`
builds what every mode shares, in numbered phases: 1 config and workdir checks,
2 mesh, 3 input (then the workdir is locked, `codajax.workdir`), 4 model and
optimizer, 5 sharding and initialisation, 6 update and eval steps (the steps
themselves are `codajax.steps`), 7 restore. Then one function per mode runs,
and closes the writers, the checkpoint manager and the workdir however it
ends: `train_mode` (8, the loop), `eval_mode`, `explain_mode`, `evaluate_mode`.
Each returns a `Result`. SIGTERM or Ctrl-C stops any mode at its next safe
point (`_stop_requests`): training after a save, evaluate after the result in
flight is written, eval and explain before they write anything.

The same code runs on one CPU, on 8 GPUs and on multi-host TPU pods: the batch
is sharded over a 1-D device mesh ('data'), parameters are replicated, and each
host feeds its own slice through `jax.make_array_from_process_local_data`.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Callable, Optional, Sequence

from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from codajax import checkpoint
from codajax import config_lib
from codajax import input_pipeline
from codajax import evaluation
from codajax import models
from codajax import plotting
from codajax import steps
from codajax import workdir as workdir_lib


class MetricsLog:
  """CLU writer (TensorBoard + log) plus <workdir>/metrics.jsonl, process 0 only.

  Both are opened at the first write, so a run that fails before it leaves no
  file. `resumed_at`: the step a training run resumed from; lines after it,
  logged by a run killed before its next checkpoint, are dropped then, so no
  step is logged twice. `enabled=False` (eval in a read-only workdir): logs only.
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
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ setup

# What every mode returns: the eval metrics it computed ("eval/top1", "eval/top5",
# "eval/loss", "eval/count"; none from "explain" or a run preempted before its
# eval), "step": the checkpoint's step (from "eval" only), "figures": the
# paths of the figures it wrote (a list, maybe empty), and, only from a run
# stopped early by SIGTERM, Ctrl-C or a preemption notice, "preempted":
# {"signal": its name, "kept": what the run kept, for the one line the CLI
# prints (e.g. "checkpoint of step 5 saved in W/checkpoints"), and, from
# training, "step": the step it saved when it stopped (None: none)}.
Result = dict


@dataclasses.dataclass
class Run:
  """What the modes share, built once by `setup`."""
  config: ml_collections.ConfigDict  # Resolved against the data.
  workdir: str
  info: input_pipeline.DatasetInfo
  model: models.CoDANet
  steps_per_epoch: int
  num_steps: int
  batch_sharding: NamedSharding
  state: steps.TrainState                  # Initialised, then restored if there is a checkpoint.
  start: int                         # The restored step (0: fresh or imported).
  restored: bool                     # A checkpoint (trained or imported) was restored.
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


def setup(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> Run:
  """Phases 1-7, shared by every mode.

  In train mode, unreadable checkpoints newer than the restored one are moved
  to checkpoints/corrupt/, so that training can save those steps again. Eval
  mode also runs in a read-only workdir (its metrics are then only logged).
  """
  # 1. Config, workdir and logging (the writers open at their first write). -
  config_lib.validate(config)  # Every field at once, before any work.
  workdir = os.path.abspath(workdir)
  wd = workdir_lib.Workdir(workdir, checkpoint.directory(workdir))
  primary = jax.process_index() == 0
  writable = wd.writable() is None
  if primary and mode != "eval":
    wd.check_writable()  # One line now, not orbax's retries after the work.
  if primary and not writable and mode == "eval":
    logging.warning("%s is not writable: the eval metrics are printed, not written.",
                    workdir)

  # 2. Mesh: one 'data' axis over every device of every host. --------------
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  # 3. Input. --------------------------------------------------------------
  info = input_pipeline.get_info(config)
  config = config_lib.resolve(config, info.num_classes, jax.device_count(),
                              info.num_train if mode == "train" else None)
  per_epoch = input_pipeline.steps_per_epoch(config, info)
  num_steps = (config.num_steps if config.num_steps > 0
               else max(1, int(config.num_epochs * per_epoch)))
  if primary and writable:  # Only once the data is known to be there.
    wd.open()  # Creates it if needed; one run at a time.
  try:  # From here on, an error releases the workdir and leaves it as it was.
    # 4. Model and optimizer. -------------------------------------------------
    model = models.from_config(config.model)
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

    # 7. Restore the latest checkpoint (or an imported one), if any. ---------
    if wd.locked:  # Saves that a killed run left unfinished, before orbax reads.
      checkpoint.remove_unfinished(workdir)
    mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    try:
      restored = checkpoint.restore(mngr, checkpoint.abstract(state.params),
                                    checkpoint.abstract(state.opt_state),
                                    set_aside=mode == "train")
    except BaseException:
      mngr.close()
      raise
    start = 0
    if restored is not None:
      step, params, opt_state, meta = restored
      if opt_state is None:  # Imported weights: fine-tune from step 0.
        state = state.replace(params=params)
        logging.info("Starting from imported parameters (%s).", meta.get("source"))
      else:
        start = step
        state = steps.TrainState(jnp.asarray(step, jnp.int32), params, opt_state)
        state = jax.device_put(state, replicated)
        logging.info("Resumed from %s/%d.", mngr.directory, step)
    log = MetricsLog(workdir, resumed_at=start if mode == "train" else None, enabled=writable)
    return Run(config, workdir, info, model, per_epoch, num_steps, batch_sharding, state,
               start, restored is not None, train_step_fn, eval_step_fn, mngr, log, wd,
               restored[3] if restored is not None else {})
  except BaseException:
    wd.close(tidy=True)
    raise


def evaluate(run: Run, params, step: int, stops: Sequence[str] = ()) -> Optional[dict]:
  """Top-1, top-5 and BCE over the whole test split (each example once).

  Raises FloatingPointError, naming the step and the checkpoint directory, if
  any test example gets a NaN or inf logit: no metrics are reported then.
  Returns None if `stops` (see `_stop_requests`) fills up before the end.
  """
  totals = None
  for batch in input_pipeline.eval_batches(run.config, run.info):
    if stops:
      return None
    out = run.eval_step_fn(params, input_pipeline.to_global(batch, run.batch_sharding))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.tree.map(float, jax.device_get(totals))
  if totals["nonfinite"]:
    raise FloatingPointError(
        f"Non-finite logits (NaN or inf) for {int(totals['nonfinite'])} of "
        f"{int(totals['count'])} test examples at step {step} (checkpoints in "
        f"{run.mngr.directory}); no eval metrics are reported. The parameters of "
        "that step are not usable: check the checkpoint (or the converted weights), "
        "or lower config.learning_rate and retrain.")
  n = max(totals["count"], 1.0)
  return {"eval/top1": totals["top1"] / n, "eval/top5": totals["top5"] / n,
          "eval/loss": totals["loss"] / n, "eval/count": totals["count"]}


def write_figures(run: Run, params) -> list:
  """Explanation figures of the first num_explain test images (process 0 only)."""
  if jax.process_index() != 0:
    return []
  images, labels = input_pipeline.first_test_examples(run.config, run.info,
                                                      run.config.num_explain)
  return plotting.write_explanations(run.model, jax.device_get(params), images, labels,
                                     run.info.class_names,
                                     os.path.join(run.workdir, "explanations"))


# ------------------------------------------------------------------ modes


def train_mode(run: Run, stops: Sequence[str] = (),
               on_step: Optional[Callable[[int, int], None]] = None) -> Result:
  """Trains from the restored step to num_steps, evaluating and checkpointing.

  `stops`: filled with a signal's name when one asks the run to stop (see
  `_stop_requests`); the run then saves the step it is at and returns once
  that checkpoint is committed. Asked before its first step, or when already
  finished, it returns before the next piece of work (nothing new is saved).
  `on_step(step, num_steps)`: called after every step and once at the
  restored step, e.g. by a notebook's progress bar.
  """
  config, num_steps, per_epoch, batches = run.config, run.num_steps, run.steps_per_epoch, None
  try:
    if jax.process_index() == 0:
      parameter_overview.log_parameter_overview(run.state.params)
    if stops:  # During the setup: before the first step is compiled.
      return _preempted(stops, _kept_checkpoints(run), step=None)

    # 8. The loop. ---------------------------------------------------------
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else per_epoch
    ckpt_every = (config.checkpoint_every_steps if config.checkpoint_every_steps > 0
                  else per_epoch)
    meta = {"model": config.model.to_dict(), "config": config.to_dict()}
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=run.log)
    batches = input_pipeline.train_batches(config, run.info, run.start)
    state, metrics, eval_metrics, pending = run.state, [], {}, None
    t_log = time.time()
    if on_step is not None:
      on_step(run.start, num_steps)
    for step in range(run.start + 1, num_steps + 1):
      batch = input_pipeline.to_global(next(batches), run.batch_sharding)
      state, m = run.train_step_fn(state, batch)
      if step == run.start + 1:
        # Once the first step has run (fetching its loss raises what it met,
        # e.g. RESOURCE_EXHAUSTED): a run that fails before leaves nothing.
        _check_finite(step, m["train/loss"])
        if run.log.primary:
          with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
      if pending is not None:
        _check_finite(*pending)
      pending = (step, m["train/loss"])
      metrics.append(m)
      report(step, time.time())
      if on_step is not None:
        on_step(step, num_steps)
      if step % config.log_every_steps == 0 or step == num_steps:
        means = jax.tree.map(lambda *x: float(np.mean(x)), *jax.device_get(metrics))
        means["train/steps_per_sec"] = len(metrics) / max(time.time() - t_log, 1e-9)
        run.log.write(step, means)
        metrics, t_log = [], time.time()
      is_eval = step % eval_every == 0 or step == num_steps
      stop = bool(stops) or run.mngr.reached_preemption(step)
      tracked = None
      if step % ckpt_every == 0 or step == num_steps or stop:
        # Save first, then evaluate: an error in the evaluation (a bad test
        # image) must not lose the steps since the last checkpoint. The best-N
        # policy reads the metrics dict only at later saves, so it is filled
        # in place once the evaluation is done (see checkpoint.save). The save
        # is committed before evaluating, so even a crash in it loses nothing.
        tracked = _save(run, step, state, m, meta, {} if is_eval else None)
        if is_eval:
          run.mngr.wait_until_finished()
      if is_eval:
        eval_metrics = evaluate(run, state.params, step)
        run.log.write(step, eval_metrics)
        if tracked is not None:
          tracked.update(eval_metrics)
        elif stops:  # A signal during the evaluation: save this step too.
          stop = True
          _save(run, step, state, m, meta, dict(eval_metrics))
      if stop:
        checkpoint.wait_committed(run.mngr, step)  # "saved" only once it is.
        kept = f"checkpoint of step {step} saved in {run.mngr.directory}"
        logging.warning("Preempted at step %d: %s.", step, kept)
        return {**eval_metrics, **_preempted(stops, kept, step=step)}
    if pending is not None:
      _check_finite(*pending)
    if not eval_metrics:  # Already finished: report, don't retrain.
      eval_metrics = evaluate(run, state.params, run.start, stops)
    if stops or eval_metrics is None:  # Before the re-evaluation's end, or the figures.
      return {**(eval_metrics or {}), **_preempted(stops, _kept_checkpoints(run), step=None)}
    figures = write_figures(run, state.params) if config.explain_at_end else []
    return {**eval_metrics, "figures": figures}
  finally:
    if batches is not None:
      batches.close()  # Stops the tf.data pipeline before the process exits.
    run.close()


def _require_checkpoint(run: Run, mode: str) -> None:
  if not run.restored:
    raise checkpoint.CheckpointError(
        f"--mode={mode} needs a checkpoint in {checkpoint.directory(run.workdir)}; train "
        "first, or import weights with python -m codajax.convert.")


def _preempted(stops: Sequence[str], kept: str, **extra) -> Result:
  """A Result for a run that a stop request ended early, keeping `kept`."""
  name = stops[0] if stops else "preemption notice"
  return {"figures": [], "preempted": {"signal": name, "kept": kept, **extra}}


def _kept_checkpoints(run: Run) -> str:
  if run.restored:
    return f"the checkpoint of step {run.start} is kept in {run.mngr.directory}"
  return "nothing was written"


def eval_mode(run: Run, stops: Sequence[str] = ()) -> Result:
  """Evaluates the restored (trained or imported) parameters; logs at their step.

  `stops` (see `_stop_requests`): checked between eval batches; nothing is
  written then."""
  try:
    _require_checkpoint(run, "eval")
    metrics = evaluate(run, run.state.params, run.start, stops)
    if metrics is None:
      return _preempted(stops, "no metrics were written")
    run.log.write(run.start, metrics)
    logging.info("Evaluated the checkpoint of step %d in %s.", run.start, run.mngr.directory)
    return {"step": run.start, **metrics, "figures": []}
  finally:
    run.close()


def explain_mode(run: Run, stops: Sequence[str] = ()) -> Result:
  """Explanation figures of the restored parameters (none once `stops` is not
  empty, see `_stop_requests`)."""
  try:
    _require_checkpoint(run, "explain")
    if stops:
      return _preempted(stops, "no figure was written")
    return {"step": run.start, "figures": write_figures(run, run.state.params)}
  finally:
    run.close()


def evaluate_mode(run: Run, stops: Sequence[str] = ()) -> Result:
  """The interpretability evaluation of the restored parameters, into
  <workdir>/evaluation/ (`codajax.evaluation`); `stops` (see
  `_stop_requests`) ends it once the result in flight is written."""
  try:
    _require_checkpoint(run, "evaluate")
    out_dir = os.path.join(run.workdir, "evaluation")
    result = evaluation.evaluate(
        run.model, {"params": run.state.params}, run.config, run.info, run.start,
        out_dir, run.batch_sharding, meta=run.meta, stops=stops)
    if "preempted" in result:
      kept = result["preempted"]["kept"]
      result["preempted"]["kept"] = (f"kept {', '.join(kept)} in {out_dir}" if kept
                                     else f"no result was finished in {out_dir}")
    return {"step": run.start, **result}
  finally:
    run.close()


MODES = {"train": train_mode, "eval": eval_mode, "explain": explain_mode,
         "evaluate": evaluate_mode}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "train", *,
                       on_step: Optional[Callable[[int, int], None]] = None) -> Result:
  """Runs `mode` ("train", "eval", "explain" or "evaluate") on `workdir`; see `Result`.

  `on_step(step, num_steps)`, training only: called at the restored step and
  after every step (a notebook's progress bar).

  A training workdir resumes from its latest checkpoint; "eval" and
  "explain" need one (trained, or imported by codajax.convert).
  """
  if mode not in MODES:  # Before reading any data or building anything.
    raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}.")
  with _stop_requests() as stops:
    run = setup(config, workdir, mode)
    if mode == "train":
      return train_mode(run, stops, on_step)
    return MODES[mode](run, stops)


@contextlib.contextmanager
def _stop_requests():
  """SIGTERM and Ctrl-C (SIGINT) ask the run to stop at its next safe point
  (see each mode); yields the list of their names. A second Ctrl-C
  interrupts at once: it goes to the SIGINT handler from before the run
  (Python's raises KeyboardInterrupt; the CLI's exits at once, see
  codajax.main). Only in a single process's main thread: multi-host runs stop
  on JAX's preemption notice (`reached_preemption`)."""
  stops = []
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield stops
    return

  def request_stop(signum, frame):
    if signum == signal.SIGINT and "SIGINT" in stops:
      outer = previous[signal.SIGINT]
      if callable(outer):
        outer(signum, frame)
      raise KeyboardInterrupt
    stops.append(signal.Signals(signum).name)

  previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield stops
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _save(run: Run, step: int, state, m, meta, metrics):
  _check_finite(step, m["train/loss"])  # Never checkpoint a diverged state.
  return checkpoint.save(run.mngr, step, state.params, state.opt_state, meta, metrics)


def _check_finite(step, loss):
  loss = float(loss)
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Non-finite training loss ({loss}) at step {step}. Lower "
        "config.learning_rate, or try config.model.dtype='float32'.")
