"""--mode evaluate: the paper's interpretability evaluation of a checkpoint.

For every metric and method of `config.evaluation` (codajax.evaluation's
metrics of codajax.attribution's methods), `evaluate` writes under `out_dir`:

  <metric>/<method>.npy    the raw scores: localisation (grids, n*n) per
                           target, pixel_removal (images, points) per image
  localisation/<method>_maps.npy   its maps of the first num_comparison grids
  <metric>/<method>.json   one JSON line, written last: summary statistics
                           (mean, median, quartiles; for curves the curve mean
                           and the value at the last point), what the result
                           depends on (`result_record`: the checkpoint's step
                           and params digest, the model config, the data and
                           its image order, the metric's settings and the
                           method's options) and the count and sha256 of the
                           scores (and maps) it was written with
  localisation.png         box plots per method, Oracle and Uniform lines
  pixel_removal.png        the mean curve of every method
  comparison.png           a few grids with every method's map side by side

A (metric, method) is done, and skipped when the command runs again, only when
its JSON line records the same dependencies and its .npy files agree with the
counts and digests the line records (`stored_result`). Otherwise it is
recomputed, after one warning line that names what changed or the file that is
missing or damaged: a stored number is never reported for another checkpoint,
model, data or setting. Each file is written atomically, so a killed run loses
at most the result in flight; the figures are drawn from the results of this
run, all done. `stops` (filled by a signal handler) ends the run after the
result in flight is written.

Both metrics see the test images in the order `config_lib.image_order` gives:
the data set's own for tfds CIFAR-10 and ImageNet (the authors' order), else a
permutation seeded by config.evaluation.seed, so that the first num_images
(pixel removal) and the grids' scan order are not one class after another.
Attributions run data-parallel over the mesh's 'data' axis; every process
reads the whole test split and process 0 writes.
"""

import functools
import json
import logging
import os
import time
from typing import NamedTuple, Optional, Sequence

from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import numpy as np

from codajax import attribution
from codajax import bootstrap
from codajax import checkpoint
from codajax import config_lib
from codajax import metrics
from codajax import input_pipeline
from codajax import models
from codajax import plotting


def _to_mesh(x: np.ndarray, sharding) -> jax.Array:
  """Host data (the same on every process) -> a global array over the mesh."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sharded(fn, sharding, size: int, *arrays) -> np.ndarray:
  """fn(*arrays) with the batch axis padded to `size` (rounded up to the mesh
  size: one compiled program for every batch) and sharded over the mesh."""
  n, devices = len(arrays[0]), sharding.mesh.size
  pad = max(size, n) - n
  pad += -(n + pad) % devices
  padded = [np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) if pad else a for a in arrays]
  return _to_host(fn(*(_to_mesh(a, sharding) for a in padded)))[:n]


# ------------------------------------------------ what a stored result is


def data_record(config) -> dict:
  """The test images a result is computed on, from the config alone."""
  order = config_lib.image_order(config)
  return {"dataset": config.dataset,
          "data_dir": os.path.abspath(config.data_dir) if config.data_dir else None,
          "test_split": config.test_split, "image_size": config.image_size,
          "class_subset": config.class_subset,
          # The eval preprocessing reads resize_size only for augment="imagenet".
          "resize_size": config.resize_size if config.augment == "imagenet" else None,
          "image_order": order,
          "image_seed": config.evaluation.seed if order == "shuffled" else None}


def params_digest(meta: Optional[dict], params=None) -> str:
  """The checkpoint's params digest: from its meta item (`codajax.checkpoint`),
  or computed from `params` for a checkpoint that records none."""
  digest = ((meta or {}).get("digest") or {}).get("params")
  return digest or checkpoint.digest_of(params)


def result_record(config, metric: str, method: str, step: int, digest: str) -> dict:
  """What a stored result of (metric, method) depends on, as its JSON line
  stores it: the checkpoint, the model config, the data, and the metric's
  settings and the method's options."""
  e = config.evaluation
  keys = (("grid_size", "num_grids", "conf_thresh", "skip_bug", "smooth", "seed")
          if metric == "localisation" else ("num_images", "fraction", "points", "order", "fill"))
  record = {"checkpoint": {"step": int(step), "params": digest},
            "model": config.model.to_dict(), "data": data_record(config),
            "settings": {"metric": {k: e[k] for k in keys},
                         "options": e.options[method].to_dict()}}
  return json.loads(json.dumps(record))  # Tuples as lists: as read back.


class Stored(NamedTuple):
  """A done result, read back: its JSON line, scores and (localisation) maps."""
  line: dict
  scores: np.ndarray
  maps: Optional[np.ndarray]


def _files(metric: str, method: str) -> tuple:
  return (f"{method}.npy",) + ((f"{method}_maps.npy",) if metric == "localisation" else ())


