"""The practical FLOP/s ceiling at the dominant layer's shape.

Two forward+backward figures (output, input gradient, kernel gradient) for the
layer of the model with the most multiply-adds, as the fused layer computes it
(C_in -> C_out*(R+1) + R channels, k x k): a plain convolution, and the
equivalent patches x matrix product (dot_general, patches precomputed). The
better of the two is the ceiling that the training step's FLOP/s is compared
to (`benchmarks.train_step` measures both in one process; `run` measures the
ceiling alone).
"""

import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks import common


def ceiling_fns(layer: dict, batch: int, dtype) -> dict:
  """{"conv": (fn, args), "gemm": (fn, args)}, fwd+bwd, and their FLOPs."""
  h, w = layer["in_hw"]
  ho, wo = layer["out_hw"]
  c_in, n_out, k = layer["in_channels"], layer["out_channels"], layer["kernel"]
  s, p = layer["stride"], layer["padding"]
  d = c_in * k * k
  m = batch * ho * wo
  keys = jax.random.split(jax.random.key(1), 5)
  x = jax.random.uniform(keys[0], (batch, h, w, c_in), dtype)
  kernel = (jax.random.normal(keys[1], (k, k, c_in, n_out)) / d ** 0.5).astype(dtype)
  dy = jax.random.normal(keys[2], (batch, ho, wo, n_out), dtype)
  patches = jax.random.uniform(keys[3], (m, d), dtype)
  dq = dy.reshape(m, n_out)

  def conv_fwd_bwd(x, kernel, dy):
    conv = lambda x, kernel: jax.lax.conv_general_dilated(
        x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, vjp = jax.vjp(conv, x, kernel)
    return y, vjp(dy)

  def gemm_fwd_bwd(patches, wmat, dq):
    y, vjp = jax.vjp(jnp.dot, patches, wmat)
    return y, vjp(dq)

  return {"conv": (jax.jit(conv_fwd_bwd), (x, kernel, dy)),
          "gemm": (jax.jit(gemm_fwd_bwd), (patches, kernel.reshape(d, n_out), dq)),
          "flops": 3 * 2 * m * d * n_out}


def measure(layer: dict, batch: int, dtype, reps: int,
            also: dict[str, Callable[[], Any]] | None = None) -> dict:
  """Median FLOP/s of conv and GEMM fwd+bwd, interleaved, plus the ceiling.

  `also`: further blocking calls timed in the same rounds, after the two
  (e.g. training steps, so that they see the same load); their medians come
  back as "<name>_median_s". "reps" is the number of rounds.
  """
  fns = ceiling_fns(layer, batch, dtype)
  calls = {}
  for name in ("conv", "gemm"):
    fn, a = fns[name]
    compiled = fn.lower(*a).compile()
    jax.block_until_ready(compiled(*a))
    calls[name] = functools.partial(lambda c, a: jax.block_until_ready(c(*a)), compiled, a)
  calls.update(also or {})
  times = {name: [] for name in calls}
  for _ in range(max(1, reps)):
    for name, call in calls.items():
      t = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - t)
  out = {"ceiling_layer": layer, "ceiling_flops": fns["flops"], "reps": max(1, reps)}
  for name in calls:
    out[f"{name}_median_s"] = statistics.median(times[name])
  for name in ("conv", "gemm"):
    out[f"{name}_flop_per_s"] = fns["flops"] / out[f"{name}_median_s"]
  out["ceiling_flop_per_s"] = max(out["conv_flop_per_s"], out["gemm_flop_per_s"])
  out["ceiling_kind"] = "conv" if out["conv_flop_per_s"] >= out["gemm_flop_per_s"] else "gemm"
  return out


def run(m: common.Measurement) -> None:
  model, _, x, _ = common.build(m)
  layer = common.dominant_layer(model, x.shape[1])
  common.emit(common.record("ceiling", m, x,
                            **measure(layer, m.batch, jnp.dtype(m.dtype), m.reps)))
