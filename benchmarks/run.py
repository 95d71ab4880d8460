"""The benchmarks' one entry point: every measurement in a process of its own,
then the figures against their goals.

  python -m benchmarks.run                      # CPU defaults, a few minutes
  python -m benchmarks.run --train-batch 256 --infer-batch 256 --impl fused \\
      --dtype float32 bfloat16                  # e.g. on a GPU
  python -m benchmarks.run --model imagenet100_9l_l --train-batch 32 \\
      --infer-batch 32 --explain-batch 8 --impl fused --dtype float32 bfloat16
  python -m benchmarks.run --parts train_step --impl fused --contraction conv dot
  python -m benchmarks.run --parts profile --train-batch 16   # where a step's time goes
  python -m benchmarks.run --parts evaluation --reps 3 --budget-s 10   # attribution methods

Parts (--parts; the first three by default):
  train_step     codajax.steps.train_step, jitted, state donated; with fused
                 impls also its FLOP/s against the ceiling (--train-batch)
  inference      the jitted forward, model.apply (--infer-batch)
  contributions  explain.contributions for all classes against model.apply,
                 timed interleaved, impl fused (--explain-batch)
  ceiling        the FLOP/s ceiling alone (--train-batch)
  profile        a jax.profiler trace of training steps, summed per GPU kernel
                 or XLA:CPU op (--train-batch)
  evaluation     attribution.attribute per method (--methods) on n x n grids of
                 the preset's images (--grid-n, --grid-batch grids per call, all
                 n*n targets), impl fused: grids/s and the 500-grid evaluation's
                 time; the expensive methods measured with --eval-masks masks
                 or samples and --eval-steps steps, scaled (0: the defaults)

Each (part, batch, impl, contraction, dtype[, method]) is one measurement, run in a
child process of its own (`--measurement`), so a peak-memory figure belongs to
it alone. The materialised impl has no contraction and runs once. The suite
fails (non-zero exit, after all measurements) if a child exits non-zero,
prints no record, or runs past --timeout-s (its process group is killed).

Every line on stdout is JSON: the measurements' records, then one "summary"
record per goal (value, threshold, met; met is null where the figure is
reported but not a goal). A readable table goes to stderr. The goals, as the
figures they compare:

  fused vs materialised training img/s, batch 64             at least 1.5x
  fused vs materialised training peak memory, batch 64       at most 1/3
  contributions for all classes vs the forward, same batch   at most 3x the time
  training FLOP/s vs the ceiling at the dominant layer       at least 0.5 (CPU), 0.4 (GPU)
  "ours" for all n*n targets of a grid vs one forward of it   at most 3x the time
  occlusion's masked forwards/s vs inference img/s (batch =
    the occlusion chunk, same input size)                    at least 0.8x
"""

import argparse
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from benchmarks import common
from codajax import attribution
from codajax import models

# Each part is the module benchmarks.<part>, with a function run(Measurement)
# that prints its JSON records. Only the child that runs it imports it.
PARTS = ("train_step", "inference", "contributions", "ceiling", "profile", "evaluation")
DEFAULT_PARTS = ("train_step", "inference", "contributions")

