"""codajax's benchmarks: a tool run from the repository root, not installed.

  python -m benchmarks.run            # the one entry point; --help lists the parts
  bash benchmarks/gpu.sh OUT_DIR      # the GPU runs, in stages, through run.py

run.py runs every measurement in a child process of its own and checks the
figures against their goals. Each part is a module with `run(Measurement)`:
train_step (codajax.steps.train_step, and its FLOP/s against the ceiling),
inference (model.apply), contributions (explain.contributions against
model.apply), ceiling (the FLOP/s ceiling alone) and profile (where a
training step's time goes). common.py holds what they share. Synthetic data,
no data sets; see benchmarks/README.md.
"""
