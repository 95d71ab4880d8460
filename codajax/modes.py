"""The run modes, declared once: their names, what each needs, how each stops.

`--mode` (codajax.main) and `train.train_and_evaluate(mode=...)` take the
names of `MODES`; mode `name` runs `codajax.train.<name>_mode` on the `Run`
that `train.setup` builds with the mode's `Needs`. An old name (`ALIASES`)
still works, with a one-line notice. `stop_requests` turns SIGTERM and Ctrl-C
into a request that every mode heeds at its next safe point.

Like codajax.config_lib, this module imports no jax: the command line defines
`--mode` from it before the heavy imports.
"""

import contextlib
import dataclasses
import signal
import sys
import threading
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a mode needs from `train.setup`, beyond what every mode shares."""
  # Checks the batch size against the training split, sets unreadable
  # checkpoints newer than the restored one aside (so they can be saved
  # again), and resumes metrics.jsonl at the restored step.
  training: bool = False
  # Runs in a read-only workdir too (its metrics are then only logged).
  read_only_ok: bool = False


MODES = {
    "train": Needs(training=True),  # Train and evaluate; a workdir resumes.
    "accuracy": Needs(read_only_ok=True),  # Top-1, top-5 and loss of the checkpoint.
    "explain": Needs(),  # Contribution-map figures of the first test images.
    "evaluate": Needs(),  # The interpretability evaluation (codajax.evaluation).
}
ALIASES = {"eval": "accuracy"}  # Old name -> its mode.


def canonical(mode: str) -> str:
  """The name in `MODES` that `mode` is; an alias prints a one-line notice
  on stderr. Raises ValueError, listing the modes, for any other name."""
  if mode in ALIASES:
    print(f"codajax: --mode {mode} is now --mode {ALIASES[mode]}.", file=sys.stderr)
    return ALIASES[mode]
  if mode not in MODES:
    raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}.")
  return mode


@contextlib.contextmanager
def stop_requests(enabled: bool = True) -> Iterator[list]:
  """SIGTERM and Ctrl-C (SIGINT) ask the run to stop at its next safe point
  (see each mode); yields the list of their names. A second Ctrl-C
  interrupts at once: it goes to the SIGINT handler from before the run
  (Python's raises KeyboardInterrupt; the CLI's exits at once, see
  codajax.main). Only when `enabled` and in the main thread: multi-host runs
  stop on JAX's preemption notice instead (`reached_preemption`)."""
  stops = []
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield stops
    return

  def request_stop(signum, frame):
    if signum == signal.SIGINT and "SIGINT" in stops:
      outer = previous[signal.SIGINT]
      if callable(outer):
        outer(signum, frame)
      raise KeyboardInterrupt
    stops.append(signal.Signals(signum).name)

  previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield stops
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