# The goals (see the docstring). Speed and memory of the fused impl against the
# materialised one are goals at GOAL_BATCH; other batches are reported with
# met = null.
GOAL_BATCH = 64
MIN_TRAIN_SPEEDUP = 1.5
MAX_TRAIN_MEMORY_RATIO = 1 / 3
MAX_CONTRIBUTIONS_RATIO = 3.0
MIN_FLOPS_FRACTION = {"cpu": 0.5, "gpu": 0.4}
MAX_OURS_RATIO = 3.0          # evaluation: "ours" on a grid (all targets) vs its forward.
MIN_OCCLUSION_RATIO = 0.8     # evaluation: occlusion's masked forwards/s vs inference img/s.
# Summary targets whose goal is an upper bound (the others are lower bounds).
UPPER_BOUNDS = ("train_peak_memory_fused_over_materialized", "contributions_time_over_forward",
                "ours_grid_time_over_forward")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=list(PARTS))
  p.add_argument("--model", default="cifar10_9l_s", choices=sorted(models.PRESETS))
  p.add_argument("--image-size", type=int, default=None,
                 help="default: the preset's (cifar10_9l_s 32, imagenet100_9l_l 240, "
                      "tiny 16)")
  p.add_argument("--impl", nargs="+", default=list(models.IMPLS), choices=models.IMPLS)
  p.add_argument("--contraction", nargs="+", default=["auto"], choices=models.CONTRACTIONS,
                 help="the fused impl's; auto: the backend's choice")
  p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
  p.add_argument("--train-batch", type=int, nargs="+", default=[16, 64],
                 help="batches of train_step, ceiling and profile")
  p.add_argument("--infer-batch", type=int, nargs="+", default=[64])
  p.add_argument("--explain-batch", type=int, nargs="+", default=[16])
  p.add_argument("--remat", action="store_true", help="per-layer jax.checkpoint")
  p.add_argument("--reps", type=int, default=3,
                 help="timed runs, the median reported (contributions: at least 5)")
  p.add_argument("--budget-s", type=float, default=60.0,
                 help="stop repeating once a measurement has taken this long (at least "
                      "one timed run; a warm-up longer than half of it is the only one)")
  p.add_argument("--timeout-s", type=float, default=1800.0,
                 help="kill a measurement that runs longer than this and fail the suite")
  p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=None,
                 help="train_step: also FLOP/s vs the ceiling (default: for fused impls)")
  p.add_argument("--ceiling-reps", type=int, default=3,
                 help="train_step: interleaved rounds of ceiling and step")
  p.add_argument("--num-classes", type=int, default=None,
                 help="contributions: explain classes 0..K-1 (default: all)")
  p.add_argument("--profile-steps", type=int, default=3, help="profile: traced steps")
  p.add_argument("--profile-top", type=int, default=25, help="profile: ops listed")
  p.add_argument("--trace-dir", default=None,
                 help="profile: where the trace stays (default: a new temporary folder)")
  p.add_argument("--methods", nargs="+", default=list(attribution.METHODS),
                 choices=attribution.METHODS,
                 help="evaluation: the methods, one measurement each (lime is reported as "
                      "skipped where it is not importable)")
  p.add_argument("--grid-n", type=int, default=3,
                 help="evaluation: n x n grids of the preset's images (CIFAR: 96x96)")
  p.add_argument("--grid-batch", type=int, nargs="+", default=[1],
                 help="evaluation: grids per attribute call")
  p.add_argument("--eval-masks", type=int, default=16,
                 help="evaluation: measure occlusion (the finest stride with at most this "
                      "many masks), RISE (masks) and LIME (samples) with this much work and "
                      "scale linearly to the defaults; 0: at the defaults")
  p.add_argument("--eval-steps", type=int, default=2,
                 help="evaluation: integrated gradients' steps measured, scaled to the "
                      "default 20; 0: at the default")
  p.add_argument("--measurement", default=None, metavar="JSON",
                 help="run this one measurement (a common.Measurement as JSON) in this "
                      "process and nothing else: what each child runs; the suite prints "
                      "each child's command on stderr")
  return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[common.Measurement]:
  """The suite's measurements, part by part, in the order they run."""
  variants = []   # (impl, contraction): the materialised impl once, it has none.
  for impl in args.impl:
    variants += ([(impl, "auto")] if impl == "materialized"
                 else [(impl, c) for c in args.contraction])
  fused = ("fused", args.contraction[0])
  out = []
  for part in args.parts:
    batches = {"inference": args.infer_batch, "contributions": args.explain_batch,
               "evaluation": args.grid_batch}.get(part, args.train_batch)
    part_variants = {"contributions": [fused], "evaluation": [fused],
                     "ceiling": [("fused", "auto")]}.get(part, variants)
    reps = max(args.reps, 5) if part == "contributions" else args.reps
    methods = args.methods if part == "evaluation" else [None]
    for batch in batches:
      for impl, contraction in part_variants:
        for dtype in args.dtype:
          for method in methods:
            out.append(common.Measurement(
                part=part, model=args.model, batch=batch, impl=impl,
                contraction=contraction, dtype=dtype, image_size=args.image_size,
                remat=args.remat, reps=reps, budget_s=args.budget_s,
                ceiling=impl != "materialized" if args.ceiling is None else args.ceiling,
                ceiling_reps=args.ceiling_reps, num_classes=args.num_classes,
                profile_steps=args.profile_steps, profile_top=args.profile_top,
                trace_dir=args.trace_dir, method=method, grid_n=args.grid_n,
                eval_masks=args.eval_masks if method else 0,
                eval_steps=args.eval_steps if method else 0))
  return out


