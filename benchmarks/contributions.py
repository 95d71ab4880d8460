"""(c) explain.contributions for all classes of a batch vs the inference forward.

Both are jitted and timed interleaved in one process (same batch, same
parameters, the model's own impl), so the ratio sees one load.

  python -m benchmarks.contributions --batch 16
  python -m benchmarks.contributions --batch 16 --num-classes 1   # one class
"""

import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from codajax import explain


def run_one(args, c):
  model, variables, x, _ = common.build(args, c)
  k = args.num_classes or model.num_classes
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
  for _ in range(max(1, args.reps)):
    for name, fn in calls.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    if time.perf_counter() - start > args.budget_s:
      break
  med = {name: statistics.median(v) for name, v in times.items()}
  common.emit(common.record(
      "contributions", args, c, model, x, num_classes=k,
      forward_median_s=med["forward"], contributions_median_s=med["contributions"],
      ratio=med["contributions"] / med["forward"],
      forward_img_per_s=c["batch"] / med["forward"],
      contributions_img_per_s=c["batch"] / med["contributions"],
      times_s={n: [round(v, 4) for v in t] for n, t in times.items()},
      **common.peak_memory()))


def main():
  p = common.parser(__doc__, batch=(16,), impl=("fused",), reps=7)
  p.add_argument("--num-classes", type=int, default=None,
                 help="explain classes 0..K-1 (default: all)")
  common.fan_out("benchmarks.contributions", p.parse_args(), run_one)


if __name__ == "__main__":
  main()
