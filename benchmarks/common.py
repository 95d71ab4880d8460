"""Shared pieces: flags, synthetic data, timing, memory, FLOPs, JSON lines."""

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codajax import dau
from codajax import models

# Input sizes of the presets: CIFAR-10 32x32; ImageNet-100 240x240 crops, as in
# the reference code's 9L-L experiment (RandomCrop/CenterCrop 240 after Resize 256).
IMAGE_SIZES = {"cifar10_9l_s": 32, "imagenet100_9l_l": 240, "tiny": 16}
NEGATABLE = {"ceiling"}   # Boolean flags with a --no- form.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(doc: str, *, batch: Sequence[int], impl: Sequence[str], reps: int = 3,
           budget_s: float = 60.0) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="cifar10_9l_s", choices=sorted(models.PRESETS))
  p.add_argument("--image-size", type=int, default=None,
                 help="default: the preset's (cifar10_9l_s 32, imagenet100_9l_l 240)")
  p.add_argument("--batch", type=int, nargs="+", default=list(batch))
  p.add_argument("--impl", nargs="+", default=list(impl), choices=models.IMPLS)
  p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
  p.add_argument("--remat", action="store_true", help="per-layer jax.checkpoint")
  p.add_argument("--reps", type=int, default=reps, help="timed runs (at most)")
  p.add_argument("--budget-s", type=float, default=budget_s,
                 help="stop repeating once a measurement has taken this long "
                      "(at least one timed run)")
  return p


def configs(args) -> list[dict[str, Any]]:
  """One dict per (batch, impl, dtype) combination."""
  return [dict(batch=b, impl=i, dtype=t)
          for b, i, t in itertools.product(args.batch, args.impl, args.dtype)]


def argv_of(args, **overrides) -> list[str]:
  """Flags that reproduce `args` (with overrides) for a child process."""
  out = []
  for k, v in {**vars(args), **overrides}.items():
    flag = "--" + k.replace("_", "-")
    if isinstance(v, bool):
      out += [flag] if v else ([f"--no-{flag[2:]}"] if k in NEGATABLE else [])
    elif v is None:
      continue
    elif isinstance(v, (list, tuple)):
      out += [flag] + [str(x) for x in v]
    else:
      out += [flag, str(v)]
  return out


def fan_out(module: str, args, run_one: Callable[[Any, dict], None]) -> None:
  """Runs each configuration in its own process (so its peak memory is its
  own), or in this one when there is only one."""
  cs = configs(args)
  if len(cs) == 1:
    run_one(args, cs[0])
    return
  failed = []
  for c in cs:
    argv = argv_of(args, batch=[c["batch"]], impl=[c["impl"]], dtype=[c["dtype"]])
    rc = subprocess.run([sys.executable, "-m", module, *argv], check=False,
                        cwd=REPO_ROOT).returncode
    if rc:
      failed.append(f"{c} (exit {rc})")
  if failed:
    # The other configurations' records are out already; the failure must not
    # pass for a complete run.
    sys.exit(f"{module}: {len(failed)} of {len(cs)} configurations failed: "
             + "; ".join(failed))


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": d.device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "contraction": dau.default_contraction()}