def run_child(cmd: list[str], timeout_s: float) -> tuple[list[dict], str | None]:
  """Runs cmd in its own process group, passing its stdout through:
  (its records, the JSON objects with a "bench" field; why it failed or None).

  It fails when it exits non-zero, prints no record, or runs longer than
  timeout_s (then its group is killed: a hung child must not hang the suite).
  """
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=common.REPO_ROOT,
                          start_new_session=True)
  killed = threading.Event()

  def kill():
    killed.set()
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:   # It ended meanwhile.
      pass

  timer = threading.Timer(timeout_s, kill)
  timer.start()
  records = []
  try:
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and "bench" in rec:
        records.append(rec)
    proc.wait()
  except BaseException:          # E.g. Ctrl-C: the child's own group does not get it.
    kill()
    raise
  finally:
    timer.cancel()
  if killed.is_set() and proc.returncode != 0:
    return records, f"killed after {timeout_s:g} s (--timeout-s)"
  if proc.returncode:
    return records, f"exit {proc.returncode} (its stderr is above)"
  if not records:
    return records, "printed no record"
  return records, None


def summarise(records: list[dict]) -> list[dict]:
  """One "summary" record per goal figure found in `records`."""
  out = []
  by = lambda bench: [r for r in records if r["bench"] == bench]
  train = {(r["impl"], r["contraction"], r["batch"], r["dtype"]): r
           for r in by("train_step")}
  for (impl, contraction, batch, dtype), f in train.items():
    m = train.get(("materialized", None, batch, dtype))
    if impl == "materialized" or m is None:
      continue
    speedup = f["img_per_s"] / m["img_per_s"]
    ratio = f["peak_bytes"] / m["peak_bytes"]
    at = batch == GOAL_BATCH
    key = dict(impl=impl, contraction=contraction, batch=batch, dtype=dtype)
    out.append(dict(target="train_img_per_s_fused_over_materialized", **key,
                    value=speedup, threshold=MIN_TRAIN_SPEEDUP,
                    met=speedup >= MIN_TRAIN_SPEEDUP if at else None,
                    fused=f["img_per_s"], materialized=m["img_per_s"]))
    out.append(dict(target="train_peak_memory_fused_over_materialized", **key,
                    value=ratio, threshold=MAX_TRAIN_MEMORY_RATIO,
                    met=ratio <= MAX_TRAIN_MEMORY_RATIO if at else None,
                    fused=f["peak_bytes"], materialized=m["peak_bytes"],
                    source=f["peak_source"]))
  for r in by("flops_vs_ceiling"):
    thr = MIN_FLOPS_FRACTION.get(r["backend"], 0.4)
    out.append(dict(target="train_flop_per_s_over_ceiling", impl=r["impl"],
                    contraction=r["contraction"], batch=r["batch"], dtype=r["dtype"],
                    value=r["fraction"], threshold=thr,
                    met=None if r["fraction"] is None else r["fraction"] >= thr,
                    train_flop_per_s=r["train_flop_per_s"],
                    ceiling_flop_per_s=r["ceiling_flop_per_s"], ceiling_kind=r["ceiling_kind"]))
  for r in by("contributions"):
    out.append(dict(target="contributions_time_over_forward", impl=r["impl"],
                    contraction=r["contraction"], batch=r["batch"], dtype=r["dtype"],
                    num_classes=r["num_classes"], value=r["ratio"],
                    threshold=MAX_CONTRIBUTIONS_RATIO,
                    met=r["ratio"] <= MAX_CONTRIBUTIONS_RATIO))
  key = lambda r: dict(impl=r["impl"], contraction=r["contraction"], batch=r["batch"],
                       dtype=r["dtype"])
  for r in by("evaluation"):
    if r["method"] == "ours" and r.get("ratio") is not None:
      out.append(dict(target="ours_grid_time_over_forward", **key(r), value=r["ratio"],
                      threshold=MAX_OURS_RATIO, met=r["ratio"] <= MAX_OURS_RATIO,
                      targets=r["targets_per_grid"], input_shape=r["input_shape"],
                      ours_s=r["measured_median_s"], forward_s=r["forward_median_s"]))
    if r["method"] == "occ5" and r.get("ratio") is not None:
      out.append(dict(target="occlusion_masked_forwards_over_inference", **key(r),
                      value=r["ratio"], threshold=MIN_OCCLUSION_RATIO,
                      met=r["ratio"] >= MIN_OCCLUSION_RATIO,
                      masked_forwards_per_s=r["masked_forwards_per_s"],
                      inference_img_per_s=r["inference_img_per_s"],
                      inference_batch=r["inference_batch"], input_shape=r["input_shape"]))
  return [{"bench": "summary", **s} for s in out]


