"""Where a training step's time goes: a jax.profiler trace, summed per op.

Traces a few steps of the benchmark's training step (`benchmarks.train_step`)
and reads the Perfetto trace that jax.profiler writes: on GPU the kernels of
the device's streams, on CPU the XLA ops of the executing threads. Prints one
JSON record (the share of matrix products and convolutions, the top ops) and
a table on stderr; the raw trace stays in `Measurement.trace_dir` (run.py's
--trace-dir) for TensorBoard/XProf. The matmul/conv share is given for device
traces only (see `run`). Ops on several host threads overlap, so host "busy"
time can exceed the step.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

from benchmarks import common
from benchmarks import train_step

# Kernel or op names of matrix products and convolutions: cuBLAS/cuBLASLt,
# CUTLASS and cuDNN kernels on GPU (sm90_xmma_*, nvjet_*, cutlass_*, *gemm*,
# *conv*), XLA's dot/convolution ops and their library calls on CPU.
MATMUL = re.compile(r"gemm|cublas|cutlass|xmma|nvjet|cudnn|conv|dot|matmul", re.I)


def read_trace(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def op_times(events: list[dict]) -> tuple[str, collections.Counter]:
  """(where, {op name: total microseconds}) of the innermost complete ("X")
  events that ran the computation: the device's if the trace has a /device:
  process (the GPU's kernels), else the host's threads other than Python's.
  Only innermost events count, so that an executor's span around its ops
  (e.g. XLA:CPU's ThunkExecutor::Execute) is not counted again."""
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  devices = {p for p, n in names.items() if n.startswith("/device:")}
  where = "device" if devices else "host"

  def runs_ops(e):
    if devices:
      return e["pid"] in devices
    # XLA:CPU marks each op's end with an "end: <op>" event and has executor
    # threads wait on others ("... wait for completion", "...Await"): not ops.
    return (threads.get((e["pid"], e["tid"]), "") != "python"
            and not e["name"].startswith("end: ")
            and not re.search(r"wait for completion|Await", e["name"]))

  lanes = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and runs_ops(e):
      lanes[(e["pid"], e["tid"])].append(e)
  times = collections.Counter()
  for lane in lanes.values():
    lane.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
    for i, e in enumerate(lane):
      end = float(e["ts"]) + float(e.get("dur", 0.0))
      # Events are sorted by start: e has a child iff the next one starts
      # before e ends.
      if i + 1 < len(lane) and float(lane[i + 1]["ts"]) < end:
        continue
      times[e["name"]] += float(e.get("dur", 0.0))
  return where, times


def run(m: common.Measurement) -> None:
  step = train_step.compiled_step(m)
  x, call = step.images, step.call
  for _ in range(2):
    call()
  trace_dir = m.trace_dir or tempfile.mkdtemp(prefix="codajax_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(m.profile_steps):
      call()
  where, times = op_times(read_trace(trace_dir))
  total = sum(times.values())
  # On the host the split is not known: XLA:CPU runs most dots inside
  # YNNPACK fusions ("ynn_fusion.N") whose names do not say what they hold.
  matmul = sum(t for n, t in times.items() if MATMUL.search(n)) if where == "device" else None
  per_step = lambda us: us / m.profile_steps / 1e3   # ms
  top = [{"op": n, "ms_per_step": per_step(t), "share": t / total if total else None,
          "matmul": bool(MATMUL.search(n)) if matmul is not None else None}
         for n, t in times.most_common(m.profile_top)]
  share = matmul / total if matmul is not None and total else None
  common.emit(common.record(
      "profile", m, x, steps=m.profile_steps, where=where, trace_dir=trace_dir,
      busy_ms_per_step=per_step(total),
      matmul_ms_per_step=None if matmul is None else per_step(matmul),
      matmul_share=share, top_ops=top))
  split = "matmul/conv n/a on the host" if share is None else \
      f"matmul/conv {per_step(matmul):.2f} ms ({share:.0%})"
  print(f"# {m.label()}: {where} busy {per_step(total):.2f} ms/step, {split}",
        file=sys.stderr)
  for t in top:
    print(f"#   {t['ms_per_step']:9.3f} ms {t['share']:6.1%} {'M' if t['matmul'] else ' '} "
          f"{t['op'][:100]}", file=sys.stderr)
