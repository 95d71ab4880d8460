"""benchmarks.run: JSON records on success, a non-zero exit on any failure.

Each case starts the suite as a user would, in fresh processes, on the tiny
preset (the figures themselves are the benchmarks' business, not a test's).
"""

import json
import pathlib
import subprocess
import sys

from absl.testing import absltest
import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import profile

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "benchmarks.run", "--model", "tiny", "--reps", "1",
         "--infer-batch", "2", *flags]
  return subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)


class RunTest(absltest.TestCase):

  def test_success_prints_json_records(self):
    proc = _run("--parts", "inference", "train_step", "--impl", "fused", "--train-batch", "2")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    records = [json.loads(l) for l in proc.stdout.splitlines()]
    for bench in ("inference", "train_step"):
      (rec,) = [r for r in records if r["bench"] == bench]
      self.assertEqual((rec["model"], rec["batch"], rec["impl"]), ("tiny", 2, "fused"))
      self.assertGreater(rec["img_per_s"], 0)
      self.assertGreater(rec["peak_bytes"], 0)
      self.assertGreater(rec["flops"], 0)
      self.assertIn("device", rec)
    (ceil,) = [r for r in records if r["bench"] == "flops_vs_ceiling"]
    self.assertGreater(ceil["fraction"], 0)
    (summary,) = [r for r in records if r["bench"] == "summary"]
    self.assertEqual(summary["target"], "train_flop_per_s_over_ceiling")

  def test_a_failing_part_fails_the_suite(self):
    # The child's argparse rejects the dtype: exit 2 in the part.
    proc = _run("--parts", "inference", "--impl", "fused", "--dtype", "float16")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("benchmarks.run FAILED: inference: exit 2", proc.stderr)

  def test_a_failing_configuration_fails_its_part(self):
    # Two configurations fan out to two processes; one of them fails.
    proc = _run("--parts", "inference", "--impl", "fused", "--infer-batch", "2", "0")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("1 of 2 configurations failed", proc.stderr)
    self.assertIn("benchmarks.run FAILED: inference", proc.stderr)
    # The configuration that worked still reported.
    self.assertIn('"bench": "inference"', proc.stdout)

  def test_a_part_past_its_timeout_is_killed_and_fails_the_suite(self):
    proc = _run("--parts", "inference", "--impl", "fused", "--part-timeout-s", "0.5")
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("inference: killed after 0.5 s", proc.stderr)


class FlopsTest(absltest.TestCase):

  def test_counts_the_lowered_program(self):
    f = jax.jit(lambda a, b: a @ b)
    counted = common.flops(f.trace(jnp.ones((8, 16)), jnp.ones((16, 4))))
    self.assertEqual(counted, {"flops": 2 * 8 * 16 * 4, "flops_source": "lowered"})

  def test_falls_back_to_counting_as_lowered_for_cpu(self):
    # As on a backend whose own lowering gives no count (an H200, jax 0.11.2).
    calls = []
    real = common._flop_count  # pylint: disable=protected-access

    def no_count_first(lowered):
      calls.append(lowered)
      return None if len(calls) == 1 else real(lowered)

    f = jax.jit(lambda a, b: a @ b)
    with absltest.mock.patch.object(common, "_flop_count", no_count_first):
      counted = common.flops(f.trace(jnp.ones((8, 16)), jnp.ones((16, 4))))
    self.assertEqual(counted, {"flops": 2 * 8 * 16 * 4, "flops_source": "lowered_for_cpu"})
    self.assertLen(calls, 2)


def _meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  return {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}


def _op(pid, tid, name, ts, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


class ProfileTest(absltest.TestCase):

  def test_device_kernels_only_when_the_trace_has_a_device(self):
    events = [_meta(1, "/host:CPU"), _meta(2, "/device:GPU:0"),
              _op(1, 1, "PjitFunction(step)", 0, 100),
              _op(2, 7, "sm90_xmma_gemm_f32", 10, 30), _op(2, 7, "loop_fusion", 45, 10),
              _op(2, 8, "sm90_xmma_gemm_f32", 60, 20)]
    where, times = profile.op_times(events)
    self.assertEqual(where, "device")
    self.assertEqual(times, {"sm90_xmma_gemm_f32": 50, "loop_fusion": 10})

  def test_host_ops_innermost_only_without_markers_or_waits(self):
    events = [_meta(1, "/host:CPU"), _meta(1, "python", tid=1), _meta(1, "worker", tid=2),
              _op(1, 1, "PjitFunction(step)", 0, 100),              # Python's thread.
              _op(1, 2, "ThunkExecutor::Execute", 0, 50),            # Contains the ops.
              _op(1, 2, "dot.1", 5, 20), _op(1, 2, "end: dot.1", 25, 0),
              _op(1, 2, "fusion.2", 30, 10),
              _op(1, 2, "ThunkExecutor::Execute (wait for completion)", 60, 30)]
    where, times = profile.op_times(events)
    self.assertEqual(where, "host")
    self.assertEqual(times, {"dot.1": 20, "fusion.2": 10})
    self.assertTrue(profile.MATMUL.search("dot.1"))
    self.assertIsNone(profile.MATMUL.search("fusion.2"))

  def test_profiles_a_real_training_step(self):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile", "--model", "tiny", "--batch", "2",
         "--steps", "1", "--top", "5"],
        cwd=_ROOT, capture_output=True, text=True, timeout=300, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr)
    (rec,) = [json.loads(l) for l in proc.stdout.splitlines()]
    self.assertEqual((rec["bench"], rec["where"]), ("profile", "host"))
    self.assertGreater(rec["busy_ms_per_step"], 0)
    self.assertLen(rec["top_ops"], 5)
    self.assertIsNone(rec["matmul_share"])   # Not known from XLA:CPU's op names.


if __name__ == "__main__":
  absltest.main()
