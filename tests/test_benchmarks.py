"""benchmarks.run: the plan, the goals, JSON records on success, a non-zero
exit on any failure.

The end-to-end cases start the suite as a user would, in fresh processes, on
the tiny preset (the figures themselves are the benchmarks' business, not a
test's).
"""

import json
import pathlib
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common
from benchmarks import evaluation
from benchmarks import profile
from benchmarks import run

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_TINY = ("--model", "tiny", "--reps", "1", "--ceiling-reps", "1", "--train-batch", "2",
         "--infer-batch", "2", "--explain-batch", "2")


def _run(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "benchmarks.run", *_TINY, *flags],
                        cwd=_ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)


def _records(stdout: str) -> list[dict]:
  return [json.loads(l) for l in stdout.splitlines()]


# ----------------------------------------------------------- the suite, end to end


def test_success_prints_json_records():
  proc = _run("--parts", "inference", "train_step", "--impl", "fused")
  assert proc.returncode == 0, proc.stderr
  records = _records(proc.stdout)
  for bench in ("inference", "train_step"):
    (rec,) = [r for r in records if r["bench"] == bench]
    assert (rec["model"], rec["batch"], rec["impl"]) == ("tiny", 2, "fused")
    assert rec["contraction"] in ("conv", "dot")   # "auto", resolved.
    assert rec["img_per_s"] > 0
    assert rec["peak_bytes"] > 0
    assert rec["flops"] > 0
    assert "device" in rec
  (ceil,) = [r for r in records if r["bench"] == "flops_vs_ceiling"]
  assert ceil["fraction"] > 0
  (summary,) = [r for r in records if r["bench"] == "summary"]
  assert summary["target"] == "train_flop_per_s_over_ceiling"
  assert summary["threshold"] == run.MIN_FLOPS_FRACTION["cpu"]


def test_profiles_a_real_training_step():
  proc = _run("--parts", "profile", "--impl", "fused", "--profile-steps", "1",
              "--profile-top", "5")
  assert proc.returncode == 0, proc.stderr
  (rec,) = _records(proc.stdout)
  assert (rec["bench"], rec["where"]) == ("profile", "host")
  assert rec["busy_ms_per_step"] > 0
  assert len(rec["top_ops"]) == 5
  assert rec["matmul_share"] is None   # Not known from XLA:CPU's op names.


def test_a_failing_measurement_fails_the_suite():
  # Two measurements, two processes; the one with batch 0 fails.
  proc = _run("--parts", "inference", "--impl", "fused", "--infer-batch", "2", "0")
  assert proc.returncode != 0
  assert "benchmarks.run FAILED: 1 of 2 measurements: inference tiny batch 0" in proc.stderr
  assert "exit 1" in proc.stderr
  # The measurement that worked still reported.
  assert [r["batch"] for r in _records(proc.stdout)] == [2]


def test_a_measurement_past_its_timeout_is_killed_and_fails_the_suite():
  proc = _run("--parts", "inference", "--impl", "fused", "--timeout-s", "0.5")
  assert proc.returncode != 0
  assert "killed after 0.5 s (--timeout-s)" in proc.stderr


@pytest.mark.parametrize("flags", [["--dtype", "float16"], ["--impl", "fused_dot"],
                                   ["--contraction", "gemm"], ["--parts", "train"]])
def test_bad_flags_are_rejected_before_any_work(flags):
  with pytest.raises(SystemExit) as e:
    run.parse_args(flags)
  assert e.value.code == 2


