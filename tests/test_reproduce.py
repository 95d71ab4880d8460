"""Tests of codajax.reproduce: the report's verdicts follow the intervals of the stored scores."""

import json
import os

import numpy as np
import pytest

from codajax import bootstrap
from codajax import metrics
from codajax import reproduce
from codajax import result_store

# Per method, the mean localisation score its fake grids are drawn around.
LEVELS = {"ours": 0.6, "occ9": 0.6, "gradcam": 0.4, "grad": 0.15, "ixg": 0.15}


def fake_run(root, t, levels, grids=60, images=40, curve=(0.5, 0.80, 0.85, 0.851), seed=0,
             removal=True):
  """A 6L-T<t> workdir as the reproduction leaves it: metrics.jsonl and stored results."""
  workdir = os.path.join(root, f"6L-T{t}")
  out = os.path.join(workdir, "evaluation")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, top1 in enumerate(curve, 1):
      f.write(json.dumps({"step": 100 * i, "train/loss": 0.1}) + "\n")
      f.write(json.dumps({"step": 100 * i, "eval/top1": top1}) + "\n")
  rng = np.random.default_rng(seed)
  difficulty = rng.uniform(-0.1, 0.1, size=(grids, 1))  # Shared by the methods: pairing.
  for m, level in levels.items():
    scores = np.clip(level + difficulty + rng.normal(0, 0.02, (grids, 9)), 0, 1)
    g = grids // 2 if m == "occ9" else grids  # Fewer grids: paired on the first ones.
    result_store.write(out, "localisation", m, result_store.Stored(
        {"headline": float(scores[:g].mean())}, scores[:g], np.zeros((1, 9, 6, 6))))
    curves = np.clip(level + rng.normal(0, 0.05, (images, 5)), 0, 1)
    if removal:
      result_store.write(out, "pixel_removal", m, result_store.Stored(
          {"headline": float(curves[:, -1].mean()), "fraction": 0.25}, curves, None))
  return workdir


def test_verdicts_follow_the_paired_and_unpaired_intervals(tmp_path):
  root = str(tmp_path / "runs")
  fake_run(root, 10, {"ours": 0.3, "gradcam": 0.3}, seed=1)
  fake_run(root, 100, {"ours": 0.5, "gradcam": 0.3}, seed=2, curve=(0.5, 0.7, 0.8, 0.83))
  top = fake_run(root, 1000, LEVELS, seed=3)
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{reproduce.BEGIN}\nold table\n{reproduce.END}\noutro\n")
  reproduce.main(["--runs", root, "--out", str(tmp_path / "docs"), "--readme", str(readme)])
  text = (tmp_path / "docs" / "results.md").read_text()
  assert readme.read_text() == f"intro\n{reproduce.BEGIN}\n{text}{reproduce.END}\noutro\n"
  for name in ("accuracy.png", "localisation.png", "pixel_removal.png"):
    assert (tmp_path / "docs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  units = {m: metrics.unit_values("localisation", np.load(
      os.path.join(top, "evaluation", "localisation", f"{m}.npy"))) for m in LEVELS}
  occ9 = bootstrap.paired_difference(units["ours"][:30], units["occ9"])[0]
  gradcam = bootstrap.paired_difference(units["ours"], units["gradcam"])[0]
  assert bootstrap.verdict(gradcam) == "reproduces"
  assert (f"- ours > gradcam (T = 1000): **reproduces**: {gradcam.mean:+.3f} "
          f"[{gradcam.low:+.3f}, {gradcam.high:+.3f}] on 60 grids") in text
  assert (f"- ours > occ9 (T = 1000): **{bootstrap.verdict(occ9)}**: {occ9.mean:+.3f} "
          f"[{occ9.low:+.3f}, {occ9.high:+.3f}] on 30 grids") in text
  assert "- gradcam > intgrad (T = 1000): not run" in text
  assert "- Ours(T = 1000) > Ours(T = 100): **reproduces**" in text
  assert "- Ours(T = 100) > Ours(T = 10): **reproduces**" in text
  # The plateau column: T = 100 gained 3 points after 80% of its steps.
  assert "| 10 | 85.1% | +0.10 points | 400 | yes |" in text
  assert "| 100 | 83.0% | +3.00 points | 400 | no |" in text


def test_a_run_in_pieces_reports_what_is_done_and_compares_methods_at_t_1000(tmp_path):
  """T = 1000 stays the method comparison when T = 10000 (the extra) is there;
  a metric not run yet and a run not started are said, not guessed."""
  root = str(tmp_path / "runs")
  fake_run(root, 1000, {"ours": 0.6, "gradcam": 0.4}, removal=False)
  fake_run(root, 10000, {"ours": 0.5, "gradcam": 0.4}, seed=4, curve=(0.5, 0.6))
  os.makedirs(os.path.join(root, "6L-T10"))  # Created, not trained yet.
  text = reproduce.report(root, str(tmp_path / "docs"))
  assert "Localisation at T = 1000 " in text and "Pixel removal at T = 1000" in text
  assert "| not run yet | | | |" in text
  assert "- Ours(T = 10000) > Ours(T = 1000) (beyond the paper's temperatures): " \
         "**does not reproduce**" in text
  assert "| 10 |" not in text.split("Localisation")[0]
  assert "| 10000 | 60.0% | +10.00 points | 200 | training: step 200 of 400 |" in text
  assert os.path.exists(tmp_path / "docs" / "localisation.png")
  assert not os.path.exists(tmp_path / "docs" / "pixel_removal.png")


def test_a_damaged_result_is_named(tmp_path):
  root = str(tmp_path / "runs")
  top = fake_run(root, 1000, {"ours": 0.5, "gradcam": 0.4})
  path = os.path.join(top, "evaluation", "localisation", "gradcam.npy")
  with open(path, "r+b") as f:
    f.truncate(30)
  with pytest.raises(SystemExit, match=f"codajax.reproduce: {path} is damaged"):
    reproduce.main(["--runs", root, "--out", str(tmp_path / "docs")])
  with pytest.raises(SystemExit, match="No 6L-T<T> workdirs under"):
    reproduce.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "docs")])