def peak_memory() -> dict[str, Any]:
  """Device peak_bytes_in_use where the backend reports it, else peak RSS."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_bytes": int(stats["peak_bytes_in_use"]), "peak_source": "device"}
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux.
  return {"peak_bytes": int(rss), "peak_source": "process_rss"}


def build(args, c: dict[str, Any]):
  """(model, variables, images, one-hot targets) for configuration c."""
  if c["batch"] < 1:
    raise ValueError(f"--batch must be >= 1, got {c['batch']}.")
  dtype = jnp.dtype(c["dtype"])
  model = models.PRESETS[args.model](impl=c["impl"], dtype=dtype, remat=args.remat)
  size = args.image_size or IMAGE_SIZES[args.model]
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.uniform(kx, (c["batch"], size, size, 3), jnp.float32)
  y = jax.nn.one_hot(jax.random.randint(ky, (c["batch"],), 0, model.num_classes),
                     model.num_classes)
  variables = jax.jit(model.init)(kp, x[:1])
  return model, variables, x, y


def record(bench: str, args, c: dict[str, Any], model, x, **fields) -> dict[str, Any]:
  return {"bench": bench, **device_info(), "model": args.model, "impl": c["impl"],
          "dtype": c["dtype"], "remat": args.remat, "batch": c["batch"],
          "input_shape": list(x.shape), **fields}


def emit(rec: dict[str, Any]) -> None:
  print(json.dumps(rec), flush=True)


def _flop_count(lowered) -> float | None:
  try:
    ca = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and ca.get("flops", -1) > 0 else None


def flops(traced, lowered=None) -> dict[str, Any]:
  """XLA's cost-analysis FLOP count of a traced program (`jax.jit(f).trace(...)`),
  as lowered (before backend passes; `lowered`, if given, is traced.lower()):
  {"flops": count or None, "flops_source": how}.

  Not the compiled module's count: on GPU its convolutions and GEMMs are
  library custom calls that the analysis does not count (measured on an H200,
  jax 0.11.2: the CIFAR 9L-S training step at batch 256 counted 63 GFLOP
  compiled against 1540 GFLOP lowered). Where the backend's own lowering
  gives no count (that H200 gave none), the same traced program is lowered
  for CPU and counted there: the program, and so its FLOPs, are the
  backend's (e.g. its contraction), only the counting is done by XLA:CPU.
  """
  count = _flop_count(lowered or traced.lower())
  if count is not None:
    return {"flops": count, "flops_source": "lowered"}
  try:
    count = _flop_count(traced.lower(lowering_platforms=("cpu",)))
  except Exception:  # pylint: disable=broad-except
    count = None
  return {"flops": count, "flops_source": "lowered_for_cpu" if count else None}


def xla_memory(compiled) -> dict[str, Any]:
  try:
    m = compiled.memory_analysis()
    return {"xla_temp_bytes": int(m.temp_size_in_bytes),
            "xla_argument_bytes": int(m.argument_size_in_bytes)}
  except Exception:  # pylint: disable=broad-except
    return {}


def time_calls(fn: Callable[[], Any], reps: int, budget_s: float) -> list[float]:
  """Wall times of up to `reps` calls of fn (which must block), stopping early
  once `budget_s` has passed; always at least one."""
  times, start = [], time.perf_counter()
  for _ in range(max(1, reps)):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
    if time.perf_counter() - start > budget_s:
      break
  return times


def warm_and_time(fn: Callable[[], Any], reps: int, budget_s: float) -> dict[str, Any]:
  """One untimed warm-up call, then `time_calls`. A warm-up longer than half
  the budget is kept as the only sample (steps of a minute and more)."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times = [first] if first > budget_s / 2 else time_calls(fn, reps, budget_s)
  return {"median_s": statistics.median(times), "times_s": [round(v, 4) for v in times],
          "first_s": round(first, 4)}


def dominant_layer(model, image_size: int) -> dict[str, Any]:
  """The layer with the most fused-form multiply-adds per image, and its conv
  shape: C_in -> C_out*(R+1) + R channels, k x k, stride s, padding p."""
  shapes = models.layer_shapes(model, (image_size, image_size, 3))
  best = None
  for l, (c_out, r, k, s, p) in enumerate(zip(model.out_channels, model.ranks,
                                              model.kernel_sizes, model.strides,
                                              model.paddings)):
    h, w, c_in = shapes[l]
    ho, wo, _ = shapes[l + 1]
    n_out = c_out * (r + 1) + r
    macs = ho * wo * c_in * k * k * n_out
    if best is None or macs > best["macs_per_image"]:
      best = dict(layer=l, in_hw=[h, w], in_channels=c_in, out_hw=[ho, wo],
                  out_channels=n_out, kernel=k, stride=s, padding=p,
                  macs_per_image=macs)
  return best


def args_summary(args) -> str:
  return " ".join(argv_of(args))
