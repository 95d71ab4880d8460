"""The training step: codajax.steps.train_step, jitted with the state donated
as the trainer does, and its FLOP/s against the ceiling.

The step is the trainer's own (forward, BCE-with-logits on one-hot targets,
backward, Adam) from a neutral config: constant learning rate 1e-4, no
weight decay, no matrix regulariser, no gradient accumulation.

`run` reports the step's time, img/s and peak memory (device
peak_bytes_in_use, or the process's peak RSS on CPU: the process runs this
measurement alone). Then, if `Measurement.ceiling`, after the memory figure
is taken: the step's XLA cost-analysis FLOPs per second against the ceiling
at the dominant layer's shape (`benchmarks.ceiling`), measured interleaved
with further steps in the same process so that both see the same load.
"""

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from benchmarks import ceiling
from benchmarks import common
from codajax import config_lib
from codajax import steps

LEARNING_RATE = 1e-4


class Step(NamedTuple):
  model: Any
  images: jax.Array
  traced: Any            # jax.stages.Traced, for the FLOP count.
  lowered: Any
  compiled: Any
  compile_s: float       # Trace, lower and compile.
  call: Callable[[], None]   # One step to completion, carrying the donated state.


def compiled_step(m: common.Measurement) -> Step:
  """codajax's training step for measurement m, compiled, on synthetic data."""
  model, variables, x, labels = common.build(m)
  config = config_lib.base_config()
  config.learning_rate = LEARNING_RATE
  config.lr_schedule = "constant"
  config.weight_decay = 0.0
  config.matrix_reg_lambda = 0.0
  config.grad_accum_steps = 1
  lr_fn = steps.learning_rate_fn(config, updates_per_epoch=1, total_updates=1)
  tx = steps.make_optimizer(config, lr_fn)
  params = variables["params"]
  state = [steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))]
  batch = {"image": x, "label": labels}
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, config=config,
                                   rng=jax.random.key(1), lr_fn=lr_fn),
                 donate_argnums=0)
  t = time.perf_counter()
  traced = step.trace(state[0], batch)
  lowered = traced.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t

  def call():
    state[0], metrics = compiled(state[0], batch)
    metrics["train/loss"].block_until_ready()

  return Step(model, x, traced, lowered, compiled, compile_s, call)


def run(m: common.Measurement) -> None:
  step = compiled_step(m)
  model, x, compiled, compile_s, call = (step.model, step.images, step.compiled,
                                         step.compile_s, step.call)
  counted = common.flops(step.traced, step.lowered)
  flops = counted["flops"]
  timing = common.warm_and_time(call, m.reps, m.budget_s)
  mem = common.peak_memory()   # Before anything else is allocated.
  med = timing["median_s"]
  common.emit(common.record(
      "train_step", m, x, **timing, img_per_s=m.batch / med,
      compile_s=round(compile_s, 2), **counted,
      flop_per_s=flops / med if flops else None, **mem, **common.xla_memory(compiled)))

  if not m.ceiling:
    return
  layer = common.dominant_layer(model, x.shape[1])
  c = ceiling.measure(layer, m.batch, jnp.dtype(m.dtype), m.ceiling_reps,
                      also={"train": call})
  ceil = c["ceiling_flop_per_s"]
  train_flop_per_s = flops / c["train_median_s"] if flops else None
  common.emit(common.record(
      "flops_vs_ceiling", m, x, layer=layer, train_flops=flops,
      train_median_s=c["train_median_s"], train_flop_per_s=train_flop_per_s,
      ceiling_flops=c["ceiling_flops"], conv_flop_per_s=c["conv_flop_per_s"],
      gemm_flop_per_s=c["gemm_flop_per_s"], ceiling_flop_per_s=ceil,
      ceiling_kind=c["ceiling_kind"],
      fraction=train_flop_per_s / ceil if train_flop_per_s else None, reps=c["reps"]))
