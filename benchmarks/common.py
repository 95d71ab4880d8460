"""What every part shares: one measurement's settings, synthetic data, timing,
memory, FLOP counts and JSON records."""

import dataclasses
import json
import os
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from codajax import dau_fused
from codajax import models

# Input sizes of the presets: CIFAR-10 32x32; ImageNet-100 240x240 crops, as in
# the reference code's 9L-L experiment (RandomCrop/CenterCrop 240 after Resize 256).
IMAGE_SIZES = {"cifar10_9l_s": 32, "imagenet100_9l_l": 240, "tiny": 16}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Measurement:
  """One measurement, run in a process of its own: a part and its settings.

  The options after `budget_s` belong to one part each and the others ignore
  them.
  """
  part: str                     # One of `benchmarks.run.PARTS`.
  model: str                    # A key of `models.PRESETS`.
  batch: int
  impl: str                     # One of `models.IMPLS`.
  contraction: str = "auto"     # One of `models.CONTRACTIONS`.
  dtype: str = "float32"
  image_size: int | None = None   # None: the preset's (`IMAGE_SIZES`).
  remat: bool = False
  reps: int = 3                 # Timed runs (at most); the median is reported.
  budget_s: float = 60.0        # Stop repeating once a measurement took this long.
  ceiling: bool = True          # train_step: also its FLOP/s against the ceiling.
  ceiling_reps: int = 3         # train_step: interleaved rounds for the ceiling.
  num_classes: int | None = None  # contributions: classes 0..K-1 (None: all).
  profile_steps: int = 3        # profile: traced steps.
  profile_top: int = 25         # profile: ops listed.
  trace_dir: str | None = None  # profile: None, a new temporary folder.
  method: str | None = None     # evaluation: one of attribution.METHODS.
  grid_n: int = 3               # evaluation: n x n grids of images of `size`.
  eval_masks: int = 0           # evaluation: occlusion/RISE masks, LIME samples measured (0: defaults).
  eval_steps: int = 0           # evaluation: intgrad steps measured (0: default).

  @property
  def size(self) -> int:
    return self.image_size or IMAGE_SIZES[self.model]

  def to_json(self) -> str:
    """The fields that differ from their defaults; `Measurement(**json.loads(...))`
    reads it back."""
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    return json.dumps({k: v for k, v in dataclasses.asdict(self).items()
                       if v != defaults[k]})

  def label(self) -> str:
    impl = self.impl if self.impl == "materialized" else f"{self.impl}/{self.contraction}"
    method = f" {self.method}" if self.method else ""
    return f"{self.part}{method} {self.model} batch {self.batch} {impl} {self.dtype}"


def build(m: Measurement):
  """(model, variables, images, integer labels) for measurement m."""
  if m.batch < 1:
    raise ValueError(f"the batch must be >= 1, got {m.batch}.")
  model = models.PRESETS[m.model](impl=m.impl, contraction=m.contraction,
                                  dtype=jnp.dtype(m.dtype), remat=m.remat)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.uniform(kx, (m.batch, m.size, m.size, 3), jnp.float32)
  labels = jax.random.randint(ky, (m.batch,), 0, model.num_classes)
  variables = jax.jit(model.init)(kp, x[:1])
  return model, variables, x, labels


def contraction_used(m: Measurement) -> str | None:
  """The fused layer's contraction ("auto" resolved to the backend's); None
  for the materialised layer, which has none."""
  if m.impl == "materialized":
    return None
  return dau_fused.default_contraction() if m.contraction == "auto" else m.contraction


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": d.device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__}


def record(bench: str, m: Measurement, x, **fields) -> dict[str, Any]:
  return {"bench": bench, **device_info(), "model": m.model, "impl": m.impl,
          "contraction": contraction_used(m), "dtype": m.dtype, "remat": m.remat,
          "batch": m.batch, "input_shape": list(x.shape), **fields}


def emit(rec: dict[str, Any]) -> None:
  print(json.dumps(rec), flush=True)


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
  library custom calls that the analysis does not count (benchmarks/README.md
  gives an example). Where the backend's own lowering gives no count, the same
  traced program is lowered for CPU and counted there: the program, and so
  its FLOPs, are the backend's (e.g. its contraction), only the counting is
  done by XLA:CPU.
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
