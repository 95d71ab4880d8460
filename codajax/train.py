"""Training and evaluation of CoDA-Nets, read top to bottom.

`train_and_evaluate(config, workdir, mode)` checks the mode (the names are
`codajax.modes`), then `setup` builds what every mode shares, the `runs.Run`,
in numbered phases: 1 config and workdir checks, 2 mesh, 3 input (then the
workdir is locked, `codajax.workdir`), 4 model and optimizer, 5 sharding and
initialisation, 6 update and eval steps (the steps themselves are
`codajax.steps`), 7 restore (or, for a new run, `codajax.finetune`'s start
from config.init_from); what a mode needs beyond them it says in
`modes.Needs`. Then one function per mode runs, and closes the writers, the
checkpoint manager and the workdir however it ends: `train_mode` (8, the
loop), `accuracy_mode`, `explain_mode`, `evaluate_mode`. Each returns a
`Result`. SIGTERM or Ctrl-C stops any mode at its next safe point
(`modes.stop_requests`): training after a save, evaluate after the result in
flight is written, accuracy and explain before they write anything.

The same code runs on one CPU, on 8 GPUs and on multi-host TPU pods: the batch
is sharded over a 1-D device mesh ('data'), parameters are replicated, and each
host feeds its own slice through `jax.make_array_from_process_local_data`.
"""

import dataclasses
import logging
import math
import os
import time
from typing import Callable, Optional, Sequence

from clu import parameter_overview
from clu import periodic_actions
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from codajax import batching
from codajax import checkpoint
from codajax import config_lib
from codajax import input_pipeline
from codajax import evaluation
from codajax import finetune
from codajax import models
from codajax import modes
from codajax import plotting
from codajax import runs
from codajax import workdir as workdir_lib


# ---------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Preempted:
  """How a run that SIGTERM, Ctrl-C or a preemption notice stopped early ended."""
  signal: str  # The signal's name, or "preemption notice".
  kept: str  # What the run kept, for the CLI's one line ("checkpoint of step 5 saved in W/...").
  step: Optional[int] = None  # Training: the step it saved when it stopped (None: none).


@dataclasses.dataclass(frozen=True)
class Result:
  """What every mode returns."""
  # The scores it computed: "eval/top1", "eval/top5", "eval/loss", "eval/count"
  # (train, accuracy; none from a run stopped before its evaluation), or
  # "<metric>/<method>" (evaluate, see codajax.evaluation).
  metrics: dict = dataclasses.field(default_factory=dict)
  step: Optional[int] = None  # The checkpoint's step (accuracy, explain, evaluate).
  figures: list = dataclasses.field(default_factory=list)  # The paths of the figures written.
  preempted: Optional[Preempted] = None  # Set only for a run stopped early.

  def summary(self) -> dict:
    """The step (if any), then the metrics: what the CLI prints."""
    return {**({"step": self.step} if self.step is not None else {}), **self.metrics}


# ------------------------------------------------------------------ setup


