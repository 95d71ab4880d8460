"""--mode evaluate: the paper's interpretability evaluation of a checkpoint.

For every metric and method of `config.evaluation` (codajax.evaluation's
metrics of codajax.attribution's methods), `evaluate` writes under `out_dir`:

  <metric>/<method>.npy    the raw scores: localisation (grids, n*n) per
                           target, pixel_removal (images, points) per image
  <metric>/<method>.json   one JSON line: summary statistics (mean, median,
                           quartiles; for curves the curve mean and the value
                           at the last point), the checkpoint step and the
                           exact settings and options used
  localisation/<method>_maps.npy   its maps of the first num_comparison grids
  localisation.png         box plots per method, Oracle and Uniform lines
  pixel_removal.png        the mean curve of every method
  comparison.png           a few grids with every method's map side by side

A (metric, method) whose JSON line holds the same step and settings is not
recomputed when the command runs again; each result is written atomically, so
a killed run loses at most the one in flight. Attributions run data-parallel
over the mesh's 'data' axis; every process reads the whole test split and
process 0 writes.
"""

import functools
import json
import logging
import os
import time

from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import numpy as np

from codajax import attribution
from codajax import config_lib
from codajax import evaluation
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


def _settings(e, metric: str, method: str) -> dict:
  """What a stored result depends on: the metric's settings and the method's options."""
  keys = (("grid_size", "num_grids", "conf_thresh", "skip_bug", "smooth", "seed")
          if metric == "localisation" else ("num_images", "fraction", "points", "order", "fill"))
  return {"metric": {k: e[k] for k in keys}, "options": e.options[method].to_dict()}


def _write_atomically(path: str, write) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _done(path: str, step: int, settings: dict) -> bool:
  try:
    with open(path) as f:
      stored = json.loads(f.readline())
  except (OSError, ValueError):
    return False
  return stored.get("step") == step and stored.get("settings") == json.loads(
      json.dumps(settings))


def evaluate(model: models.CoDANet, variables, config, info, step: int, out_dir: str,
             sharding) -> dict:
  """Runs the evaluation (see the module docstring); returns {"<metric>/<method>":
  headline figure (localisation: mean score; pixel_removal: the value at the
  last point)} plus "figures", the paths of the figures written."""
  e, n = config.evaluation, config.evaluation.grid_size
  primary = jax.process_index() == 0
  names = info.class_names or tuple(str(i) for i in range(info.num_classes))
  images, labels = input_pipeline.first_test_examples(config, info)
  logits = _logits(model, variables, images, sharding, e.batch_size * n * n)
  grids = None
  if "localisation" in e.metrics:
    try:
      grids = evaluation.select_grids(logits, labels, n=n, num_grids=e.num_grids,
                                      conf_thresh=e.conf_thresh, seed=e.seed,
                                      skip_bug=e.skip_bug)
    except ValueError as error:  # Too few confident, correct test images.
      raise config_lib.ConfigError(f"config.evaluation.num_grids={e.num_grids}: {error} "
                                   f"(checkpoint of step {step}; a longer training "
                                   "gives more).") from None
  removal = slice(0, min(e.num_images, len(images)))
  jobs = [(metric, method) for metric in e.metrics for method in e.methods]
  units = {"localisation": len(grids.indices) if grids is not None else 0,
           "pixel_removal": removal.stop}
  report = periodic_actions.ReportProgress(
      num_train_steps=sum(units[m] for m, _ in jobs), every_secs=30.0)
  done, results = 0, {}
  for metric, method in jobs:
    folder = os.path.join(out_dir, metric)
    settings = _settings(e, metric, method)
    path = os.path.join(folder, f"{method}.json")

    def attribute_fn(x, classes, method=method):
      fn = functools.partial(attribution.attribute, method, model, variables,
                             **e.options[method].to_dict())
      return _sharded(fn, sharding, e.batch_size, np.asarray(x), np.asarray(classes))

    if _done(path, step, settings):
      logging.info("evaluate: %s of %s is done (%s); skipped.", metric, method, path)
      with open(path) as f:
        results[f"{metric}/{method}"] = json.loads(f.readline())["headline"]
      done += units[metric]
      continue
    t = time.time()
    if metric == "localisation":
      counted = _Counted(attribute_fn, report, done)
      scores = evaluation.localisation(counted, images, grids, n, smooth=e.smooth,
                                       batch_size=e.batch_size)
      summary = evaluation.score_summary(scores)
      headline = summary["mean"]
      comparison = counted.first[:e.num_comparison]  # The maps of the first grids.
    else:
      x, y = images[removal], labels[removal]
      maps = np.concatenate([attribute_fn(x[i:i + e.batch_size], y[i:i + e.batch_size, None])
                             for i in range(0, len(x), e.batch_size)])[:, 0]
      scores = evaluation.pixel_removal_curves(model, variables, x, maps, y,
                                               fraction=e.fraction, points=e.points,
                                               order=e.order, fill=e.fill)
      summary = evaluation.curve_summary(scores, e.fraction)
      headline = summary["last"]
    done += units[metric]
    report(done, time.time())
    results[f"{metric}/{method}"] = headline
    if primary:
      os.makedirs(folder, exist_ok=True)
      _write_atomically(os.path.join(folder, f"{method}.npy"),
                        lambda f, s=scores: np.save(f, s))
      if metric == "localisation":
        _write_atomically(os.path.join(folder, f"{method}_maps.npy"),
                          lambda f, s=comparison: np.save(f, s))
      line = {"metric": metric, "method": method, "step": step, "headline": headline,
              **summary, "seconds": round(time.time() - t, 1), "settings": settings}
      _write_atomically(path, lambda f, l=line: f.write((json.dumps(l) + "\n").encode()))
    logging.info("evaluate: %s of %s: %.4f (%.0f s).", metric, method, headline,
                 time.time() - t)
  figures = _figures(out_dir, e, images, grids, names) if primary else []
  return {**results, "figures": figures}


class _Counted:
  """attribute_fn that reports progress (units: grids) and keeps its first output."""

  def __init__(self, attribute_fn, report, done: int):
    self.attribute_fn, self.report, self.done, self.first = attribute_fn, report, done, None

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


def _figures(out_dir, e, images, grids, names) -> list:
  """The three figures, from the stored results of the configured methods."""
  paths, n = [], e.grid_size
  comparison = {m: np.load(os.path.join(out_dir, "localisation", f"{m}_maps.npy"))
                for m in e.methods
                if os.path.exists(os.path.join(out_dir, "localisation", f"{m}_maps.npy"))}
  for metric, draw in (("localisation", plotting.plot_localisation),
                       ("pixel_removal", plotting.plot_pixel_removal)):
    stored = {m: np.load(os.path.join(out_dir, metric, f"{m}.npy")) for m in e.methods
              if os.path.exists(os.path.join(out_dir, metric, f"{m}.npy"))}
    if metric in e.metrics and stored:
      paths.append(draw(stored, os.path.join(out_dir, f"{metric}.png"), n=n,
                        fraction=e.fraction))
  if comparison and e.num_comparison and grids is not None:  # Grids: localisation was run.
    k = min(e.num_comparison, *(len(v) for v in comparison.values()))
    paths.append(plotting.plot_comparison(
        evaluation.tile(images[grids.indices[:k]], n), {m: v[:k] for m, v in comparison.items()},
        [[names[c] for c in row] for row in grids.classes[:k]],
        os.path.join(out_dir, "comparison.png")))
  return paths
