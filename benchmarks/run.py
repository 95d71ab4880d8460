"""Runs every benchmark part, each measurement in its own process, then checks
the figures against the targets of issue 4.

  python -m benchmarks.run                      # CPU defaults, a few minutes
  python -m benchmarks.run --train-batch 256 --infer-batch 256 --impl fused \
      --dtype float32 bfloat16                  # e.g. on a GPU
  python -m benchmarks.run --model imagenet100_9l_l --train-batch 32 \
      --infer-batch 32 --explain-batch 8 --impl fused --dtype float32 bfloat16

Every line on stdout is JSON: the parts' records, then one "summary" record
per target (value, threshold, met). A readable table goes to stderr.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

from benchmarks import common

# Targets (issue 4). The FLOP/s fraction is 0.5 on CPU, 0.4 on GPU. Speed and
# memory against the materialised impl are targets at batch 64; other batches
# are reported with met = null.
TARGET_BATCH = 64
MIN_TRAIN_SPEEDUP = 1.5
MAX_TRAIN_MEMORY_RATIO = 1 / 3
MAX_CONTRIBUTIONS_RATIO = 3.0
MIN_FLOPS_FRACTION = {"cpu": 0.5, "gpu": 0.4}


def run_part(part: str, argv: list[str], timeout_s: float) -> tuple[list[dict], str | None]:
  """Runs one part in its own process: (its JSON records, why it failed or None).

  A part fails when it exits non-zero, prints no record, or runs longer than
  timeout_s (then it is killed: a hung part must not hang the suite).
  """
  cmd = [sys.executable, "-m", f"benchmarks.{part}", *argv]
  print(f"# {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
  t = time.perf_counter()
  # Its own process group, so that a kill also ends the processes it fans out to.
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=common.REPO_ROOT,
                          start_new_session=True)
  timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
  timer.start()
  records = []
  try:
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        pass
    proc.wait()
  except BaseException:          # E.g. Ctrl-C: the part's own group does not get it.
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  finally:
    timed_out = not timer.is_alive() and proc.returncode != 0
    timer.cancel()
  elapsed = time.perf_counter() - t
  print(f"#   {elapsed:.0f} s, exit {proc.returncode}", file=sys.stderr, flush=True)
  if timed_out:
    return records, f"{part}: killed after {timeout_s:g} s (--part-timeout-s)"
  if proc.returncode:
    return records, f"{part}: exit {proc.returncode} (its stderr is above)"
  if not records:
    return records, f"{part}: printed no record"
  return records, None


def summarise(records: list[dict]) -> list[dict]:
  out = []
  by = lambda bench: [r for r in records if r["bench"] == bench]
  train = {(r["impl"], r["batch"], r["dtype"]): r for r in by("train_step")}
  for (impl, batch, dtype), f in sorted(train.items()):
    m = train.get(("materialized", batch, dtype))
    if impl == "materialized" or m is None:
      continue
    speedup = f["img_per_s"] / m["img_per_s"]
    ratio = f["peak_bytes"] / m["peak_bytes"]
    at = batch == TARGET_BATCH
    out.append(dict(target="train_img_per_s_fused_over_materialized", impl=impl,
                    batch=batch, dtype=dtype, value=speedup, threshold=MIN_TRAIN_SPEEDUP,
                    met=speedup >= MIN_TRAIN_SPEEDUP if at else None,
                    fused=f["img_per_s"], materialized=m["img_per_s"]))
    out.append(dict(target="train_peak_memory_fused_over_materialized", impl=impl,
                    batch=batch, dtype=dtype, value=ratio, threshold=MAX_TRAIN_MEMORY_RATIO,
                    met=ratio <= MAX_TRAIN_MEMORY_RATIO if at else None,
                    fused=f["peak_bytes"], materialized=m["peak_bytes"],
                    source=f["peak_source"]))
  for r in by("flops_vs_ceiling"):
    thr = MIN_FLOPS_FRACTION.get(r["backend"], 0.4)
    out.append(dict(target="train_flop_per_s_over_ceiling", impl=r["impl"], batch=r["batch"],
                    dtype=r["dtype"], value=r["fraction"], threshold=thr,
                    met=None if r["fraction"] is None else r["fraction"] >= thr,
                    train_flop_per_s=r["train_flop_per_s"],
                    ceiling_flop_per_s=r["ceiling_flop_per_s"], ceiling_kind=r["ceiling_kind"]))
  for r in by("contributions"):
    out.append(dict(target="contributions_time_over_forward", impl=r["impl"],
                    batch=r["batch"], dtype=r["dtype"], num_classes=r["num_classes"],
                    value=r["ratio"], threshold=MAX_CONTRIBUTIONS_RATIO,
                    met=r["ratio"] <= MAX_CONTRIBUTIONS_RATIO))
  return [{"bench": "summary", **s} for s in out]


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="cifar10_9l_s")
  p.add_argument("--image-size", type=int, default=None)
  p.add_argument("--dtype", nargs="+", default=["float32"])
  p.add_argument("--impl", nargs="+", default=["fused", "materialized"])
  p.add_argument("--train-batch", type=int, nargs="+", default=[16, 64])
  p.add_argument("--infer-batch", type=int, nargs="+", default=[64])
  p.add_argument("--explain-batch", type=int, nargs="+", default=[16])
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--budget-s", type=float, default=60.0)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--part-timeout-s", type=float, default=1800.0,
                 help="kill a part that runs longer than this and fail the suite")
  p.add_argument("--parts", nargs="+", default=["train_step", "inference", "contributions"],
                 choices=["train_step", "inference", "contributions", "ceiling"])
  args = p.parse_args()
  shared = ["--model", args.model, "--dtype", *args.dtype, "--reps", str(args.reps),
            "--budget-s", str(args.budget_s)]
  if args.image_size:
    shared += ["--image-size", str(args.image_size)]
  if args.remat:
    shared += ["--remat"]
  fused = [i for i in args.impl if i != "materialized"] or ["fused"]
  plan = {
      "train_step": ["--batch", *map(str, args.train_batch), "--impl", *args.impl],
      "inference": ["--batch", *map(str, args.infer_batch), "--impl", *args.impl],
      "contributions": ["--batch", *map(str, args.explain_batch), "--impl", fused[0],
                        "--reps", str(max(args.reps, 5))],
      "ceiling": ["--batch", *map(str, args.train_batch), "--impl", fused[0]],
  }
  t = time.perf_counter()
  records, failures = [], []
  for part in args.parts:
    part_records, failure = run_part(part, shared + plan[part], args.part_timeout_s)
    records += part_records
    if failure:
      failures.append(failure)
  summary = summarise(records)
  for s in summary:
    print(json.dumps(s), flush=True)
  print(f"# suite: {time.perf_counter() - t:.0f} s", file=sys.stderr)
  for s in summary:
    value = "n/a" if s["value"] is None else f"{s['value']:.3f}"
    bound = "<=" if "memory" in s["target"] or "contributions" in s["target"] else ">="
    verdict = {True: "met", False: "MISSED", None: "info"}[s["met"]]
    if s["value"] is None:
      verdict = "n/a"
    print(f"# {s['target']:44s} {s['impl']:12s} batch {s['batch']:4d} {s['dtype']:9s} "
          f"{value:>8s}  ({bound} {s['threshold']:.3f})  {verdict}", file=sys.stderr)
  if failures:
    sys.exit("benchmarks.run FAILED: " + "; ".join(failures))


if __name__ == "__main__":
  main()