def setup(config: ml_collections.ConfigDict, workdir: str, *, training: bool = False,
          read_only_ok: bool = False) -> runs.Run:
  """Phases 1-7, shared by every mode; `training` and `read_only_ok`: what the
  mode needs beyond them (see `modes.Needs`)."""
  # 1. Config, workdir and logging (the writers open at their first write). -
  config_lib.validate(config)  # Every field at once, before any work.
  workdir = os.path.abspath(workdir)
  wd = workdir_lib.Workdir(workdir, checkpoint.directory(workdir))
  writable = runs.check_workdir(wd, read_only_ok)

  # 2. Mesh: one 'data' axis over every device of every host. --------------
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  # 3. Input. --------------------------------------------------------------
  info = input_pipeline.get_info(config)
  config = config_lib.resolve(config, info.num_classes, jax.device_count(),
                              info.num_train if training else None)
  per_epoch = input_pipeline.steps_per_epoch(config, info)
  num_steps = (config.num_steps if config.num_steps > 0
               else max(1, int(config.num_epochs * per_epoch)))
  if jax.process_index() == 0 and writable:  # Only once the data is known to be there.
    wd.open()  # Creates it if needed; one run at a time.
  try:  # From here on, an error releases the workdir and leaves it as it was.
    # 4-6. Model, optimizer, initial state and the jitted steps. -------------
    model = models.from_config(config.model)
    state, train_step_fn, eval_step_fn = runs.compile_steps(
        config, model, info, per_epoch, num_steps, batch_sharding, replicated)

    # 7. Restore the latest checkpoint (or an imported one), if any; else, for
    # training, the parameters of config.init_from (codajax.finetune). ------
    mngr, state, start, meta = runs.restore(wd, config, state, replicated, training)
    if training:
      try:
        state = finetune.start(config, state, restored=meta is not None)
      except BaseException:
        mngr.close()
        raise
    log = runs.MetricsLog(workdir, resumed_at=start if training else None, enabled=writable)
    return runs.Run(config=config, workdir=workdir, info=info, model=model,
                    steps_per_epoch=per_epoch, num_steps=num_steps,
                    batch_sharding=batch_sharding, state=state, start=start,
                    restored=meta is not None, train_step_fn=train_step_fn,
                    eval_step_fn=eval_step_fn, mngr=mngr, log=log, wd=wd, meta=meta or {})
  except BaseException:
    wd.close(tidy=True)
    raise


def accuracy(run: runs.Run, params, step: int, stops: Sequence[str] = ()) -> Optional[dict]:
  """Top-1, top-5 and BCE over the whole test split (each example once).

  Raises FloatingPointError, naming the step and the checkpoint directory, if
  any test example gets a NaN or inf logit: no metrics are reported then.
  Returns None if `stops` (see `modes.stop_requests`) fills up before the end.
  """
  totals = None
  for batch in input_pipeline.eval_batches(run.config, run.info):
    if stops:
      return None
    out = run.eval_step_fn(params, batching.to_mesh(batch, run.batch_sharding))
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


def write_figures(run: runs.Run, params) -> list:
  """Explanation figures of the first num_explain test images (process 0 only)."""
  if jax.process_index() != 0:
    return []
  images, labels = input_pipeline.first_test_examples(run.config,
                                                      run.config.num_explain)
  return plotting.write_explanations(run.model, jax.device_get(params), images, labels,
                                     run.info.class_names,
                                     os.path.join(run.workdir, "explanations"))


# ------------------------------------------------------------------ modes


def train_mode(run: runs.Run, stops: Sequence[str] = (),
               on_step: Optional[Callable[[int, int], None]] = None) -> Result:
  """Trains from the restored step to num_steps, evaluating and checkpointing.

  `stops`: filled with a signal's name when one asks the run to stop (see
  `modes.stop_requests`); the run then saves the step it is at and returns
  once that checkpoint is committed. Asked before its first step, or when
  already finished, it returns before the next piece of work (nothing new is
  saved). `on_step(step, num_steps)`: called after every step and once at the
  restored step, e.g. by a notebook's progress bar.
  """
  batches = None
  try:
    if jax.process_index() == 0:
      parameter_overview.log_parameter_overview(run.state.params)
    if stops:  # During the setup: before the first step is compiled.
      return Result(preempted=_preempted(stops, _kept_checkpoints(run)))
    batches = input_pipeline.train_batches(run.config, run.info, run.start)
    state, eval_metrics, stopped = _train_loop(run, batches, stops, on_step)
    if stopped is not None:
      return Result(metrics=eval_metrics, preempted=stopped)
    if not eval_metrics:  # Already finished: report, don't retrain.
      eval_metrics = accuracy(run, state.params, run.start, stops)
    if stops or eval_metrics is None:  # Before the re-evaluation's end, or the figures.
      return Result(metrics=eval_metrics or {},
                    preempted=_preempted(stops, _kept_checkpoints(run)))
    figures = write_figures(run, state.params) if run.config.explain_at_end else []
    return Result(metrics=eval_metrics, figures=figures)
  finally:
    if batches is not None:
      batches.close()  # Stops the tf.data pipeline before the process exits.
    run.close()