def _print_summary(summary: list[dict]) -> None:
  for s in summary:
    value = "n/a" if s["value"] is None else f"{s['value']:.3f}"
    bound = "<=" if s["target"] in UPPER_BOUNDS else ">="
    verdict = {True: "met", False: "MISSED", None: "info"}[s["met"]]
    if s["value"] is None:
      verdict = "n/a"
    impl = s["impl"] if s["contraction"] is None else f"{s['impl']}/{s['contraction']}"
    print(f"# {s['target']:44s} {impl:12s} batch {s['batch']:4d} {s['dtype']:9s} "
          f"{value:>8s}  ({bound} {s['threshold']:.3f})  {verdict}", file=sys.stderr)


def _print_evaluation(records: list[dict]) -> None:
  """The evaluation's figures per method: grids/s and the 500-grid estimate."""
  for r in records:
    if r["bench"] != "evaluation":
      continue
    if r.get("skipped"):
      print(f"# evaluation {r['method']:8s} skipped: {r['skipped']}", file=sys.stderr)
      continue
    scaled = (f"scaled x{r['scale']:g} from {r['options_measured']}" if r["scale"] != 1
              else "at the defaults")
    print(f"# evaluation {r['method']:8s} batch {r['batch']:3d} {r['grids_per_s']:10.4f} grids/s "
          f"{r['grid_s']:9.3f} s/grid  {r['est_500_grids_s'] / 3600:8.3f} h for "
          f"{r['num_grids_estimated']} grids  (median of {r['reps']}, {scaled})", file=sys.stderr)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.measurement:
    m = common.Measurement(**json.loads(args.measurement))
    importlib.import_module(f"benchmarks.{m.part}").run(m)
    return
  t = time.perf_counter()
  measurements = plan(args)
  records, failures = [], []
  for m in measurements:
    cmd = [sys.executable, "-m", "benchmarks.run", "--measurement", m.to_json()]
    print(f"# {m.label()}: {shlex.join(['python', *cmd[1:]])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    child_records, failure = run_child(cmd, args.timeout_s)
    print(f"#   {time.perf_counter() - start:.0f} s{', ' + failure if failure else ''}",
          file=sys.stderr, flush=True)
    records += child_records
    if failure:
      failures.append(f"{m.label()}: {failure}")
  summary = summarise(records)
  for s in summary:
    print(json.dumps(s), flush=True)
  print(f"# suite: {time.perf_counter() - t:.0f} s, {len(measurements)} measurements",
        file=sys.stderr)
  _print_summary(summary)
  _print_evaluation(records)
  if failures:
    # The other measurements' records are out already; the failure must not
    # pass for a complete run.
    sys.exit(f"benchmarks.run FAILED: {len(failures)} of {len(measurements)} "
             "measurements: " + "; ".join(failures))


if __name__ == "__main__":
  main()