def stored_result(out_dir: str, metric: str, method: str,
                  record: Optional[dict]) -> tuple[Optional[Stored], Optional[str]]:
  """(the stored result, None) if it is done for `record`, else (None, why
  not: a line naming what changed or the damaged file; None if nothing is stored).
  record=None: any intact result, whatever it was computed for (a report)."""
  path = os.path.join(out_dir, metric, f"{method}.json")
  try:
    with open(path) as f:
      line = json.loads(f.readline())
    if not isinstance(line, dict):
      raise ValueError("not a JSON object")
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError) as error:
    return None, f"{path} is damaged ({_brief(error)}); recomputing it."
  changed = _changes(line, record) if record is not None else ""
  if changed:
    return None, f"{metric} of {method}: stored result is stale ({changed}); recomputing."
  arrays, files = [], line.get("files") if isinstance(line.get("files"), dict) else {}
  for name in _files(metric, method):
    array, why = _load(os.path.join(out_dir, metric, name), files.get(name))
    if why:
      return None, f"{os.path.join(out_dir, metric, name)} {why}; recomputing it."
    arrays.append(array)
  return Stored(line, arrays[0], arrays[1] if len(arrays) > 1 else None), None


def _load(path: str, want: Optional[dict]) -> tuple[Optional[np.ndarray], Optional[str]]:
  """(the array, None) if `path` holds the array of count and sha256 `want`,
  else (None, what is wrong with it)."""
  if not os.path.exists(path):
    return None, "is missing"
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as error:  # pylint: disable=broad-except  # Any damage numpy meets.
    return None, f"is damaged ({_brief(error)})"
  got = _file_record(array)
  if not isinstance(want, dict):
    return None, "is not recorded in its summary line"
  if got["count"] != want.get("count"):
    return None, f"is damaged ({got['count']} values, its summary says {want.get('count')})"
  if got["sha256"] != want.get("sha256"):
    return None, "is damaged (its sha256 differs from its summary's)"
  return array, None


def _file_record(array: np.ndarray) -> dict:
  return {"count": int(array.size), "sha256": checkpoint.digest_of(array)}