def _train_loop(run: runs.Run, batches, stops: Sequence[str], on_step):
  """Phase 8, the loop: (the last state, the last eval metrics, a Preempted if
  a stop request or a preemption notice ended it after a save, else None)."""
  config, num_steps = run.config, run.num_steps
  meta = {"model": config.model.to_dict(), "config": config.to_dict()}
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=run.log)
  state, metrics, eval_metrics, pending = run.state, [], {}, None
  t_log = time.time()
  if on_step is not None:
    on_step(run.start, num_steps)
  for step in range(run.start + 1, num_steps + 1):
    batch = batching.to_mesh(next(batches), run.batch_sharding)
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
      _log_means(run, step, metrics, t_log)
      metrics, t_log = [], time.time()
    evaluated, stop = _save_and_evaluate(run, step, state, m, meta, stops)
    eval_metrics = evaluated if evaluated is not None else eval_metrics
    if stop:
      checkpoint.wait_committed(run.mngr, step)  # "saved" only once it is.
      kept = f"checkpoint of step {step} saved in {run.mngr.directory}"
      logging.warning("Preempted at step %d: %s.", step, kept)
      return state, eval_metrics, _preempted(stops, kept, step=step)
  if pending is not None:
    _check_finite(*pending)
  return state, eval_metrics, None


def _log_means(run: runs.Run, step: int, metrics: list, since: float) -> None:
  """Logs the means of the steps' metrics since the last line, and their rate."""
  means = jax.tree.map(lambda *x: float(np.mean(x)), *jax.device_get(metrics))
  means["train/steps_per_sec"] = len(metrics) / max(time.time() - since, 1e-9)
  run.log.write(step, means)


def _every(config_value: int, per_epoch: int) -> int:
  return config_value if config_value > 0 else per_epoch


def _save_and_evaluate(run: runs.Run, step: int, state, m, meta, stops: Sequence[str]):
  """The checkpoint and the evaluation due at `step`: (the eval metrics or
  None, whether the run stops here).

  Save first, then evaluate: an error in the evaluation (a bad test image)
  must not lose the steps since the last checkpoint. The best-N policy reads
  the metrics dict only at later saves, so it is filled in place once the
  evaluation is done (see checkpoint.save). The save is committed before
  evaluating, so even a crash in it loses nothing.
  """
  config, last = run.config, step == run.num_steps
  is_eval = step % _every(config.eval_every_steps, run.steps_per_epoch) == 0 or last
  stop = bool(stops) or run.mngr.reached_preemption(step)
  tracked, eval_metrics = None, None
  if step % _every(config.checkpoint_every_steps, run.steps_per_epoch) == 0 or last or stop:
    tracked = _save(run, step, state, m, meta, {} if is_eval else None)
    if is_eval:
      run.mngr.wait_until_finished()
  if is_eval:
    eval_metrics = accuracy(run, state.params, step)
    run.log.write(step, eval_metrics)
    if tracked is not None:
      tracked.update(eval_metrics)
    elif stops:  # A signal during the evaluation: save this step too.
      stop = True
      _save(run, step, state, m, meta, dict(eval_metrics))
  return eval_metrics, stop


def _require_checkpoint(run: runs.Run, mode: str) -> None:
  if not run.restored:
    raise checkpoint.CheckpointError(
        f"--mode={mode} needs a checkpoint in {checkpoint.directory(run.workdir)}; train "
        "first, or import weights with python -m codajax.convert.")


def _preempted(stops: Sequence[str], kept: str, step: Optional[int] = None) -> Preempted:
  """How a run that a stop request ended early ended, keeping `kept`."""
  return Preempted(stops[0] if stops else "preemption notice", kept, step)


