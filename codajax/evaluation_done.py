"""Whether --mode evaluate has anything left to do, decided before start-up.

A rerun of `--mode evaluate` whose results are all stored computes nothing,
but its start-up (TensorFlow, JAX, the checkpoint's restore, the test data)
took ~30 s. `check` decides from files alone, importing neither TensorFlow nor
JAX, whether the full run would only read back what is stored; then the CLI
prints the full run's lines at once (codajax.main).

It is done only when all of these hold, else the full path runs (silently):

  - the latest step folder of <workdir>/checkpoints has a meta item
    (`codajax.checkpoint`, <step>/meta/metadata: JSON) that records its step
    and params digest, and the model config, whose last width is the
    number of classes the full run's `config_lib.resolve` would fill in;
  - every configured (metric, method) is done for the record the full run
    would build (`result_store.stored_result`: the same checkpoint step and
    params digest, model config, data, image order, metric settings and
    method options; its .npy files agree with their recorded counts and
    sha256);
  - <workdir>/evaluation/done.json (`STAMP`), written by the full run after
    its figures, records the same config.evaluation, the same bytes of each
    result's JSON line, of summary.json and of each figure;
  - the workdir is writable and no other codajax run holds it.

So a stored number is never reported for another checkpoint, config or
setting, and summary.json and the figures are those of these results. The
params are not read back: a checkpoint whose data files were damaged after
its evaluation is not noticed here (its results are those of the recorded
digest). A run of results by an older codajax has no done.json: its first
full rerun writes it.
"""

import fcntl
import hashlib
import json
import logging
import os
from typing import NamedTuple, Optional

from codajax import config_lib
from codajax import result_store
from codajax import workdir as workdir_lib

STAMP = "done.json"
SUMMARY = "summary.json"
CHECKPOINT_DIR = "checkpoints"  # codajax.checkpoint.CHECKPOINT_DIR (which imports jax).


class Done(NamedTuple):
  """A run with nothing left to do: what the full run would return."""
  step: int
  metrics: dict   # {"<metric>/<method>": headline}, in the run's order.
  figures: list   # The figures' paths.


def headline_text(e, metric: str) -> str:
  """What a metric's headline number is, for the log."""
  if metric == "localisation":
    return "mean share of the positive attribution in the target's cell"
  return f"true-class probability with {e.fraction:.0%} of the pixels removed"


def log_summary(summary: dict, e) -> None:
  """The log lines of summary.json (`evaluation.uncertainty`): each mean with
  its 95% CI, and ours - each other method."""
  units = summary["bootstrap"]["units"]
  for metric, part in summary.items():
    if metric == "bootstrap":
      continue
    for method, v in part["methods"].items():
      if v["low"] is not None:
        logging.info("evaluate: %s of %s: %s %.4f [95%% CI %.4f, %.4f] over %d %s.", metric,
                     method, headline_text(e, metric), v["mean"], v["low"], v["high"],
                     v["n"], units[metric])
      d = part.get("ours_minus", {}).get(method)
      if d is not None:
        logging.info("evaluate: %s, ours - %s: %+.4f [95%% CI %+.4f, %+.4f]; ours higher "
                     "on %.0f%% of %d %s.", metric, method, d["mean"], d["low"], d["high"],
                     100 * d["share_ours_higher"], d["n"], units[metric])


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _stamp(out_dir: str, e, jobs: list, figures: list) -> dict:
  """What done.json records (see the module docstring)."""
  return {"evaluation": json.loads(json.dumps(e.to_dict())),
          "results": {f"{metric}/{method}": _sha256(os.path.join(out_dir, metric,
                                                                 f"{method}.json"))
                      for metric, method in jobs},
          "summary": _sha256(os.path.join(out_dir, SUMMARY)),
          "figures": {os.path.basename(p): _sha256(p) for p in figures}}


def write_stamp(out_dir: str, e, jobs: list, figures: list) -> None:
  """done.json, once the run's results, summary.json and figures are written."""
  stamp = _stamp(out_dir, e, jobs, figures)
  result_store.write_atomically(os.path.join(out_dir, STAMP),
                                lambda f: f.write((json.dumps(stamp) + "\n").encode()))


def _latest_checkpoint(workdir: str) -> tuple[int, str, int]:
  """(step, params digest, number of classes) of the latest step's meta item;
  raises (KeyError, ValueError, OSError, ...) when any is not recorded."""
  root = os.path.join(workdir, CHECKPOINT_DIR)
  step = max(int(d) for d in os.listdir(root) if d.isdigit())  # ValueError if none.
  with open(os.path.join(root, str(step), "meta", "metadata")) as f:
    meta = json.load(f)
  digest, classes = meta["digest"]["params"], meta["model"]["out_channels"][-1]
  if meta["step"] != step or not isinstance(digest, str) or not isinstance(classes, int):
    raise ValueError(f"meta item of step {step} does not record it")
  return step, digest, classes


def _held_by_another_run(workdir: str) -> bool:
  try:
    fd = os.open(os.path.join(workdir, workdir_lib.LOCK_FILE), os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # Released when fd closes.
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def check(config, workdir: str) -> Optional[Done]:
  """The stored outcome of `--mode evaluate` on `workdir` with `config` if the
  full run would compute nothing (see the module docstring), else None; never
  raises: any doubt means None."""
  workdir = os.path.abspath(workdir)
  out_dir = os.path.join(workdir, "evaluation")
  try:
    with open(os.path.join(out_dir, STAMP)) as f:
      stamp = json.load(f)
    config_lib.validate(config)
    wd = workdir_lib.Workdir(workdir, os.path.join(workdir, CHECKPOINT_DIR))
    if wd.writable() is not None or _held_by_another_run(workdir):
      return None  # The full run says why it cannot run.
    step, digest, classes = _latest_checkpoint(workdir)
    config = config_lib.resolve(config, classes, 1)  # Devices change no record.
    e = config.evaluation
    jobs = [(metric, method) for metric in e.metrics for method in e.methods]
    metrics = {}
    for metric, method in jobs:
      record = result_store.result_record(config, metric, method, step, digest)
      stored, _ = result_store.stored_result(out_dir, metric, method, record)
      if stored is None:
        return None
      metrics[f"{metric}/{method}"] = stored.line["headline"]
    figures = [os.path.join(out_dir, name) for name in stamp["figures"]]
    if _stamp(out_dir, e, jobs, figures) != stamp:
      return None
    with open(os.path.join(out_dir, SUMMARY)) as f:
      summary = json.load(f)
  except Exception:  # pylint: disable=broad-except  # Any doubt: the full run decides.
    return None
  logging.info("evaluate: every result is stored for the checkpoint of step %d (params "
               "sha256 %s...) in %s; nothing to compute.", step, digest[:12], out_dir)
  log_summary(summary, e)
  return Done(step, metrics, figures)
