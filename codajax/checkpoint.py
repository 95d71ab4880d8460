"""Orbax checkpoints of codajax runs, with clear errors.

Layout: `<workdir>/checkpoints/<step>/` with three items:
  params     the model parameters (StandardSave),
  opt_state  the optimizer state (absent in checkpoints imported from torch),
  meta       JSON: the step, the model config, the source, and "digest": the
             sha256 of params and of opt_state (verified on restore; a
             mismatch is a corrupt step. Checkpoints from before it have none).

Training, evaluation and `codajax.convert` all go through this module, so a
checkpoint written by one is restored by the others.
"""

import glob
import hashlib
import logging
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "eval/top1"
# Orbax writes a step to <step>.orbax-checkpoint-tmp (older versions add
# -<timestamp>) and renames it to <step> when it commits
# (orbax.checkpoint._src.path.atomicity_types.TMP_DIR_SUFFIX).
UNFINISHED = "*.orbax-checkpoint-tmp*"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with what to do about it."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, *, keep: int = 3, keep_best: bool = True,
            asynchronous: bool = True) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints, plus the best one by eval top-1.

  Raises ValueError, before touching the workdir, unless keep >= 1: orbax
  deletes every checkpoint with 0 and crashes after the first save below 0.
  """
  if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
    raise ValueError(
        f"config.keep_checkpoints={keep!r}: it must be an integer >= 1 (the number "
        "of latest checkpoints kept; 0 or less would delete them all). Set "
        "--config.keep_checkpoints=1 or more.")
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_best:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda m: m.get(BEST_METRIC, -1.0), n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=asynchronous, create=False)  # Made by the first save.
  # Handlers per item, so that item_metadata() can read a step's parameter
  # shapes before restoring (without them it returns no metadata at all).
  handlers = dict(params=ocp.StandardCheckpointHandler(),
                  opt_state=ocp.StandardCheckpointHandler(),
                  meta=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(directory(workdir), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict,
         metrics: Optional[dict] = None) -> Optional[dict]:
  """Saves `step` (asynchronously); returns the metrics dict given to the manager.

  The best-N policy reads a checkpoint's metrics only when a later save prunes
  old ones, and orbax keeps this very dict (not a copy, and not on disk): so a
  caller may save with {} before evaluating and fill the dict in place after,
  and a failed evaluation loses no checkpoint.
  """
  digest = {"params": digest_of(params)}
  if opt_state is not None:
    digest["opt_state"] = digest_of(opt_state)
  items = dict(params=ocp.args.StandardSave(params),
               meta=ocp.args.JsonSave(dict(meta, step=int(step), digest=digest)))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  if metrics is not None:
    metrics.update({k: float(v) for k, v in metrics.items()})
  mngr.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)
  return metrics


def wait_committed(mngr: ocp.CheckpointManager, step: int) -> None:
  """Blocks until the asynchronous save of `step` is committed (its folder
  renamed to <checkpoints>/<step>); raises CheckpointError if it was not."""
  mngr.wait_until_finished()
  if not (mngr.directory / str(int(step))).exists():
    raise CheckpointError(
        f"The checkpoint of step {step} was not committed to {mngr.directory}; the "
        "steps before it are kept. Check the disk (space, permissions) and rerun.")


def remove_unfinished(workdir: str) -> list[str]:
  """Removes the temporary step folders that a run killed while saving left
  behind (orbax never commits them), in one logged line; returns their paths.

  Only for the run that holds the workdir's lock (process 0, before its
  manager is used): another live run's save in flight is such a folder too.
  """
  paths = sorted(glob.glob(os.path.join(directory(workdir), UNFINISHED)))
  for path in paths:
    shutil.rmtree(path, ignore_errors=True)
  paths = [p for p in paths if not os.path.exists(p)]  # Orbax skips the others.
  if paths:
    logging.warning("Removed %d unfinished checkpoint(s) of an interrupted run: %s",
                    len(paths), ", ".join(paths))
  return paths


def save_imported(workdir: str, params, meta: dict) -> str:
  """Writes imported parameters as step 0 of `workdir`; returns the step's path.

  Refuses to overwrite a workdir that already holds checkpoints.
  """
  mngr = manager(workdir, asynchronous=False)
  if mngr.latest_step() is not None:
    raise CheckpointError(
        f"{mngr.directory} already holds checkpoints (steps {list(mngr.all_steps())}); "
        "import into an empty --workdir so no checkpoint is overwritten.")
  save(mngr, 0, params, None, dict(meta, imported=True))
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(directory(workdir), "0")


def _shapes(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): tuple(getattr(v, "shape", ())) for k, v in flat}


def _check_compatible(mngr, step: int, abstract_params, abstract_opt_state=None) -> None:
  """Compares stored parameter shapes with the model's, and the optimizer
  state's arrays with the optimizer's, before restoring."""
  try:
    metadata = mngr.item_metadata(step)
    stored, stored_opt = metadata["params"], metadata.get("opt_state")
  except Exception:  # pylint: disable=broad-except
    return  # Metadata unreadable: the restore below reports the real problem.
  if stored is None:
    return
  got, want = _shapes(stored), _shapes(abstract_params)
  if got == want:  # The model fits; then the optimizer (its state follows the model's shapes).
    if stored_opt is not None and abstract_opt_state is not None and (
        sorted(_shapes(stored_opt).values()) != sorted(_shapes(abstract_opt_state).values())):
      raise CheckpointError(
          f"The optimizer state at {mngr.directory}/{step} does not fit this config's "
          "optimizer: config.freeze_layers, weight_decay or grad_accum_steps differ from "
          "the run's. Resume with the run's settings (its config.json), or use a fresh "
          "--workdir (--config.init_from=<this workdir> starts from its parameters).")
    return
  diffs = [f"  {k}: checkpoint {got.get(k, 'missing')} vs model {want.get(k, 'missing')}"
           for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
  raise CheckpointError(
      f"The checkpoint at {mngr.directory}/{step} does not match the model "
      f"({len(diffs)} parameters differ):\n" + "\n".join(diffs[:20]) +
      "\nUse the model config the checkpoint was made with (see its meta item / "
      "config.json in the workdir), or a fresh --workdir.")


def restore(mngr: ocp.CheckpointManager, abstract_params, abstract_opt_state=None,
            *, set_aside: bool = False) -> Optional[tuple[int, Any, Any, dict]]:
  """Restores the latest usable checkpoint: (step, params, opt_state, meta).

  Returns None when there is none. opt_state is None when the checkpoint has
  none (an imported one) or when abstract_opt_state is None. A checkpoint that
  cannot be read (or an empty step folder) is skipped, falling back to the one
  before. With set_aside (training, which would save those steps again), the
  skipped steps are moved to <checkpoints>/corrupt/<step>, in one logged line;
  otherwise they are left in place with a warning. Nothing is ever deleted.
  Shape mismatches with the model raise CheckpointError.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    _check_compatible(mngr, step, abstract_params, abstract_opt_state)
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      items = dict(params=ocp.args.StandardRestore(abstract_params))
      has_opt = not meta.get("imported", False)
      if abstract_opt_state is not None and has_opt:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
      _verify(meta.get("digest"), restored)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      errors.append((step, f"step {step}: {type(e).__name__}: {str(e)[:300]}"))
      if not set_aside:
        logging.warning("Checkpoint %s/%d is unreadable (%s: %s); trying the one "
                        "before. It is left in place.", mngr.directory, step,
                        type(e).__name__, str(e)[:300])
      continue
    if errors and set_aside:
      moved = _set_aside(mngr, [s for s, _ in errors])
      logging.warning("Unreadable checkpoint(s) moved aside (%s); resuming from "
                      "step %d. Errors: %s", ", ".join(moved), step,
                      "; ".join(m[:200] for _, m in errors))
    elif errors:
      logging.warning("Restored step %d after skipping unreadable checkpoints: %s",
                      step, [m for _, m in errors])
    return step, restored["params"], restored.get("opt_state"), meta
  if errors:
    raise CheckpointError(
        f"No readable checkpoint in {mngr.directory}:\n  " +
        "\n  ".join(m for _, m in errors) +
        "\nMove the damaged step folders away (nothing was deleted) or start in a "
        "fresh --workdir.")
  return None