def test_evaluation_times_methods_on_grids_and_scales_the_expensive_ones():
  # Tiny preset, 3x3 grids of 16x16 images: 48x48 inputs, 9 targets per grid.
  proc = _run("--parts", "evaluation", "--methods", "ours", "occ5", "rise",
              "--eval-masks", "4", "--budget-s", "1")
  assert proc.returncode == 0, proc.stderr
  records = _records(proc.stdout)
  ev = {r["method"]: r for r in records if r["bench"] == "evaluation"}
  assert sorted(ev) == ["occ5", "ours", "rise"]
  for r in ev.values():
    assert (r["model"], r["batch"], r["impl"], r["grid_n"]) == ("tiny", 1, "fused", 3)
    assert r["input_shape"] == [1, 48, 48, 3]
    assert r["targets_per_grid"] == 9
    assert r["grids_per_s"] > 0
    assert r["grid_s"] == pytest.approx(r["measured_median_s"] * r["scale"])
    assert r["est_500_grids_s"] == pytest.approx(500 / r["grids_per_s"])
  assert ev["ours"]["scale"] == 1 and ev["ours"]["reps"] >= 3
  assert ev["ours"]["ratio"] == pytest.approx(
      ev["ours"]["measured_median_s"] / ev["ours"]["forward_median_s"])
  # Occlusion: stride 24 gives 2x2 masks (one chunk), scaled to stride 2's 24x24.
  occ = ev["occ5"]
  assert occ["options_measured"] == {"stride": 24, "chunk": 4}
  assert (occ["masks_measured"], occ["masks_per_grid"], occ["scale"]) == (4, 576, 144)
  assert occ["inference_batch"] == 4
  assert occ["masked_forwards_per_s"] == pytest.approx(4 / occ["measured_median_s"])
  assert occ["ratio"] == pytest.approx(occ["masked_forwards_per_s"] / occ["inference_img_per_s"])
  assert (ev["rise"]["masks_per_grid"], ev["rise"]["scale"]) == (6000, 1500)
  summary = {r["target"]: r for r in records if r["bench"] == "summary"}
  assert summary["ours_grid_time_over_forward"]["threshold"] == run.MAX_OURS_RATIO
  assert summary["ours_grid_time_over_forward"]["value"] == ev["ours"]["ratio"]
  occ_goal = summary["occlusion_masked_forwards_over_inference"]
  assert (occ_goal["value"], occ_goal["threshold"]) == (occ["ratio"], run.MIN_OCCLUSION_RATIO)
  assert occ_goal["met"] == (occ["ratio"] >= 0.8)
  assert "500 grids" in proc.stderr


def test_evaluation_measures_the_defaults_or_scales_to_them():
  # CIFAR grids, 96x96: occlusion at stride 2 has 48x48 masks.
  assert evaluation.measured_options("occ5", 96, 0, 0) == ({"chunk": 32}, 1.0, 2304)
  assert evaluation.measured_options("occ9", 96, 16, 0) == ({"stride": 24, "chunk": 16},
                                                            144.0, 16)
  assert evaluation.measured_options("occ5", 96, 40, 0)[0]["stride"] == 16  # 6x6 = 36 masks.
  assert evaluation.measured_options("rise", 96, 0, 0) == ({}, 1.0, 6000)
  assert evaluation.measured_options("lime", 96, 16, 0) == (
      {"num_samples": 16, "batch_size": 16}, 16.0, 16)
  assert evaluation.measured_options("intgrad", 96, 16, 2) == ({"steps": 2, "chunk": 2},
                                                               10.0, None)
  assert evaluation.measured_options("grad", 96, 16, 2) == ({}, 1.0, None)


def test_plan_of_the_evaluation_is_one_fused_measurement_per_method():
  args = run.parse_args(["--parts", "evaluation", "--methods", "ours", "occ5",
                         "--eval-masks", "0"])
  got = [(m.part, m.method, m.batch, m.impl, m.grid_n, m.eval_masks, m.eval_steps)
         for m in run.plan(args)]
  assert got == [("evaluation", "ours", 1, "fused", 3, 0, 2),
                 ("evaluation", "occ5", 1, "fused", 3, 0, 2)]


# ----------------------------------------------------------- a child process


def _child(code: str, timeout_s: float = 60) -> tuple[list[dict], str | None]:
  return run.run_child([sys.executable, "-c", code], timeout_s)


def test_child_records_are_its_json_objects_with_a_bench():
  records, failure = _child('print(\'{"bench": "x", "v": 1}\'); print("# log"); print(3)')
  assert failure is None
  assert records == [{"bench": "x", "v": 1}]


@pytest.mark.parametrize("code,failure", [
    ('print(\'{"bench": "x"}\'); raise SystemExit(3)', "exit 3 (its stderr is above)"),
    ("print('no JSON')", "printed no record"),
])
def test_child_fails_on_exit_or_without_records(code, failure):
  assert _child(code)[1] == failure


