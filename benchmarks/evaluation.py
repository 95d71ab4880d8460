"""The interpretability evaluation's cost: `attribution.attribute` on grids.

One measurement is one method (`Measurement.method`, one of
`attribution.METHODS`) on `Measurement.batch` grids of n x n synthetic images
of the preset's size (`Measurement.grid_n`, default 3: CIFAR 9L-S explains
96x96 inputs), each grid explained for the classes of its n*n cells at once
(classes (batch, n*n), distinct within a grid), as
`metrics.localisation` calls it. The parameters are a random init
(`model.init`): the cost of a method does not depend on the weights (LIME's
superpixels depend on the image only).

Records (bench "evaluation"): seconds per grid at the method's default
settings, grids/s and the estimated time of the 500-grid evaluation
(500 / grids/s). The expensive methods can be measured with less work and
scaled linearly to their defaults (`scale` in the record; 1 when measured
at the defaults):

  occ5, occ9  `eval_masks` > 0: the finest stride whose mask grid has at most
              `eval_masks` masks (one chunk of them), scaled to the default
              stride's masks (2304 at 96x96, stride 2).
  rise        `eval_masks` > 0: that many masks (default 6000).
  lime        `eval_masks` > 0: that many samples (default 256). LIME's
              superpixels and regressions do not grow with the samples, so
              the scaled figure overestimates them.
  intgrad     `eval_steps` > 0: that many integration steps (default 20).

Two goals are measured with the pair timed interleaved in one process, so
their ratio sees one load:

  ours  the grid's attribution for all n*n targets vs one forward of the grid
        (model.apply, same batch): at most 3x the time.
  occ5  masked forwards per second (masks per grid / seconds per grid) vs the
        plain jitted forward's img/s at the grid's size and batch = the
        occlusion chunk actually used (times the grids): at least 0.8x.
"""

import importlib.util
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from codajax import attribution
from codajax import metrics
from codajax import models

NUM_GRIDS = 500     # Grids of the localisation evaluation (the authors' 500 3x3 grids).
SLOW = ("intgrad", "occ5", "occ9", "rise", "lime")


def lime_available() -> bool:
  return (importlib.util.find_spec("lime") is not None
          and importlib.util.find_spec("skimage") is not None)


def occlusion_stride(size: int, max_masks: int, default: int) -> int:
  """The finest stride >= default whose (size/stride)^2 anchors are at most max_masks."""
  stride = default
  while math.ceil(size / stride) ** 2 > max_masks and stride < size:
    stride += 1
  return stride


def measured_options(method: str, size: int, eval_masks: int,
                     eval_steps: int) -> tuple[dict, float, int | None]:
  """(options measured with, scale to the defaults' work, masks per forward pass or None)."""
  defaults = attribution.OPTIONS[method]
  if method in ("occ5", "occ9"):
    full = math.ceil(size / defaults["stride"]) ** 2
    opts = {}
    if eval_masks > 0:
      opts["stride"] = occlusion_stride(size, eval_masks, defaults["stride"])
    masks = math.ceil(size / opts.get("stride", defaults["stride"])) ** 2
    # The chunk the scan runs (batching.sum_chunks): at most the masks.
    opts["chunk"] = min(defaults["chunk"], masks)
    return opts, full / masks, masks
  if method == "rise":
    if eval_masks <= 0:
      return {}, 1.0, defaults["num_masks"]
    return ({"num_masks": eval_masks, "chunk": min(defaults["chunk"], eval_masks)},
            defaults["num_masks"] / eval_masks, eval_masks)
  if method == "lime":
    if eval_masks <= 0:
      return {}, 1.0, defaults["num_samples"]
    return ({"num_samples": eval_masks, "batch_size": min(defaults["batch_size"], eval_masks)},
            defaults["num_samples"] / eval_masks, eval_masks)
  if method == "intgrad" and eval_steps > 0:
    return ({"steps": eval_steps, "chunk": min(defaults["chunk"], eval_steps)},
            defaults["steps"] / eval_steps, None)
  return {}, 1.0, None


def random_grids(model, m: common.Measurement):
  """(grids (B, n*H, n*W, 3), classes (B, n*n)): random cells, distinct classes per grid."""
  n = m.grid_n
  k = n * n
  if k > model.num_classes:
    raise ValueError(f"a {n}x{n} grid needs {k} distinct classes; the model has "
                     f"{model.num_classes}.")
  kx, kc = jax.random.split(jax.random.key(0))
  cells = jax.random.uniform(kx, (m.batch, k, m.size, m.size, 3), jnp.float32)
  classes = jax.vmap(lambda key: jax.random.permutation(key, model.num_classes)[:k])(
      jax.random.split(kc, m.batch))
  return metrics.tile(cells, n), classes


