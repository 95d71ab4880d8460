"""Inference: the jitted forward `model.apply` (logits of a batch)."""

import time

import jax

from benchmarks import common


def run(m: common.Measurement) -> None:
  model, variables, x, _ = common.build(m)
  t = time.perf_counter()
  traced = jax.jit(model.apply).trace(variables, x)
  lowered = traced.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  counted = common.flops(traced, lowered)
  flops = counted["flops"]
  timing = common.warm_and_time(lambda: compiled(variables, x).block_until_ready(),
                                m.reps, m.budget_s)
  med = timing["median_s"]
  common.emit(common.record(
      "inference", m, x, **timing, img_per_s=m.batch / med,
      compile_s=round(compile_s, 2), **counted, flop_per_s=flops / med if flops else None,
      **common.peak_memory(), **common.xla_memory(compiled)))