def _state(pid: int) -> str | None:
  """The process's state letter, None if it is gone (a zombie is gone too)."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return None
  return None if state in "ZX" else state


def test_child_past_its_timeout_is_killed_with_its_process_group():
  # The child starts a grandchild in its group and hangs.
  code = ("import json, subprocess, sys, time\n"
          "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
          "print(json.dumps({'bench': 'x', 'pid': p.pid}), flush=True)\n"
          "time.sleep(60)\n")
  t = time.perf_counter()
  records, failure = _child(code, timeout_s=3)
  assert time.perf_counter() - t < 30
  assert failure == "killed after 3 s (--timeout-s)"
  (rec,) = records
  for _ in range(50):
    if _state(rec["pid"]) is None:
      break
    time.sleep(0.1)
  assert _state(rec["pid"]) is None


# ----------------------------------------------------------- the plan


def test_plan_runs_the_materialized_impl_once_and_contributions_fused():
  args = run.parse_args(["--parts", "train_step", "contributions", "ceiling",
                         "--contraction", "dot", "conv", "--train-batch", "64",
                         "--dtype", "float32", "bfloat16", "--reps", "2"])
  got = [(m.part, m.batch, m.impl, m.contraction, m.dtype, m.reps, m.ceiling)
         for m in run.plan(args)]
  assert got == [
      ("train_step", 64, "fused", "dot", "float32", 2, True),
      ("train_step", 64, "fused", "dot", "bfloat16", 2, True),
      ("train_step", 64, "fused", "conv", "float32", 2, True),
      ("train_step", 64, "fused", "conv", "bfloat16", 2, True),
      ("train_step", 64, "materialized", "auto", "float32", 2, False),
      ("train_step", 64, "materialized", "auto", "bfloat16", 2, False),
      ("contributions", 16, "fused", "dot", "float32", 5, True),
      ("contributions", 16, "fused", "dot", "bfloat16", 5, True),
      ("ceiling", 64, "fused", "auto", "float32", 2, True),
      ("ceiling", 64, "fused", "auto", "bfloat16", 2, True),
  ]


def test_default_plan():
  got = [(m.part, m.batch, m.impl, m.contraction, m.model)
         for m in run.plan(run.parse_args([]))]
  assert got == [("train_step", 16, "fused", "auto", "cifar10_9l_s"),
                 ("train_step", 16, "materialized", "auto", "cifar10_9l_s"),
                 ("train_step", 64, "fused", "auto", "cifar10_9l_s"),
                 ("train_step", 64, "materialized", "auto", "cifar10_9l_s"),
                 ("inference", 64, "fused", "auto", "cifar10_9l_s"),
                 ("inference", 64, "materialized", "auto", "cifar10_9l_s"),
                 ("contributions", 16, "fused", "auto", "cifar10_9l_s")]


def test_measurement_round_trips_through_its_json():
  m = common.Measurement(part="profile", model="tiny", batch=3, impl="fused",
                         contraction="conv", trace_dir="/tmp/t", num_classes=2)
  assert common.Measurement(**json.loads(m.to_json())) == m
  assert "reps" not in json.loads(m.to_json())   # Defaults are left out.


# ----------------------------------------------------------- the goals


def _train(impl, contraction, batch, img_per_s, peak_bytes):
  return dict(bench="train_step", impl=impl, contraction=contraction, batch=batch,
              dtype="float32", img_per_s=img_per_s, peak_bytes=peak_bytes,
              peak_source="process_rss")


def test_summary_compares_each_fused_contraction_with_materialized():
  records = [_train("fused", "dot", 64, 3.0, 1.0), _train("fused", "conv", 64, 1.0, 4.0),
             _train("materialized", None, 64, 1.0, 10.0),
             _train("fused", "dot", 16, 1.0, 1.0), _train("materialized", None, 16, 2.0, 1.0)]
  got = {(s["target"], s["contraction"], s["batch"]): (s["value"], s["threshold"], s["met"])
         for s in run.summarise(records)}
  speed, memory = ("train_img_per_s_fused_over_materialized",
                   "train_peak_memory_fused_over_materialized")
  assert got == {
      (speed, "dot", 64): (3.0, 1.5, True), (memory, "dot", 64): (0.1, 1 / 3, True),
      (speed, "conv", 64): (1.0, 1.5, False), (memory, "conv", 64): (0.4, 1 / 3, False),
      # Outside batch 64 the figures are reported, not judged.
      (speed, "dot", 16): (0.5, 1.5, None), (memory, "dot", 16): (1.0, 1 / 3, None)}


def test_summary_of_flops_and_contributions():
  base = dict(impl="fused", contraction="dot", batch=16, dtype="float32")
  records = [
      dict(bench="flops_vs_ceiling", backend="cpu", fraction=0.45, train_flop_per_s=4.5,
           ceiling_flop_per_s=10.0, ceiling_kind="gemm", **base),
      dict(bench="flops_vs_ceiling", backend="gpu", fraction=0.45, train_flop_per_s=4.5,
           ceiling_flop_per_s=10.0, ceiling_kind="conv", **base),
      dict(bench="flops_vs_ceiling", backend="gpu", fraction=None, train_flop_per_s=None,
           ceiling_flop_per_s=10.0, ceiling_kind="conv", **base),
      dict(bench="contributions", num_classes=10, ratio=2.9, **base),
      dict(bench="contributions", num_classes=10, ratio=3.1, **base)]
  got = [(s["target"], s["threshold"], s["met"]) for s in run.summarise(records)]
  assert got == [("train_flop_per_s_over_ceiling", 0.5, False),
                 ("train_flop_per_s_over_ceiling", 0.4, True),
                 ("train_flop_per_s_over_ceiling", 0.4, None),
                 ("contributions_time_over_forward", 3.0, True),
                 ("contributions_time_over_forward", 3.0, False)]


# ----------------------------------------------------------- FLOP counts


def test_flops_counts_the_lowered_program():
  f = jax.jit(lambda a, b: a @ b)
  counted = common.flops(f.trace(jnp.ones((8, 16)), jnp.ones((16, 4))))
  assert counted == {"flops": 2 * 8 * 16 * 4, "flops_source": "lowered"}


def test_flops_falls_back_to_counting_as_lowered_for_cpu():
  # As on a backend whose own lowering gives no count (an H200, jax 0.11.2).
  calls = []
  real = common._flop_count  # pylint: disable=protected-access

  def no_count_first(lowered):
    calls.append(lowered)
    return None if len(calls) == 1 else real(lowered)

  f = jax.jit(lambda a, b: a @ b)
  with mock.patch.object(common, "_flop_count", no_count_first):
    counted = common.flops(f.trace(jnp.ones((8, 16)), jnp.ones((16, 4))))
  assert counted == {"flops": 2 * 8 * 16 * 4, "flops_source": "lowered_for_cpu"}
  assert len(calls) == 2


# ----------------------------------------------------------- profile traces


def _meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  return {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}


def _op(pid, tid, name, ts, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_profile_counts_device_kernels_only_when_the_trace_has_a_device():
  events = [_meta(1, "/host:CPU"), _meta(2, "/device:GPU:0"),
            _op(1, 1, "PjitFunction(step)", 0, 100),
            _op(2, 7, "sm90_xmma_gemm_f32", 10, 30), _op(2, 7, "loop_fusion", 45, 10),
            _op(2, 8, "sm90_xmma_gemm_f32", 60, 20)]
  where, times = profile.op_times(events)
  assert where == "device"
  assert times == {"sm90_xmma_gemm_f32": 50, "loop_fusion": 10}


def test_profile_counts_host_ops_innermost_only_without_markers_or_waits():
  events = [_meta(1, "/host:CPU"), _meta(1, "python", tid=1), _meta(1, "worker", tid=2),
            _op(1, 1, "PjitFunction(step)", 0, 100),              # Python's thread.
            _op(1, 2, "ThunkExecutor::Execute", 0, 50),            # Contains the ops.
            _op(1, 2, "dot.1", 5, 20), _op(1, 2, "end: dot.1", 25, 0),
            _op(1, 2, "fusion.2", 30, 10),
            _op(1, 2, "ThunkExecutor::Execute (wait for completion)", 60, 30)]
  where, times = profile.op_times(events)
  assert where == "host"
  assert times == {"dot.1": 20, "fusion.2": 10}
  assert profile.MATMUL.search("dot.1")
  assert profile.MATMUL.search("fusion.2") is None
