"""Tests of codajax.progress: --mode evaluate's ETA weighs each result by its cost."""

import threading
import time

import numpy as np
import pytest

from codajax import progress
from codajax import result_store

LOC, REM = "localisation", "pixel_removal"


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def tracker(jobs, units, costs, measured=None):
  clock, lines = Clock(), []
  return progress.Progress(jobs, units, costs, measured, clock=clock, log=lines.append), clock


def test_unit_costs_order_the_methods_as_measured_and_count_forward_passes():
  cost = lambda metric, method, **o: progress.unit_cost(metric, method, o, 28, 3, 197)
  assert cost(LOC, "gradcam") < cost(LOC, "ours") < cost(LOC, "grad") < cost(LOC, "intgrad")
  # Occlusion: one forward per patch position of the 84x84 grid.
  assert cost(LOC, "occ9", stride=2) == 42 * 42
  assert cost(LOC, "occ9", stride=1) == 4 * cost(LOC, "occ9", stride=2)
  # An image of pixel removal: a ninth of a grid's attribution plus its masked forwards.
  assert cost(REM, "ours") == pytest.approx((5.0 + 197) / 9)


def test_the_eta_weighs_results_by_cost_calibrated_by_what_finished():
  jobs = [(LOC, "ours"), (LOC, "intgrad"), (REM, "ours")]
  costs = {(LOC, "ours"): 5.0, (LOC, "intgrad"): 240.0, (REM, "ours"): 20.0}
  p, clock = tracker(jobs, {LOC: 100, REM: 50}, costs)
  # Before anything ran: the default rate.
  assert p.eta() == pytest.approx((500 + 24000 + 1000) * progress.SECONDS_PER_COST)
  p.started(jobs[0])
  clock.now = 50.0  # Ours took 50 s for 500 cost units: 0.1 s per unit.
  p.done(jobs[0], computed=True)
  assert p.eta() == pytest.approx(0.1 * (24000 + 1000))
  # Counting grids alike would have said 150 of 250 units are left: 75 s.
  p.started(jobs[1])
  clock.now = 50.0 + 600.0
  assert p.eta() == pytest.approx(0.1 * 24000 - 600 + 0.1 * 1000)
  line = p.line()
  assert line.startswith("evaluate: 1/3 results done; localisation of intgrad: 0/100 grids, "
                         "10m00s so far; elapsed 10m50s, ETA 31m40s")


def test_a_result_slower_than_expected_is_extrapolated_from_its_own_units():
  jobs = [(LOC, "grad")]
  p, clock = tracker(jobs, {LOC: 100}, {(LOC, "grad"): 1.0}, measured={(LOC, "grad"): 0.5})
  p.started(jobs[0])
  clock.now = 100.0  # Expected 50 s in all; 100 s in, only 20 of 100 grids are done.
  p.counted(20)
  assert p.eta() == pytest.approx(400.0)
  p.reached(50)  # A running total (pixel removal's curves).
  assert p.eta() == pytest.approx(100.0)


def test_stored_results_count_as_done_and_their_time_is_the_measured_cost(tmp_path):
  out = str(tmp_path)
  result_store.write(out, LOC, "ixg", result_store.Stored(
      {"headline": 0.1, "seconds": 94.0}, np.zeros((100, 9)), None))
  result_store.write(out, REM, "ixg", result_store.Stored(
      {"headline": 0.1, "seconds": 50.0, "curve": [0.0] * 197}, np.zeros((500, 197)), None))
  assert progress.stored_seconds_per_unit(out, LOC, "ixg", 3) == pytest.approx(0.94)
  assert progress.stored_seconds_per_unit(out, REM, "ixg", 3) == pytest.approx(0.1)
  assert progress.stored_seconds_per_unit(out, LOC, "grad", 3) is None
  p, _ = tracker([(LOC, "ixg")], {LOC: 100}, {}, measured={(LOC, "ixg"): 0.94})
  assert p.eta() == pytest.approx(94.0)
  p.done((LOC, "ixg"), computed=False)
  assert p.line().startswith("evaluate: 1/1 results done;") and p.eta() == 0


def test_a_line_is_logged_every_interval_even_while_one_call_runs_long():
  lines, release = [], threading.Event()
  p = progress.Progress([(LOC, "ours")], {LOC: 4}, {}, log=lines.append, every=0.05)
  with p:
    p.started((LOC, "ours"))
    slow = p.counting(lambda x: release.wait(0.4))  # One long call, as one XLA call.
    slow(np.zeros((4, 1)))
    p.done((LOC, "ours"), computed=True)
  count = len(lines)
  assert count >= 4, lines
  assert "localisation of ours: 0/4 grids" in lines[0]
  time.sleep(0.15)
  assert len(lines) == count  # The thread stopped with the run.
