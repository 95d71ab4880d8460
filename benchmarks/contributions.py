"""explain.contributions for the classes of a batch against model.apply.

Both are jitted and timed interleaved in one process (same batch, same
parameters, the model's own impl and contraction), so their ratio sees one
load. `Measurement.num_classes` explains classes 0..K-1 (default: all).
"""

import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from codajax import explain


def run(m: common.Measurement) -> None:
  model, variables, x, _ = common.build(m)
  k = m.num_classes or model.num_classes
  classes = jnp.arange(k)
  forward = jax.jit(model.apply).lower(variables, x).compile()
  contrib = jax.jit(lambda v, x: explain.contributions(model, v, x, classes)).lower(
      variables, x).compile()
  calls = {"forward": lambda: forward(variables, x).block_until_ready(),
           "contributions": lambda: contrib(variables, x).block_until_ready()}
  for fn in calls.values():
    fn()
  times = {name: [] for name in calls}
  start = time.perf_counter()
  for _ in range(max(1, m.reps)):
    for name, fn in calls.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    if time.perf_counter() - start > m.budget_s:
      break
  med = {name: statistics.median(v) for name, v in times.items()}
  common.emit(common.record(
      "contributions", m, x, num_classes=k,
      forward_median_s=med["forward"], contributions_median_s=med["contributions"],
      ratio=med["contributions"] / med["forward"],
      forward_img_per_s=m.batch / med["forward"],
      contributions_img_per_s=m.batch / med["contributions"],
      times_s={n: [round(v, 4) for v in t] for n, t in times.items()},
      **common.peak_memory()))
