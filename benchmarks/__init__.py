"""codajax benchmarks: synthetic data, JSON lines, one process per measurement.

  python -m benchmarks.run            # every part, each in its own process
  python -m benchmarks.train_step     # (a) training step, (d) FLOP/s vs ceiling
  python -m benchmarks.inference      # (b) inference forward
  python -m benchmarks.contributions  # (c) contributions for all classes vs forward
  python -m benchmarks.ceiling        # (d) the ceiling alone
  python -m benchmarks.profile        # where a training step's time goes
  bash benchmarks/gpu.sh OUT_DIR      # the GPU runs of issue 4, one script

Only jax, flax, optax and numpy are imported (no TensorFlow, no data sets), so
the suite runs on any machine with those; see benchmarks/README.md.
"""
