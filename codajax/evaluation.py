"""--mode evaluate: the paper's interpretability evaluation of a checkpoint.

For every metric and method of `config.evaluation` (codajax.evaluation's
metrics of codajax.attribution's methods), `evaluate` writes under `out_dir`:

  <metric>/<method>.npy    the raw scores: localisation (grids, n*n) per
                           target, pixel_removal (images, points) per image
  localisation/<method>_maps.npy   its maps of the first num_comparison grids
  <metric>/<method>.json   one JSON line, written last: summary statistics
                           (mean, median, quartiles; for curves the curve mean
                           and the value at the last point), what the result
                           depends on (`result_store.result_record`: the checkpoint's step
                           and params digest, the model config, the data and
                           its image order, the metric's settings and the
                           method's options) and the count and sha256 of the
                           scores (and maps) it was written with
  localisation.png         box plots per method, Oracle and Uniform lines
  pixel_removal.png        the mean curve of every method
  comparison.png           a few grids with every method's map side by side
  done.json                written last: what summary.json and the figures
                           were drawn from, so that a rerun with nothing to
                           compute ends before start-up (codajax.evaluation_done)

A (metric, method) is done, and skipped when the command runs again, only when
its JSON line records the same dependencies and its .npy files agree with the
counts and digests the line records (`codajax.result_store`, the resume
cache). Otherwise it is
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
from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np

from codajax import attribution
from codajax import batching
from codajax import bootstrap
from codajax import config_lib
from codajax import evaluation_done
from codajax import metrics
from codajax import input_pipeline
from codajax import models
from codajax import plotting
from codajax import progress
from codajax import result_store


# ------------------------------------------------------------------ evaluate


class _Data(NamedTuple):
  """What every result of a run is computed from."""
  model: models.CoDANet
  variables: dict
  images: np.ndarray              # The test split, in `evaluation_images`' order.
  labels: np.ndarray
  grids: Optional[metrics.Grids]  # The localisation grids; None without that metric.
  sharding: Any                   # Over the mesh's 'data' axis.


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
  digest = result_store.params_digest(meta, variables["params"])
  images, labels = evaluation_images(config)
  data = _Data(model, variables, images, labels,
               _grids(model, variables, images, labels, e, sharding, step), sharding)
  jobs = [(metric, method) for metric in e.metrics for method in e.methods]
  results, kept = {}, {}
  with _progress(jobs, data, e, out_dir) as tracker:
    for metric, method in jobs:
      if stops:  # After the result in flight: stop before the next one.
        return _preempted(results, stops, kept)
      record = result_store.result_record(config, metric, method, step, digest)
      stored = result_store.cached(out_dir, metric, method, record)
      if stored is None:
        t = time.time()
        tracker.started((metric, method))
        stored = _computed(metric, method, data, e, record, tracker)
        if primary:
          result_store.write(out_dir, metric, method, stored)
        logging.info("evaluate: %s of %s: %s %.4f (%.0f s).", metric, method,
                     evaluation_done.headline_text(e, metric), stored.line["headline"],
                     time.time() - t)
      tracker.done((metric, method), computed=(metric, method) == tracker.current)
      results[f"{metric}/{method}"] = stored.line["headline"]
      kept[metric, method] = stored
  if stops:
    return _preempted(results, stops, kept)
  summary = uncertainty(kept, e)
  if primary:
    result_store.write_atomically(os.path.join(out_dir, SUMMARY),
                                  lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
  figures = _figures(out_dir, e, images, data.grids, info, kept, summary) if primary else []
  if primary:  # Last: so a rerun can tell that nothing changed (codajax.evaluation_done).
    evaluation_done.write_stamp(out_dir, e, jobs, figures)
  return {**results, "figures": figures}


SUMMARY = evaluation_done.SUMMARY


def _computed(metric: str, method: str, data: _Data, e, record: dict,
              tracker: progress.Progress) -> result_store.Stored:
  """One result of `method` under `metric` (`_EVALUATORS`): its scores, its
  (localisation) maps and its JSON line, not yet written; its units done
  go to `tracker`."""
  t = time.time()
  scores, headline, summary, maps = _EVALUATORS[metric](_attribute_fn(method, data, e), data, e,
                                                        tracker)
  line = {"metric": metric, "method": method, "step": record["checkpoint"]["step"],
          "headline": headline, **summary, **record, "seconds": round(time.time() - t, 1)}
  return result_store.Stored(line, scores, maps)


def _attribute_fn(method: str, data: _Data, e):
  """attribute_fn(x, classes) -> maps of `method` with its configured options,
  data-parallel over the mesh, e.batch_size images (or grids) per call."""
  fn = functools.partial(attribution.attribute, method, data.model, data.variables,
                         **e.options[method].to_dict())
  return lambda x, classes: batching.map_batches(fn, x, classes, batch_size=e.batch_size,
                                                 sharding=data.sharding)


def _localisation(attribute_fn, data: _Data, e, tracker: progress.Progress) -> tuple:
  """(scores (grids, n*n), headline, summary, the maps of the first
  num_comparison grids, which the comparison figure shows)."""
  first = []

  @tracker.counting
  def keeping_first(x, classes):
    maps = attribute_fn(x, classes)
    if not first:
      first.append(maps)
    return maps

  scores = metrics.localisation(keeping_first, data.images, data.grids, e.grid_size,
                                smooth=e.smooth, batch_size=e.batch_size)
  summary = metrics.score_summary(scores)
  return scores, summary["mean"], summary, first[0][:e.num_comparison]


def _pixel_removal(attribute_fn, data: _Data, e, tracker: progress.Progress) -> tuple:
  """(curves (images, points) of the first num_images test images, headline,
  summary, None: no maps are kept)."""
  n = _units(data, e)["pixel_removal"]
  x, y = data.images[:n], data.labels[:n]
  maps = attribute_fn(x, y[:, None])[:, 0]
  scores = metrics.pixel_removal_curves(data.model, data.variables, x, maps, y,
                                        fraction=e.fraction, points=e.points, order=e.order,
                                        fill=e.fill, on_images=tracker.reached)
  summary = metrics.curve_summary(scores, e.fraction)
  return scores, summary["last"], summary, None


# One evaluator per metric: (attribute_fn, data, e, tracker) -> (scores, headline, summary,
# maps); each reports its units done to the tracker (`progress.Progress`).
_EVALUATORS = {"localisation": _localisation, "pixel_removal": _pixel_removal}


def _units(data: _Data, e) -> dict:
  """Each metric's units of work (and of progress): grids, images."""
  return {"localisation": len(data.grids.indices) if data.grids is not None else 0,
          "pixel_removal": min(e.num_images, len(data.images))}


