"""--mode evaluate end to end on the digits config (codajax.interpretability)."""

import json
import os

import numpy as np
import pytest

from codajax import attribution
from codajax import config_lib
from codajax import train
from configs import digits as digits_config

METHODS = ("ours", "ixg", "occ5")


def digits_evaluation(**evaluation):
  c = digits_config.get_config("tiny")
  c.update(num_steps=40, batch_size=32, eval_batch_size=360, learning_rate=2e-3,
           log_every_steps=40, eval_every_steps=40, checkpoint_every_steps=40,
           explain_at_end=False)
  # conf_thresh 0: a 40-step model has few confident images.
  c.evaluation.update(methods=METHODS, grid_size=2, num_grids=4, conf_thresh=0.0,
                      num_images=8, points=8, batch_size=4, num_comparison=2)
  c.evaluation.update(evaluation)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits"))
  train.train_and_evaluate(digits_evaluation(), workdir)
  return workdir


def stored(workdir, metric, method):
  with open(os.path.join(workdir, "evaluation", metric, f"{method}.json")) as f:
    lines = f.read().splitlines()
  assert len(lines) == 1  # One JSON line.
  return json.loads(lines[0])


def count_calls(monkeypatch, fail=()):
  """Counts attribution.attribute calls per method; raises for methods in `fail`."""
  calls = {}
  original = attribution.attribute

  def attribute(method, *args, **kw):
    if method in fail:
      raise KeyboardInterrupt(f"killed during {method}")
    calls[method] = calls.get(method, 0) + 1
    return original(method, *args, **kw)
  monkeypatch.setattr(attribution, "attribute", attribute)
  return calls


def test_evaluate_writes_scores_summaries_and_figures_and_resumes(trained, monkeypatch):
  workdir = trained
  out = os.path.join(workdir, "evaluation")
  # A run killed during occ5 keeps the methods finished before it.
  calls = count_calls(monkeypatch, fail=("occ5",))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(digits_evaluation(), workdir, mode="evaluate")
  assert sorted(os.listdir(os.path.join(out, "localisation"))) == [
      "ixg.json", "ixg.npy", "ixg_maps.npy", "ours.json", "ours.npy", "ours_maps.npy"]
  monkeypatch.undo()

  calls = count_calls(monkeypatch)
  result = train.train_and_evaluate(digits_evaluation(), workdir, mode="evaluate")
  assert set(calls) == {"occ5", "ours", "ixg"}  # occ5 for both metrics ...
  assert calls["ours"] == calls["ixg"] == 2  # ... the others for pixel removal only.
  assert result["step"] == 40
  assert sorted(map(os.path.basename, result["figures"])) == [
      "comparison.png", "localisation.png", "pixel_removal.png"]
  for path in result["figures"]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  for method in METHODS:
    loc = stored(workdir, "localisation", method)
    scores = np.load(os.path.join(out, "localisation", f"{method}.npy"))
    assert scores.shape == (4, 4) and ((scores >= 0) & (scores <= 1)).all()
    assert loc["step"] == 40 and loc["count"] == 16
    np.testing.assert_allclose(loc["mean"], scores.mean(), rtol=1e-6)
    np.testing.assert_allclose([loc["q1"], loc["median"], loc["q3"]],
                               np.percentile(scores, [25, 50, 75]), rtol=1e-6)
    assert loc["settings"]["metric"]["grid_size"] == 2
    assert loc["settings"]["options"] == dict(config_lib.ATTRIBUTION_OPTIONS[method])
    assert result[f"localisation/{method}"] == loc["mean"]
    assert np.load(os.path.join(out, "localisation", f"{method}_maps.npy")).shape == (
        2, 4, 32, 32)

    removal = stored(workdir, "pixel_removal", method)
    curves = np.load(os.path.join(out, "pixel_removal", f"{method}.npy"))
    assert curves.shape == (8, 9)  # 64 of 256 pixels in 8 steps of 8: 9 points.
    np.testing.assert_allclose(removal["curve"], curves.mean(0), rtol=1e-6)
    np.testing.assert_allclose(removal["curve_mean"], curves.mean(), rtol=1e-6)
    assert removal["last"] == result[f"pixel_removal/{method}"]
    assert removal["settings"]["metric"]["fill"] == "encoded_zero"
  # Unperturbed, every method starts from the same probabilities.
  first = [np.load(os.path.join(out, "pixel_removal", f"{m}.npy"))[:, 0] for m in METHODS]
  np.testing.assert_array_equal(first[0], first[1])
  monkeypatch.undo()

  # Run again: nothing recomputed; with another occ5 option only occ5 is.
  calls = count_calls(monkeypatch)
  again = train.train_and_evaluate(digits_evaluation(), workdir, mode="evaluate")
  assert calls == {}
  assert {k: v for k, v in again.items() if k != "figures"} == {
      k: v for k, v in result.items() if k != "figures"}
  config = digits_evaluation()
  config.evaluation.options.occ5.exact_patch = True
  train.train_and_evaluate(config, workdir, mode="evaluate")
  assert set(calls) == {"occ5"}
  assert stored(workdir, "localisation", "occ5")["settings"]["options"]["exact_patch"]


def test_too_few_confident_images_is_one_line(trained):
  config = digits_evaluation(num_grids=10_000)
  with pytest.raises(config_lib.ConfigError, match=(
      r"config.evaluation.num_grids=10000: make_grids: .* grids of 2x2, not 10000")):
    train.train_and_evaluate(config, trained, mode="evaluate")


def test_pixel_removal_alone_draws_only_its_figure(trained):
  """Without localisation there are no grids: no comparison figure (it crashed
  when an earlier run had stored comparison maps)."""
  os.makedirs(os.path.join(trained, "evaluation", "localisation"), exist_ok=True)
  np.save(os.path.join(trained, "evaluation", "localisation", "ours_maps.npy"),
          np.zeros((2, 4, 32, 32), np.float32))
  result = train.train_and_evaluate(digits_evaluation(metrics=("pixel_removal",),
                                                      methods=("ours",)),
                                    trained, mode="evaluate")
  assert [os.path.basename(p) for p in result["figures"]] == ["pixel_removal.png"]
  assert set(result) == {"step", "pixel_removal/ours", "figures"}
