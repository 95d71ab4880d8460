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

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "benchmarks.run", "--model", "tiny", "--reps", "1",
         "--infer-batch", "2", *flags]
  return subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)


class RunTest(absltest.TestCase):

  def test_success_prints_json_records(self):
    proc = _run("--parts", "inference", "--impl", "fused")
    self.assertEqual(proc.returncode, 0, proc.stderr)
    records = [json.loads(l) for l in proc.stdout.splitlines()]
    (rec,) = [r for r in records if r["bench"] == "inference"]
    self.assertEqual((rec["model"], rec["batch"], rec["impl"]), ("tiny", 2, "fused"))
    self.assertGreater(rec["img_per_s"], 0)
    self.assertGreater(rec["peak_bytes"], 0)
    self.assertIn("device", rec)

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


if __name__ == "__main__":
  absltest.main()
