"""Progress of --mode evaluate: one plain log line at least every minute, with
an ETA weighted by what each result costs.

A run computes results (metric, method) one after the other, and they cost
very different amounts: a grid of Ours takes a fraction of a second, one of
IntGrad or Occ9 tens of seconds, and an image of pixel removal runs ~200
masked forward passes. Counting grids and images as one unit (as clu's
ReportProgress did) gave ETAs like "22h30m" for runs under an hour. Here each
result's expected seconds are

  units x seconds per unit,

with the seconds per unit taken, in this order, from: a stored result of the
same (metric, method) in the run's out_dir (its JSON line records "seconds"
and its count: a measurement on this machine and model); else `COST`, a
relative cost per unit, times the seconds per cost unit measured on the
results this run has finished; else `COST` times `SECONDS_PER_COST`, the
rate measured on Fashion-MNIST (6 layers, 3x3 grids of 28x28, 2 CPU cores).
A result running longer than expected is extrapolated from its own
units done, when it reports any.
"""

import json
import logging
import os
import threading
import time
from typing import Callable, Optional, Sequence

# Relative cost of one unit (a localisation grid of 3x3 images, or one image
# of pixel removal), in forward passes of a grid-sized input. Localisation:
# measured per 100 grids of 3x3 on Fashion-MNIST at T = 1000 (Ours 25 s,
# GradCAM 11 s, IxG 94 s, DeepLIFT 79 s, Grad 89 s, IntGrad ~1200 s); the
# perturbation methods count their forward passes from their options.
_GRID_COST = {"ours": 5.0, "gradcam": 2.2, "ixg": 19.0, "deeplift": 16.0, "grad": 18.0,
              "intgrad": 240.0}
SECONDS_PER_COST = 0.05  # Seconds per cost unit on 2 CPU cores (the measurement above).
LOG_EVERY_SECS = 60.0


def unit_cost(metric: str, method: str, options: dict, image_size: int, grid_size: int,
              points: int) -> float:
  """`metric`'s relative cost per unit for `method` with its options (see _GRID_COST)."""
  if method in _GRID_COST:
    per_grid = _GRID_COST[method]
  elif method in ("occ5", "occ9"):  # One forward per patch position.
    side = -(-image_size * grid_size // int(options.get("stride", 1)))
    per_grid = float(side * side)
  elif method == "rise":
    per_grid = float(options.get("num_masks", 6000))
  elif method == "lime":
    per_grid = float(options.get("num_samples", 256)) * grid_size * grid_size
  else:  # Unknown: as a gradient method.
    per_grid = _GRID_COST["grad"]
  if metric == "localisation":
    return per_grid
  # One image is 1/n^2 of a grid; plus its masked forwards, each 1/n^2 of a grid's.
  return (per_grid + points) / (grid_size * grid_size)


def stored_seconds_per_unit(out_dir: str, metric: str, method: str,
                            grid_size: int) -> Optional[float]:
  """Seconds per unit of a result stored earlier in out_dir (its JSON line's
  "seconds" over its units: the scores' count over n*n per grid, or over the
  points per image), or None."""
  try:
    with open(os.path.join(out_dir, metric, f"{method}.json")) as f:
      line = json.loads(f.readline())
    per_unit = grid_size * grid_size if metric == "localisation" else len(line["curve"])
    units = int(line["files"][f"{method}.npy"]["count"]) // per_unit
    return float(line["seconds"]) / units if line.get("seconds") and units else None
  except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
    return None


def _duration(seconds: float) -> str:
  seconds = int(round(max(seconds, 0)))
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
  """The progress of a run's results (see the module docstring).

  jobs: [(metric, method)] in run order; units: {metric: units per result};
  costs: {(metric, method): relative cost per unit}; measured: {(metric,
  method): seconds per unit} known in advance (stored results). `clock` and
  `log` are for tests. Use as a context manager to get a line every
  `every` seconds from a background thread, also while one XLA call runs long.
  """

  def __init__(self, jobs: Sequence[tuple], units: dict, costs: dict,
               measured: Optional[dict] = None, *, clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] = lambda s: logging.info("%s", s),
               every: float = LOG_EVERY_SECS):
    self.jobs, self.units, self.costs = list(jobs), units, costs
    self.measured = dict(measured or {})
    self.clock, self.log, self.every = clock, log, every
    self.start = self.clock()
    self.finished = []   # [(job, seconds, cost)] computed in this run.
    self.skipped = 0     # Results found done (stored).
    self.completed = set()  # Every job done, computed or stored.
    self.current, self.current_start, self.current_units = None, None, 0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None

  # ------------------------------------------------------------- updates

  def started(self, job: tuple) -> None:
    with self._lock:
      self.current, self.current_start, self.current_units = job, self.clock(), 0

  def counted(self, units: int) -> None:
    with self._lock:
      self.current_units += units

  def reached(self, units: int) -> None:
    """The current result has `units` done (a running total)."""
    with self._lock:
      self.current_units = units

  def done(self, job: tuple, computed: bool) -> None:
    with self._lock:
      if computed and self.current_start is not None:
        seconds = self.clock() - self.current_start
        self.finished.append((job, seconds, self._cost(job)))
        self.measured.setdefault(job, seconds / max(1, self.units[job[0]]))
      elif not computed:
        self.skipped += 1
      self.completed.add(job)
      self.current, self.current_start = None, None

  def counting(self, fn):
    """fn(x, ...) that counts one unit per row of x after each call."""

    def counted(x, *args):
      out = fn(x, *args)
      self.counted(len(x))
      return out
    return counted

  # ------------------------------------------------------------ estimates

  def _cost(self, job: tuple) -> float:
    return self.units[job[0]] * self.costs.get(job, 1.0)

  def expected(self, job: tuple) -> float:
    """The seconds `job` is expected to take."""
    if job in self.measured:
      return self.measured[job] * self.units[job[0]]
    seconds = sum(s for _, s, _ in self.finished)
    cost = sum(c for _, _, c in self.finished)
    rate = seconds / cost if seconds > 0 and cost > 0 else SECONDS_PER_COST
    return self._cost(job) * rate

  def eta(self) -> float:
    """Seconds until every job is done."""
    with self._lock:
      later = [j for j in self.jobs if j not in self.completed and j != self.current]
      rest = 0.0
      if self.current is not None:
        elapsed = self.clock() - self.current_start
        expected = self.expected(self.current)
        total_units = self.units[self.current[0]]
        if 0 < self.current_units < total_units and elapsed > expected:
          expected = elapsed * total_units / self.current_units  # Its own pace.
        rest = max(expected - elapsed, 0.0)
      return rest + sum(self.expected(j) for j in later)

  def line(self) -> str:
    """One plain line: results done/total, the current result, elapsed, ETA."""
    n_done = len(self.finished) + self.skipped
    text = f"evaluate: {n_done}/{len(self.jobs)} results done"
    if self.current is not None:
      metric, method = self.current
      unit = "grids" if metric == "localisation" else "images"
      text += (f"; {metric} of {method}: {min(self.current_units, self.units[metric])}/"
               f"{self.units[metric]} {unit}, {_duration(self.clock() - self.current_start)} "
               f"so far")
    return (f"{text}; elapsed {_duration(self.clock() - self.start)}, "
            f"ETA {_duration(self.eta())} (from measured costs).")

  # ------------------------------------------------------------- the thread

  def __enter__(self):
    def run():
      while not self._stop.wait(self.every):
        self.log(self.line())
    self._thread = threading.Thread(target=run, name="codajax-progress", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    return False
