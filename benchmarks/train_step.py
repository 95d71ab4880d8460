"""(a) Training step: forward, BCE-with-logits on one-hot targets, backward, Adam.

Each (batch, impl, dtype) runs in its own process, so the reported peak memory
(device peak_bytes_in_use, or the process's peak RSS on CPU) is that of the
training step alone. With --ceiling (the default for fused impls), (d): after
the memory figure is taken, the step's XLA cost-analysis FLOPs per second are
compared with the ceiling at the dominant layer's shape (benchmarks.ceiling),
measured interleaved with further steps in the same process.

  python -m benchmarks.train_step --batch 16 64 --impl fused materialized
  python -m benchmarks.train_step --model imagenet100_9l_l --batch 32 --impl fused \
      --dtype float32 bfloat16
"""

import argparse
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from benchmarks import ceiling
from benchmarks import common


def make_step(model, tx):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


class Step(NamedTuple):
  model: Any
  images: jax.Array
  traced: Any            # jax.stages.Traced, for the FLOP count.
  lowered: Any
  compiled: Any
  compile_s: float       # Trace, lower and compile.
  call: Callable[[], None]   # One step to completion, carrying the donated state.


def compiled_step(args, c) -> Step:
  """The configuration's training step, compiled, on synthetic data."""
  model, variables, x, y = common.build(args, c)
  tx = optax.adam(1e-4)
  state = [variables["params"], tx.init(variables["params"])]
  t = time.perf_counter()
  traced = make_step(model, tx).trace(state[0], state[1], x, y)
  lowered = traced.lower()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t

  def call():
    state[0], state[1], loss = compiled(state[0], state[1], x, y)
    loss.block_until_ready()

  return Step(model, x, traced, lowered, compiled, compile_s, call)


def run_one(args, c):
  step = compiled_step(args, c)
  model, x, compiled, compile_s, call = (step.model, step.images, step.compiled,
                                         step.compile_s, step.call)
  counted = common.flops(step.traced, step.lowered)
  flops = counted["flops"]
  timing = common.warm_and_time(call, args.reps, args.budget_s)
  mem = common.peak_memory()   # Before anything else is allocated.
  med = timing["median_s"]
  common.emit(common.record(
      "train_step", args, c, model, x, **timing, img_per_s=c["batch"] / med,
      compile_s=round(compile_s, 2), **counted,
      flop_per_s=flops / med if flops else None, **mem, **common.xla_memory(compiled)))

  if not args.ceiling:
    return
  # (d): ceiling and further steps, interleaved, so that both see the same load.
  layer = common.dominant_layer(model, x.shape[1])
  m = ceiling.measure(layer, c["batch"], jnp.dtype(c["dtype"]), args.ceiling_reps,
                      also={"train": call})
  ceil = m["ceiling_flop_per_s"]
  train = flops / m["train_median_s"] if flops else None
  common.emit(common.record(
      "flops_vs_ceiling", args, c, model, x, layer=layer, train_flops=flops,
      train_median_s=m["train_median_s"], train_flop_per_s=train,
      ceiling_flops=m["ceiling_flops"], conv_flop_per_s=m["conv_flop_per_s"],
      gemm_flop_per_s=m["gemm_flop_per_s"], ceiling_flop_per_s=ceil,
      ceiling_kind=m["ceiling_kind"], fraction=train / ceil if train else None,
      reps=m["reps"]))


def main():
  p = common.parser(__doc__, batch=(16, 64), impl=("fused", "materialized"))
  p.add_argument("--ceiling", action=argparse.BooleanOptionalAction,
                 default=None, help="(d) FLOP/s vs ceiling; default: for fused impls")
  p.add_argument("--ceiling-reps", type=int, default=3)
  args = p.parse_args()

  def run(args, c):
    if args.ceiling is None:
      args.ceiling = c["impl"] != "materialized"
    run_one(args, c)

  common.fan_out("benchmarks.train_step", args, run)


if __name__ == "__main__":
  main()
