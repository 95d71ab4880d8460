"""(b) Inference forward: logits of a batch, jitted.

  python -m benchmarks.inference --batch 64 --impl fused materialized
"""

import time

import jax

from benchmarks import common


def run_one(args, c):
  model, variables, x, _ = common.build(args, c)
  t = time.perf_counter()
  traced = jax.jit(model.apply).trace(variables, x)
  lowered = traced.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  counted = common.flops(traced, lowered)
  flops = counted["flops"]
  timing = common.warm_and_time(lambda: compiled(variables, x).block_until_ready(),
                                args.reps, args.budget_s)
  med = timing["median_s"]
  common.emit(common.record(
      "inference", args, c, model, x, **timing, img_per_s=c["batch"] / med,
      compile_s=round(compile_s, 2), **counted, flop_per_s=flops / med if flops else None,
      **common.peak_memory(), **common.xla_memory(compiled)))


def main():
  p = common.parser(__doc__, batch=(64,), impl=("fused", "materialized"), reps=5)
  common.fan_out("benchmarks.inference", p.parse_args(), run_one)


if __name__ == "__main__":
  main()