def _brief(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def _changes(line: dict, record: dict, limit: int = 3) -> str:
  """'' if `line` records `record`, else its differences, e.g.
  'model.temperature 1000.0 -> 5.0'."""
  missing = [k for k in record if k not in line]
  if missing:
    return f"it records no {', '.join(missing)}: written by an older codajax"
  old, new = _flat({k: line[k] for k in record}), _flat(record)
  keys = [k for k in new if k not in old or old[k] != new[k]] + [k for k in old if k not in new]
  shown = [f"{k} {_short(old.get(k, '(none)'))} -> {_short(new.get(k, '(none)'))}"
           for k in keys[:limit]]
  return ", ".join(shown) + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


def _flat(tree: dict, prefix: str = "") -> dict:
  """{"model": {"temperature": 5.0}} -> {"model.temperature": 5.0}."""
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
  return out


def _short(value) -> str:
  return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else str(value)


def _write_atomically(path: str, write) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _write(out_dir: str, metric: str, method: str, result: Stored) -> None:
  """The .npy files, then the JSON line with their counts and digests (last:
  a run killed in between leaves no line, so the result is not done)."""
  arrays = [a for a in (result.scores, result.maps) if a is not None]
  folder = os.path.join(out_dir, metric)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{method}.json")
  if os.path.exists(path):
    os.remove(path)  # The old line must not vouch for the new files.
  for name, array in zip(_files(metric, method), arrays):
    _write_atomically(os.path.join(folder, name), lambda f, a=array: np.save(f, a))
  files = {name: _file_record(a) for name, a in zip(_files(metric, method), arrays)}
  line = {**result.line, "files": files}
  _write_atomically(path, lambda f: f.write((json.dumps(line) + "\n").encode()))


# ------------------------------------------------------------------ evaluate


def evaluate(model: models.CoDANet, variables, config, info, step: int, out_dir: str,
             sharding, *, meta: Optional[dict] = None, stops: Sequence[str] = ()) -> dict:
  """Runs the evaluation (see the module docstring); returns {"<metric>/<method>":
  headline figure (localisation: mean score; pixel_removal: the value at the
  last point)} plus "figures", the paths of the figures written.

  `meta`: the checkpoint's meta item (its params digest goes into every
  record; None: computed from variables["params"]). `stops`: a list that a
  signal handler fills with signal names; once it is not empty, the run stops
  after the result in flight is written and returns the results so far,
  "figures": [] and "preempted": {"signal": stops[0], "kept": ["<metric>/<method>",
  ...] (the results complete on disk)}.
  """
  if stops:  # Asked to stop before any work.
    return _preempted({}, stops, {})
  e = config.evaluation
  primary = jax.process_index() == 0
  digest = params_digest(meta, variables["params"])
  images, labels = evaluation_images(config, info)
  grids = _grids(model, variables, images, labels, e, sharding, step)
  removal = slice(0, min(e.num_images, len(images)))
  jobs = [(metric, method) for metric in e.metrics for method in e.methods]
  units = {"localisation": len(grids.indices) if grids is not None else 0,
           "pixel_removal": removal.stop}
  report = periodic_actions.ReportProgress(
      num_train_steps=sum(units[m] for m, _ in jobs), every_secs=30.0)
  done, results, kept = 0, {}, {}
  for metric, method in jobs:
    if stops:  # After the result in flight: stop before the next one.
      return _preempted(results, stops, kept)
    record = result_record(config, metric, method, step, digest)
    stored, why = stored_result(out_dir, metric, method, record)
    if why:
      logging.warning("evaluate: %s", why)
    if stored is not None:
      logging.info("evaluate: %s of %s is done (%s); skipped.", metric, method,
                   os.path.join(out_dir, metric, f"{method}.json"))
    else:
      t = time.time()
      stored = _compute(metric, method, model, variables, e, images, labels, grids, removal,
                        sharding, _Counted(report, done), record)
      stored.line["seconds"] = round(time.time() - t, 1)
      if primary:
        _write(out_dir, metric, method, stored)
      logging.info("evaluate: %s of %s: %s %.4f (%.0f s).", metric, method, _headline(e, metric),
                   stored.line["headline"], time.time() - t)
    done += units[metric]
    report(done, time.time())
    results[f"{metric}/{method}"] = stored.line["headline"]
    kept[metric, method] = stored
  if stops:
    return _preempted(results, stops, kept)
  summary = uncertainty(kept, e)
  if primary:
    _write_atomically(os.path.join(out_dir, SUMMARY),
                      lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
  figures = _figures(out_dir, e, images, grids, info, kept, summary) if primary else []
  return {**results, "figures": figures}


SUMMARY = "summary.json"


def _headline(e, metric: str) -> str:
  """What a metric's headline number is, for the log."""
  if metric == "localisation":
    return "mean share of the positive attribution in the target's cell"
  return f"true-class probability with {e.fraction:.0%} of the pixels removed"


def uncertainty(results: dict, e) -> dict:
  """evaluation/summary.json: for {(metric, method): Stored}, per metric and
  method the mean over its units (`metrics.unit_values`) with its 95%
  bootstrap CI, and, where "ours" was run, per other method the paired
  difference ours - method on the same units with its CI and the share of
  units where ours is higher. Intervals need 2 units or more (else null)."""
  opts = dict(num_resamples=e.bootstrap_resamples, seed=e.bootstrap_seed)
  units = {key: metrics.unit_values(key[0], r.scores) for key, r in results.items()}
  out = {"bootstrap": dict(resamples=e.bootstrap_resamples, seed=e.bootstrap_seed,
                           confidence=bootstrap.CONFIDENCE, units=metrics.UNITS)}
  for (metric, method), v in units.items():
    unit = metrics.UNITS[metric]
    ci = bootstrap.mean_interval(v, **opts).to_dict() if len(v) > 1 else {}
    out.setdefault(metric, {}).setdefault("methods", {})[method] = dict(
        {"mean": float(v.mean()), "low": None, "high": None}, **ci, n=len(v))
    if ci:
      logging.info("evaluate: %s of %s: %s %.4f [95%% CI %.4f, %.4f] over %d %s.", metric,
                   method, _headline(e, metric), ci["mean"], ci["low"], ci["high"], len(v),
                   unit)
    ours = units.get((metric, "ours"))
    if method == "ours" or ours is None or len(v) < 2:
      continue
    diff, share = bootstrap.paired_difference(ours, v, **opts)
    out[metric].setdefault("ours_minus", {})[method] = dict(
        diff.to_dict(), share_ours_higher=share, n=len(v))
    logging.info("evaluate: %s, ours - %s: %+.4f [95%% CI %+.4f, %+.4f]; ours higher on "
                 "%.0f%% of %d %s.", metric, method, diff.mean, diff.low, diff.high,
                 100 * share, len(v), unit)
  return out


def evaluation_images(config, info) -> tuple[np.ndarray, np.ndarray]:
  """The test split's images and labels in the order both metrics see them:
  `config_lib.image_order`, shuffled with config.evaluation.seed."""
  shuffled = config_lib.image_order(config) == "shuffled"
  return input_pipeline.first_test_examples(
      config, info, seed=config.evaluation.seed if shuffled else None)


def _preempted(results: dict, stops: Sequence[str], kept: dict) -> dict:
  return {**results, "figures": [],
          "preempted": {"signal": stops[0], "kept": [f"{m}/{k}" for m, k in kept]}}


def _grids(model, variables, images, labels, e, sharding, step) -> Optional[metrics.Grids]:
  """The localisation grids (None without that metric), from every test image's logits."""
  if "localisation" not in e.metrics:
    return None
  n = e.grid_size
  logits = _logits(model, variables, images, sharding, e.batch_size * n * n)
  try:
    return metrics.select_grids(logits, labels, n=n, num_grids=e.num_grids,
                                   conf_thresh=e.conf_thresh, seed=e.seed,
                                   skip_bug=e.skip_bug)
  except ValueError as error:  # Too few confident, correct test images.
    raise config_lib.ConfigError(f"config.evaluation.num_grids={e.num_grids}: {error} "
                                 f"(checkpoint of step {step}; a longer training "
                                 "gives more).") from None


def _compute(metric, method, model, variables, e, images, labels, grids, removal, sharding,
             counted, record) -> Stored:
  """One result: its scores, (localisation) maps and JSON line, not yet written."""

  def attribute_fn(x, classes):
    fn = functools.partial(attribution.attribute, method, model, variables,
                           **e.options[method].to_dict())
    return _sharded(fn, sharding, e.batch_size, np.asarray(x), np.asarray(classes))

  counted.attribute_fn = attribute_fn  # Counts progress, keeps the first maps.
  if metric == "localisation":
    scores = metrics.localisation(counted, images, grids, e.grid_size, smooth=e.smooth,
                                     batch_size=e.batch_size)
    summary = metrics.score_summary(scores)
    headline, maps = summary["mean"], counted.first[:e.num_comparison]  # The first grids.
  else:
    x, y = images[removal], labels[removal]
    maps = np.concatenate([attribute_fn(x[i:i + e.batch_size], y[i:i + e.batch_size, None])
                           for i in range(0, len(x), e.batch_size)])[:, 0]
    scores = metrics.pixel_removal_curves(model, variables, x, maps, y,
                                             fraction=e.fraction, points=e.points,
                                             order=e.order, fill=e.fill)
    summary = metrics.curve_summary(scores, e.fraction)
    headline, maps = summary["last"], None
  line = {"metric": metric, "method": method, "step": record["checkpoint"]["step"],
          "headline": headline, **summary, **record}
  return Stored(line, scores, maps)


class _Counted:
  """self.attribute_fn, reporting progress (units: grids) and keeping its first output."""

  def __init__(self, report, done: int):
    self.attribute_fn, self.report, self.done, self.first = None, report, done, None

  def __call__(self, x, classes):
    out = self.attribute_fn(x, classes)
    self.first = out if self.first is None else self.first
    self.done += len(x)
    self.report(self.done, time.time())
    return out


def _logits(model, variables, images, sharding, batch_size) -> np.ndarray:
  """The logits of every test image, batch by batch over the mesh."""
  apply = jax.jit(model.apply)
  return np.concatenate([_sharded(functools.partial(apply, variables), sharding, batch_size,
                                  images[i:i + batch_size])
                         for i in range(0, len(images), batch_size)])


def _figures(out_dir, e, images, grids, info, results: dict, summary: dict) -> list:
  """The three figures, from `results` {(metric, method): Stored}: every
  configured result, each done (checked or just written), with the intervals
  of `summary` (`uncertainty`)."""
  paths, n = [], e.grid_size
  names = info.class_names or tuple(str(i) for i in range(info.num_classes))
  loc = {m: r.scores for (metric, m), r in results.items() if metric == "localisation"}
  if loc:
    intervals = {m: (v["mean"], v["low"], v["high"])
                 for m, v in summary["localisation"]["methods"].items()}
    paths.append(plotting.plot_localisation(loc, os.path.join(out_dir, "localisation.png"),
                                            n=n, intervals=intervals))
  curves = {m: r.scores for (metric, m), r in results.items() if metric == "pixel_removal"}
  if curves:
    bands = {m: bootstrap.curve_band(c, num_resamples=e.bootstrap_resamples,
                                     seed=e.bootstrap_seed)
             for m, c in curves.items() if len(c) > 1}
    paths.append(plotting.plot_pixel_removal(
        curves, os.path.join(out_dir, "pixel_removal.png"), fraction=e.fraction, bands=bands))
  comparison = {m: r.maps for (got, m), r in results.items() if got == "localisation"}
  if comparison and e.num_comparison:  # Grids: localisation was run.
    k = min(e.num_comparison, *(len(v) for v in comparison.values()))
    paths.append(plotting.plot_comparison(
        metrics.tile(images[grids.indices[:k]], n), {m: v[:k] for m, v in comparison.items()},
        [[names[c] for c in row] for row in grids.classes[:k]],
        os.path.join(out_dir, "comparison.png")))
  return paths
