"""Orbax checkpoints of codajax runs, with clear errors.

Layout: `<workdir>/checkpoints/<step>/` with three items:
  params     the model parameters (StandardSave),
  opt_state  the optimizer state (absent in checkpoints imported from torch),
  meta       JSON: the step, the model config, the source, eval metrics.

Training, evaluation and `codajax.convert` all go through this module, so a
checkpoint written by one is restored by the others.
"""

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "eval/top1"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with what to do about it."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, *, keep: int = 3, keep_best: bool = True,
            asynchronous: bool = True) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints, plus the best one by eval top-1."""
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_best:
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda m: m.get(BEST_METRIC, -1.0), n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=asynchronous, create=True)
  # Handlers per item, so that item_metadata() can read a step's parameter
  # shapes before restoring (without them it returns no metadata at all).
  handlers = dict(params=ocp.StandardCheckpointHandler(),
                  opt_state=ocp.StandardCheckpointHandler(),
                  meta=ocp.JsonCheckpointHandler())
  return ocp.CheckpointManager(directory(workdir), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict,
         metrics: Optional[dict] = None) -> None:
  items = dict(params=ocp.args.StandardSave(params),
               meta=ocp.args.JsonSave(dict(meta, step=int(step))))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  mngr.save(int(step), args=ocp.args.Composite(**items),
            metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
            force=True)


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


def _check_compatible(mngr, step: int, abstract_params) -> None:
  """Compares stored parameter shapes with the model's, before restoring."""
  try:
    stored = mngr.item_metadata(step)["params"]
  except Exception:  # pylint: disable=broad-except
    return  # Metadata unreadable: the restore below reports the real problem.
  if stored is None:
    return
  got, want = _shapes(stored), _shapes(abstract_params)
  if got == want:
    return
  diffs = [f"  {k}: checkpoint {got.get(k, 'missing')} vs model {want.get(k, 'missing')}"
           for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
  raise CheckpointError(
      f"The checkpoint at {mngr.directory}/{step} does not match the model "
      f"({len(diffs)} parameters differ):\n" + "\n".join(diffs[:20]) +
      "\nUse the model config the checkpoint was made with (see its meta item / "
      "config.json in the workdir), or a fresh --workdir.")


def restore(mngr: ocp.CheckpointManager, abstract_params, abstract_opt_state=None,
            ) -> Optional[tuple[int, Any, Any, dict]]:
  """Restores the latest usable checkpoint: (step, params, opt_state, meta).

  Returns None when there is none. opt_state is None when the checkpoint has
  none (an imported one) or when abstract_opt_state is None. A checkpoint that
  cannot be read is skipped with a warning, falling back to the one before;
  nothing is deleted. Shape mismatches with the model raise CheckpointError.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    _check_compatible(mngr, step, abstract_params)
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      items = dict(params=ocp.args.StandardRestore(abstract_params))
      has_opt = not meta.get("imported", False)
      if abstract_opt_state is not None and has_opt:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
      logging.warning("Checkpoint %s/%d is unreadable (%s: %s); trying the one "
                      "before. It is left in place.", mngr.directory, step,
                      type(e).__name__, str(e)[:300])
      continue
    if errors:
      logging.warning("Restored step %d after skipping unreadable checkpoints: %s",
                      step, errors)
    return step, restored["params"], restored.get("opt_state"), meta
  if errors:
    raise CheckpointError(
        f"No readable checkpoint in {mngr.directory}:\n  " + "\n  ".join(errors) +
        "\nMove the damaged step folders away (nothing was deleted) or start in a "
        "fresh --workdir.")
  return None


def abstract(tree):
  """ShapeDtypeStructs (with shardings where the leaves have them)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                     sharding=getattr(x, "sharding", None)), tree)