def _progress(jobs: list, data: _Data, e, out_dir: str) -> progress.Progress:
  """The run's progress log, each result weighted by its cost (`codajax.progress`)."""
  costs = {(metric, method): progress.unit_cost(metric, method, e.options[method].to_dict(),
                                                data.images.shape[1], e.grid_size, e.points)
           for metric, method in jobs}
  measured = {job: s for job in jobs
              if (s := progress.stored_seconds_per_unit(out_dir, *job, e.grid_size))}
  return progress.Progress(jobs, _units(data, e), costs, measured)


def uncertainty(results: dict, e) -> dict:
  """evaluation/summary.json: for {(metric, method): Stored}, per metric and
  method the mean over its units (`metrics.unit_values`) with its 95%
  bootstrap CI, and, where "ours" was run, per other method the paired
  difference ours - method on the same units with its CI and the share of
  units where ours is higher. Intervals need 2 units or more (else null).
  Logged as `evaluation_done.log_summary` logs a stored one."""
  opts = dict(num_resamples=e.bootstrap_resamples, seed=e.bootstrap_seed)
  units = {key: metrics.unit_values(key[0], r.scores) for key, r in results.items()}
  out = {"bootstrap": dict(resamples=e.bootstrap_resamples, seed=e.bootstrap_seed,
                           confidence=bootstrap.CONFIDENCE, units=metrics.UNITS)}
  for (metric, method), v in units.items():
    ci = bootstrap.mean_interval(v, **opts).to_dict() if len(v) > 1 else {}
    out.setdefault(metric, {}).setdefault("methods", {})[method] = dict(
        {"mean": float(v.mean()), "low": None, "high": None}, **ci, n=len(v))
    ours = units.get((metric, "ours"))
    if method == "ours" or ours is None or len(v) < 2:
      continue
    diff, share = bootstrap.paired_difference(ours, v, **opts)
    out[metric].setdefault("ours_minus", {})[method] = dict(
        diff.to_dict(), share_ours_higher=share, n=len(v))
  evaluation_done.log_summary(out, e)
  return out


def evaluation_images(config) -> tuple[np.ndarray, np.ndarray]:
  """The test split's images and labels in the order both metrics see them:
  `config_lib.image_order`, shuffled with config.evaluation.seed."""
  shuffled = config_lib.image_order(config) == "shuffled"
  return input_pipeline.first_test_examples(
      config, seed=config.evaluation.seed if shuffled else None)


def _preempted(results: dict, stops: Sequence[str], kept: dict) -> dict:
  return {**results, "figures": [],
          "preempted": {"signal": stops[0], "kept": [f"{m}/{k}" for m, k in kept]}}


def _grids(model, variables, images, labels, e, sharding, step) -> Optional[metrics.Grids]:
  """The localisation grids (None without that metric), from every test image's logits."""
  if "localisation" not in e.metrics:
    return None
  n = e.grid_size
  logits = batching.map_batches(functools.partial(batching.forward, model, variables),
                                images, batch_size=e.batch_size * n * n,
                                sharding=sharding)
  try:
    return metrics.select_grids(logits, labels, n=n, num_grids=e.num_grids,
                                   conf_thresh=e.conf_thresh, seed=e.seed,
                                   skip_bug=e.skip_bug)
  except ValueError as error:  # Too few confident, correct test images.
    raise config_lib.ConfigError(f"config.evaluation.num_grids={e.num_grids}: {error} "
                                 f"(checkpoint of step {step}; a longer training "
                                 "gives more).") from None


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