def interleaved(calls: dict, min_rounds: int, max_rounds: int, budget_s: float) -> dict:
  """Medians of the calls timed in turn (each warmed up once): at least min_rounds
  rounds, at most max_rounds, stopping once budget_s has passed."""
  for fn in calls.values():
    fn()
  times = {name: [] for name in calls}
  start = time.perf_counter()
  for i in range(max(min_rounds, max_rounds, 1)):
    if i >= min_rounds and time.perf_counter() - start > budget_s:
      break
    for name, fn in calls.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def run(m: common.Measurement) -> None:
  method = m.method
  if method not in attribution.METHODS:
    raise ValueError(f"evaluation: method must be one of {attribution.METHODS}, got {method!r}.")
  model = models.PRESETS[m.model](impl=m.impl, contraction=m.contraction,
                                  dtype=jnp.dtype(m.dtype), remat=m.remat)
  x, classes = random_grids(model, m)
  side = x.shape[1]
  base = dict(method=method, grid_n=m.grid_n, targets_per_grid=classes.shape[1],
              cell_size=m.size, params="random_init", num_grids_estimated=NUM_GRIDS)
  if method == "lime" and not lime_available():
    common.emit(common.record("evaluation", m, x, **base, skipped="lime not importable",
                              grid_s=None, grids_per_s=None, est_500_grids_s=None))
    print(f"# evaluation {method}: skipped, lime is not importable", file=sys.stderr)
    return
  variables = jax.jit(model.init)(jax.random.key(1), x[:1])
  opts, scale, masks = measured_options(method, side, m.eval_masks, m.eval_steps)

  def explain():
    return jax.block_until_ready(attribution.attribute(method, model, variables, x, classes,
                                                       **opts))

  extra = {}
  t = time.perf_counter()
  if method == "ours":
    forward = jax.jit(model.apply).lower(variables, x).compile()
    times = interleaved({"forward": lambda: forward(variables, x).block_until_ready(),
                         "ours": explain}, min_rounds=3, max_rounds=max(m.reps, 5),
                        budget_s=m.budget_s)
    fwd = statistics.median(times["forward"])
    measured = times["ours"]
    extra = dict(forward_median_s=fwd, forward_times_s=[round(v, 4) for v in times["forward"]],
                 ratio=statistics.median(measured) / fwd)
  elif method == "occ5":
    chunk = opts["chunk"] * m.batch                 # Images per masked forward.
    xb = jnp.broadcast_to(x[:1], (chunk, *x.shape[1:]))
    forward = jax.jit(model.apply).lower(variables, xb).compile()
    times = interleaved({"inference": lambda: forward(variables, xb).block_until_ready(),
                         "occ5": explain}, min_rounds=2, max_rounds=m.reps,
                        budget_s=m.budget_s)
    inf = statistics.median(times["inference"])
    measured = times["occ5"]
    masked_per_s = m.batch * masks / statistics.median(measured)
    extra = dict(inference_batch=chunk, inference_median_s=inf,
                 inference_img_per_s=chunk / inf,
                 inference_times_s=[round(v, 4) for v in times["inference"]],
                 masked_forwards_per_s=masked_per_s, ratio=masked_per_s / (chunk / inf))
  else:
    explain()                                       # Compiles.
    warm = time.perf_counter() - t
    reps = 1 if method in SLOW else m.reps
    measured = common.time_calls(explain, reps, m.budget_s)
    extra = dict(first_s=round(warm, 4))
  med = statistics.median(measured)
  grid_s = med * scale / m.batch
  rec = common.record(
      "evaluation", m, x, **base, options_measured=opts, scale=scale,
      masks_measured=masks, masks_per_grid=None if masks is None else round(masks * scale),
      measured_median_s=med, times_s=[round(v, 4) for v in measured], reps=len(measured),
      grid_s=grid_s, grids_per_s=1.0 / grid_s, est_500_grids_s=NUM_GRIDS * grid_s,
      wall_s=round(time.perf_counter() - t, 2), **extra, **common.peak_memory())
  common.emit(rec)
  note = f" (measured {opts}, x{scale:g})" if scale != 1 else ""
  line = (f"# evaluation {method:8s} {grid_s:9.3f} s/grid  {1 / grid_s:9.4f} grids/s  "
          f"500 grids ~ {NUM_GRIDS * grid_s / 3600:8.3f} h{note}; median of {len(measured)}")
  if method == "ours":
    line += f"; forward {extra['forward_median_s']:.3f} s, ours/forward {extra['ratio']:.2f}x"
  if method == "occ5":
    line += (f"; {extra['masked_forwards_per_s']:.2f} masked fwd/s vs inference "
             f"{extra['inference_img_per_s']:.2f} img/s (batch {extra['inference_batch']}): "
             f"{extra['ratio']:.2f}x")
  print(line, file=sys.stderr, flush=True)
