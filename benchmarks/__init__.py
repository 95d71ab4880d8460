"""codajax benchmarks: synthetic data, JSON lines, one process per measurement.

  python -m benchmarks.run            # every part, each in its own process
  python -m benchmarks.train_step     # (a) training step, (d) FLOP/s vs ceiling
  python -m benchmarks.inference      # (b) inference forward
  python -m benchmarks.contributions  # (c) contributions for all classes vs forward
  python -m benchmarks.ceiling        # (d) the ceiling alone

Only jax, flax, optax and numpy are imported (no TensorFlow, no data sets), so
the suite runs on any machine with those; see benchmarks/README.md.
"""