def _kept_checkpoints(run: runs.Run) -> str:
  if run.restored:
    return f"the checkpoint of step {run.start} is kept in {run.mngr.directory}"
  return "nothing was written"


def accuracy_mode(run: runs.Run, stops: Sequence[str] = ()) -> Result:
  """Top-1, top-5 and loss of the restored (trained or imported) parameters,
  logged at their step. `stops` (see `modes.stop_requests`): checked between
  eval batches; nothing is written then."""
  try:
    _require_checkpoint(run, "accuracy")
    metrics = accuracy(run, run.state.params, run.start, stops)
    if metrics is None:
      return Result(preempted=_preempted(stops, "no metrics were written"))
    run.log.write(run.start, metrics)
    logging.info("Evaluated the checkpoint of step %d in %s.", run.start, run.mngr.directory)
    return Result(metrics=metrics, step=run.start)
  finally:
    run.close()


def explain_mode(run: runs.Run, stops: Sequence[str] = ()) -> Result:
  """Explanation figures of the restored parameters (none once `stops` is not
  empty, see `modes.stop_requests`)."""
  try:
    _require_checkpoint(run, "explain")
    if stops:
      return Result(preempted=_preempted(stops, "no figure was written"))
    return Result(step=run.start, figures=write_figures(run, run.state.params))
  finally:
    run.close()


def evaluate_mode(run: runs.Run, stops: Sequence[str] = ()) -> Result:
  """The interpretability evaluation of the restored parameters, into
  <workdir>/evaluation/ (`codajax.evaluation`); `stops` (see
  `modes.stop_requests`) ends it once the result in flight is written."""
  try:
    _require_checkpoint(run, "evaluate")
    out_dir = os.path.join(run.workdir, "evaluation")
    scores = evaluation.evaluate(
        run.model, {"params": run.state.params}, run.config, run.info, run.start,
        out_dir, run.batch_sharding, meta=run.meta, stops=stops)
    figures, stopped = scores.pop("figures"), scores.pop("preempted", None)
    if stopped is not None:
      kept = stopped["kept"]
      stopped = Preempted(stopped["signal"], f"kept {', '.join(kept)} in {out_dir}" if kept
                          else f"no result was finished in {out_dir}")
    return Result(metrics=scores, step=run.start, figures=figures, preempted=stopped)
  finally:
    run.close()


# Mode `name` of codajax.modes runs `<name>_mode` (a missing one fails here).
MODES = {name: globals()[f"{name}_mode"] for name in modes.MODES}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = "train", *,
                       on_step: Optional[Callable[[int, int], None]] = None) -> Result:
  """Runs `mode` (a name of `modes.MODES`: "train", "accuracy", "explain" or
  "evaluate"; the old "eval" still works) on `workdir`; see `Result`.

  `on_step(step, num_steps)`, training only: called at the restored step and
  after every step (a notebook's progress bar).

  A training workdir resumes from its latest checkpoint; "accuracy" and
  "explain" need one (trained, or imported by codajax.convert).
  """
  mode = modes.canonical(mode)  # Before reading any data or building anything.
  needs = modes.MODES[mode]
  with modes.stop_requests(enabled=jax.process_count() == 1) as stops:
    run = setup(config, workdir, training=needs.training, read_only_ok=needs.read_only_ok)
    if mode == "train":
      return train_mode(run, stops, on_step)
    return MODES[mode](run, stops)


def _save(run: runs.Run, step: int, state, m, meta, metrics):
  _check_finite(step, m["train/loss"])  # Never checkpoint a diverged state.
  return checkpoint.save(run.mngr, step, state.params, state.opt_state, meta, metrics)


def _check_finite(step, loss):
  loss = float(loss)
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Non-finite training loss ({loss}) at step {step}. Lower "
        "config.learning_rate, or try config.model.dtype='float32'.")