def load_params(workdir: str, model, example, sharding=None) -> tuple[int, Any, dict]:
  """(step, params, meta) of the latest usable checkpoint of `workdir`, for
  inference (notebooks, `codajax.pretrained`): no optimizer state.

  Args:
    workdir: the run's workdir (or a converted pretrained net's).
    model: the Flax module whose `init(key, example)` gives the params' shapes.
    example: an input batch (an array or a ShapeDtypeStruct), for the shapes.
    sharding: where the params go; default: the first device.

  Raises:
    CheckpointError: no checkpoint, none readable, or one that does not fit
      the model.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)["params"]
  return _load_params(workdir, lambda _: shapes, sharding)


def load_stored_params(workdir: str, sharding=None) -> tuple[int, Any, dict]:
  """(step, params, meta) of the latest usable checkpoint of `workdir` in the
  shapes that it stores, whatever model they fit: the parameters that a
  fine-tuning run starts from (`codajax.finetune`). No optimizer state.

  Raises:
    CheckpointError: no such workdir, no checkpoint, or none readable.
  """
  if not os.path.isdir(directory(workdir)):
    raise CheckpointError(f"{directory(workdir)} does not exist: there is no trained run "
                          "in that workdir.")

  def stored_shapes(mngr):
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        return mngr.item_metadata(step)["params"]
      except Exception:  # pylint: disable=broad-except
        continue  # That step is unreadable: restore() skips it and says so.
    return None
  return _load_params(workdir, stored_shapes, sharding)


def _load_params(workdir: str, shapes_of, sharding) -> tuple[int, Any, dict]:
  """load_params and load_stored_params: `shapes_of(manager)` gives the params'
  shapes and dtypes (None: no step to read them from)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  mngr = manager(workdir, asynchronous=False, keep_best=False)
  try:
    shapes = shapes_of(mngr)
    restored = None if shapes is None else restore(mngr, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes))
  finally:
    mngr.close()
  if restored is None:
    raise CheckpointError(f"{directory(workdir)} holds no checkpoint.")
  step, params, _, meta = restored
  return step, params, meta


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> list[str]:
  """Moves step folders to <checkpoints>/corrupt/<step>[.k] (process 0); returns
  "<from> -> <to>" for each. The manager is reloaded, so saving them again works."""
  corrupt = os.path.join(str(mngr.directory), "corrupt")
  moved = []
  for step in steps:
    src = os.path.join(str(mngr.directory), str(step))
    dst, k = os.path.join(corrupt, str(step)), 0
    while os.path.exists(dst):
      k += 1
      dst = os.path.join(corrupt, f"{step}.{k}")
    if jax.process_index() == 0:
      os.makedirs(corrupt, exist_ok=True)
      os.rename(src, dst)
    moved.append(f"{src} -> {dst}")
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes("codajax_checkpoint_set_aside")
  mngr.reload()
  return moved


def digest_of(tree) -> str:
  """sha256 over the leaves (path, dtype, shape, bytes) in sorted path order.

  Reads one replica of each (replicated) leaf, so it also works on multi-host.
  """
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)
    a = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


class DigestMismatch(ValueError):
  """Restored arrays differ from those saved (a flipped bit in a data file)."""


def _verify(digest: Optional[dict], restored) -> None:
  for item, want in (digest or {}).items():
    if restored.get(item) is not None:
      got = digest_of(restored.get(item))
      if got != want:
        raise DigestMismatch(f"{item} digest mismatch: saved sha256 {want[:16]}..., "
                             f"restored {got[:16]}...; a data file is damaged.")


def abstract(tree):
  """ShapeDtypeStructs (with shardings where the leaves have them)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                     sharding=getattr(x, "sharding", None)), tree)
