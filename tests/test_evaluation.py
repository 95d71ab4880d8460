"""--mode evaluate end to end on the digits config (codajax.evaluation)."""

import ast
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from codajax import attribution
from codajax import bootstrap
from codajax import checkpoint
from codajax import config_lib
from codajax import evaluation
from codajax import evaluation_done
from codajax import plotting
from codajax import result_store
from codajax import train
from codajax import workdir as workdir_lib
from configs import digits as digits_config
from configs import image_folder as image_folder_config

METHODS = ("ours", "ixg", "occ5")


# configs/digits.py:tiny with these fields: a 40-step net, a small evaluation.
TRAINING = dict(num_steps=40, batch_size=32, eval_batch_size=360, learning_rate=2e-3,
                log_every_steps=40, eval_every_steps=40, checkpoint_every_steps=40,
                explain_at_end=False)
# conf_thresh 0: a 40-step model has few confident images.
EVALUATION = dict(methods=METHODS, grid_size=2, num_grids=4, conf_thresh=0.0, num_images=8,
                  points=8, batch_size=4, num_comparison=2)


def digits_evaluation(**options):
  c = digits_config.get_config("tiny")
  c.update(TRAINING)
  c.evaluation.update(EVALUATION)
  c.evaluation.update(options)
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
  assert result.step == 40
  assert sorted(map(os.path.basename, result.figures)) == [
      "comparison.png", "localisation.png", "pixel_removal.png"]
  for path in result.figures:
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
    assert result.metrics[f"localisation/{method}"] == loc["mean"]
    assert np.load(os.path.join(out, "localisation", f"{method}_maps.npy")).shape == (
        2, 4, 32, 32)

    removal = stored(workdir, "pixel_removal", method)
    curves = np.load(os.path.join(out, "pixel_removal", f"{method}.npy"))
    assert curves.shape == (8, 9)  # 64 of 256 pixels in 8 steps of 8: 9 points.
    np.testing.assert_allclose(removal["curve"], curves.mean(0), rtol=1e-6)
    np.testing.assert_allclose(removal["curve_mean"], curves.mean(), rtol=1e-6)
    assert removal["last"] == result.metrics[f"pixel_removal/{method}"]
    assert removal["settings"]["metric"]["fill"] == "encoded_zero"
    for line in (loc, removal):  # Digits come in no known order: a seeded shuffle.
      assert line["data"]["image_order"] == "shuffled" and line["data"]["image_seed"] == 42
      assert line["checkpoint"]["step"] == 40 and len(line["checkpoint"]["params"]) == 64
  # Unperturbed, every method starts from the same probabilities.
  first = [np.load(os.path.join(out, "pixel_removal", f"{m}.npy"))[:, 0] for m in METHODS]
  np.testing.assert_array_equal(first[0], first[1])
  monkeypatch.undo()

  # Run again: nothing recomputed; with another occ5 option only occ5 is.
  calls = count_calls(monkeypatch)
  again = train.train_and_evaluate(digits_evaluation(), workdir, mode="evaluate")
  assert calls == {}
  assert headlines(again) == headlines(result)
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
  assert [os.path.basename(p) for p in result.figures] == ["pixel_removal.png"]
  assert set(result.summary()) == {"step", "pixel_removal/ours"}


# ------------------------------------------- results that cannot be trusted

TWO = ("ours", "ixg")


def copy_checkpoints(trained, workdir):
  """A workdir holding only the trained checkpoints (no evaluation yet)."""
  shutil.copytree(os.path.join(trained, "checkpoints"), os.path.join(workdir, "checkpoints"))
  return str(workdir)


def scores_of(workdir, methods=TWO):
  """{(metric, method, suffix): the stored array} of every result file."""
  out = os.path.join(workdir, "evaluation")
  return {(metric, m, suffix): np.load(os.path.join(out, metric, f"{m}{suffix}.npy"))
          for metric in config_lib.METRICS for m in methods
          for suffix in ("", "_maps") if metric == "localisation" or not suffix}


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and r.getMessage().startswith("evaluate:")]


def headlines(result):
  return result.summary()  # The step and the scores.


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
  """A workdir with the trained checkpoints, evaluated for ours and ixg."""
  workdir = copy_checkpoints(trained, tmp_path_factory.mktemp("evaluated"))
  result = train.train_and_evaluate(digits_evaluation(methods=TWO), workdir, mode="evaluate")
  return workdir, result


def test_a_changed_model_recomputes_every_result(evaluated, tmp_path, monkeypatch, caplog):
  """Stored scores hold only for the model they were computed with: with another
  temperature every result is recomputed, as a fresh evaluation computes it."""
  workdir = str(tmp_path / "changed")
  shutil.copytree(evaluated[0], workdir)
  config = digits_evaluation(methods=TWO)
  config.model.temperature = 5.0  # The tiny digits net has 10.
  calls = count_calls(monkeypatch)
  caplog.set_level(logging.INFO)
  changed = train.train_and_evaluate(config, workdir, mode="evaluate")
  assert calls == {"ours": 3, "ixg": 3}  # 1 call of 4 grids, 2 of 4 images each.
  stale = warnings_of(caplog)
  assert len(stale) == 4 and all(
      "stored result is stale (model.temperature 10.0 -> 5.0); recomputing." in w
      for w in stale), stale
  for metric in config_lib.METRICS:
    assert stored(workdir, metric, "ours")["model"]["temperature"] == 5.0
  monkeypatch.undo()

  fresh_dir = copy_checkpoints(evaluated[0], tmp_path / "fresh")
  fresh = train.train_and_evaluate(config, fresh_dir, mode="evaluate")
  assert headlines(changed) == headlines(fresh)
  want = scores_of(fresh_dir)
  for key, got in scores_of(workdir).items():
    np.testing.assert_array_equal(got, want[key], err_msg=str(key))
  # The removal curves do change with the temperature (localisation need not).
  assert changed.metrics["pixel_removal/ours"] != evaluated[1].metrics["pixel_removal/ours"]


def test_missing_or_damaged_files_are_recomputed(evaluated, tmp_path, monkeypatch, caplog):
  """A result is done only when its files agree with its summary line; any
  other is recomputed after one warning naming the file, and drawn."""
  workdir = str(tmp_path / "damaged")
  shutil.copytree(evaluated[0], workdir)
  out = os.path.join(workdir, "evaluation")
  before = scores_of(workdir)
  os.remove(os.path.join(out, "localisation", "ixg.npy"))
  with open(os.path.join(out, "localisation", "ours_maps.npy"), "r+b") as f:
    f.truncate(os.path.getsize(f.name) // 2)  # Mid-data.
  with open(os.path.join(out, "pixel_removal", "ours.npy"), "r+b") as f:
    f.truncate(20)  # In the header.
  np.save(os.path.join(out, "pixel_removal", "ixg.npy"),  # Readable, but not the scores.
          np.zeros_like(before["pixel_removal", "ixg", ""]))
  calls = count_calls(monkeypatch)
  drawn = {}
  draw = plotting.plot_localisation
  monkeypatch.setattr(plotting, "plot_localisation",
                      lambda scores, *a, **k: drawn.update(scores) or draw(scores, *a, **k))
  caplog.set_level(logging.INFO)
  result = train.train_and_evaluate(digits_evaluation(methods=TWO), workdir, mode="evaluate")
  assert calls == {"ours": 3, "ixg": 3}  # Every result, each once.
  warned = warnings_of(caplog)
  assert len(warned) == 4, warned
  for name in ("localisation/ixg.npy is missing;", "localisation/ours_maps.npy is damaged (",
               "pixel_removal/ours.npy is damaged (", "pixel_removal/ixg.npy is damaged (its "
               "sha256 differs from its summary's)"):
    assert sum(w.startswith(f"evaluate: {out}/{name}") for w in warned) == 1, (name, warned)
  assert all(w.endswith("; recomputing it.") and "\n" not in w for w in warned)
  assert set(drawn) == set(TWO)
  for key, got in scores_of(workdir).items():
    np.testing.assert_array_equal(got, before[key], err_msg=str(key))
  assert headlines(result) == headlines(evaluated[1])
  for metric in config_lib.METRICS:  # Done again: the files agree with the line.
    line = stored(workdir, metric, "ixg")
    record = {k: line[k] for k in ("checkpoint", "model", "data", "settings")}
    done, why = result_store.stored_result(out, metric, "ixg", record)
    assert why is None and done.line["files"]["ixg.npy"]["count"] == done.scores.size


def test_a_stop_request_ends_after_the_result_in_flight(evaluated, tmp_path, monkeypatch):
  """`stops` filled while ixg's localisation runs: that result is written
  whole, nothing after it runs, and the rerun computes only the rest."""
  workdir = copy_checkpoints(evaluated[0], tmp_path / "stopped")
  out = os.path.join(workdir, "evaluation")
  stops, calls = [], []
  original = attribution.attribute

  def attribute(method, *args, **kw):
    calls.append(method)
    if method == "ixg":
      stops.append("SIGTERM")
    return original(method, *args, **kw)
  monkeypatch.setattr(attribution, "attribute", attribute)
  run = train.setup(digits_evaluation(methods=TWO), workdir)
  try:
    result = evaluation.evaluate(run.model, {"params": run.state.params}, run.config,
                                       run.info, run.start, out, run.batch_sharding,
                                       meta=run.meta, stops=stops)
  finally:
    run.close()
  assert calls == ["ours", "ixg"]  # One call of 4 grids each; no pixel removal.
  assert result["preempted"] == {"signal": "SIGTERM",
                                 "kept": ["localisation/ours", "localisation/ixg"]}
  assert result["figures"] == [] and set(result) == {
      "localisation/ours", "localisation/ixg", "figures", "preempted"}
  assert not os.path.exists(os.path.join(out, "pixel_removal"))
  assert sorted(os.listdir(os.path.join(out, "localisation"))) == [
      "ixg.json", "ixg.npy", "ixg_maps.npy", "ours.json", "ours.npy", "ours_maps.npy"]
  monkeypatch.undo()
  counted = count_calls(monkeypatch)
  again = train.train_and_evaluate(digits_evaluation(methods=TWO), workdir, mode="evaluate")
  assert counted == {"ours": 2, "ixg": 2}  # Pixel removal only.
  assert headlines(again) == headlines(evaluated[1])


def test_class_sorted_test_images_are_shuffled(tmp_path):
  """An image folder's test split comes class by class: the images both metrics
  see first are a seeded shuffle of it, unless image_order='dataset'."""
  for split, per_class in (("train", 1), ("test", 6)):
    for c, color in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9))):
      folder = tmp_path / split / f"class{c}"
      folder.mkdir(parents=True)
      for i in range(per_class):
        image = np.broadcast_to(np.array(color, np.uint8), (8, 8, 3))
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
  config = image_folder_config.get_config("tiny")
  config.update(data_dir=str(tmp_path), image_size=8)
  config.evaluation.num_images = 6
  assert config_lib.image_order(config) == "shuffled"
  images, labels = evaluation.evaluation_images(config)
  assert set(labels[:6]) == {0, 1, 2, 3}  # The first num_images cover every class.
  assert sorted(labels) == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6  # The whole split ...
  again = evaluation.evaluation_images(config)  # ... in a seeded order.
  np.testing.assert_array_equal(again[1], labels)
  np.testing.assert_array_equal(again[0], images)
  assert result_store.data_record(config)["image_seed"] == 42
  config.evaluation.image_order = "dataset"  # As read: one class after another.
  np.testing.assert_array_equal(evaluation.evaluation_images(config)[1][:6], [0] * 6)
  assert result_store.data_record(config)["image_seed"] is None


def test_summary_holds_the_bootstrap_intervals_and_paired_differences(evaluated):
  """evaluation/summary.json, checked against a direct computation: the mean of
  each method with its CI over whole grids (localisation) or images (pixel
  removal), and ours - ixg on the same grids and images."""
  workdir, _ = evaluated
  e = digits_evaluation(methods=TWO).evaluation
  with open(os.path.join(workdir, "evaluation", "summary.json")) as f:
    summary = json.load(f)
  assert summary["bootstrap"] == {
      "resamples": e.bootstrap_resamples, "seed": e.bootstrap_seed, "confidence": 0.95,
      "units": {"localisation": "grids", "pixel_removal": "images"}}
  opts = dict(num_resamples=e.bootstrap_resamples, seed=e.bootstrap_seed)
  scores = scores_of(workdir)
  units = {("localisation", m): scores["localisation", m, ""].mean(axis=1) for m in TWO}
  units.update({("pixel_removal", m): scores["pixel_removal", m, ""][:, -1] for m in TWO})
  for (metric, method), v in units.items():
    assert len(v) == (4 if metric == "localisation" else 8)  # Grids; images.
    got = summary[metric]["methods"][method]
    want = bootstrap.mean_interval(v, **opts)
    assert got == {"mean": pytest.approx(want.mean), "low": pytest.approx(want.low),
                   "high": pytest.approx(want.high), "n": len(v)}
    assert got["mean"] == pytest.approx(stored(workdir, metric, method)["headline"])
    diff, share = bootstrap.paired_difference(units[metric, "ours"], v, **opts)
    if method == "ours":
      assert method not in summary[metric].get("ours_minus", {})
      continue
    assert summary[metric]["ours_minus"][method] == {
        "mean": pytest.approx(diff.mean), "low": pytest.approx(diff.low),
        "high": pytest.approx(diff.high), "share_ours_higher": share, "n": len(v)}


# ------------------------------------------------ a rerun with nothing to do


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_evaluate(workdir, **evaluation):
  """`python -m codajax.main --mode evaluate` with digits_evaluation(**evaluation)."""
  fields = {**TRAINING, **{f"evaluation.{k}": v for k, v in {**EVALUATION, **evaluation}.items()}}
  argv = [sys.executable, "-m", "codajax.main", "--config=configs/digits.py:tiny",
          f"--workdir={workdir}", "--mode=evaluate"]
  argv += [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
           for k, v in fields.items()]
  env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_rerun_with_nothing_to_compute_ends_before_start_up(evaluated, tmp_path):
  """The CLI prints the full run's lines (its numbers, its figures) from the
  stored results, without importing JAX (which logs "JAX process ...")."""
  (workdir, result), copy = evaluated, str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  out = cli_evaluate(copy, methods=TWO)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  done = "codajax evaluate done: "
  assert lines[0].startswith(done) and ast.literal_eval(lines[0][len(done):]) == headlines(result)
  assert lines[3:] == [f"  figure: {p.replace(workdir, copy)}" for p in result.figures]
  assert "every result is stored for the checkpoint of step 40" in out.stderr, out.stderr
  assert "JAX process" not in out.stderr


def test_a_rerun_computes_when_anything_it_reports_changed(evaluated, tmp_path):
  """No stored number is reported for another checkpoint, config, setting,
  summary or figure: evaluation_done.check says None, and the full run runs."""
  (workdir, result), copy = evaluated, str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  out, ckpt = os.path.join(copy, "evaluation"), os.path.join(copy, "checkpoints")
  check = lambda **options: evaluation_done.check(
      digits_evaluation(**{"methods": TWO, **options}), copy)
  done = check()
  assert done.step == 40 and done.metrics == result.metrics
  assert done.figures == [p.replace(workdir, copy) for p in result.figures]
  changed = digits_evaluation(methods=TWO)
  changed.model.temperature = 5.0
  assert evaluation_done.check(changed, copy) is None
  # A metric's setting; the summary's, a figure's, the methods (none in a result record).
  for options in (dict(num_images=6), dict(bootstrap_resamples=500), dict(num_comparison=1),
                  dict(methods=("ours",))):
    assert check(**options) is None, options

  def edit_meta(folder, **fields):
    path = os.path.join(ckpt, str(folder), "meta", "metadata")
    with open(path) as f:
      meta = json.load(f)
    with open(path, "w") as f:
      json.dump({**meta, **fields}, f)
    return meta
  shutil.copytree(os.path.join(ckpt, "40"), os.path.join(ckpt, "80"))
  edit_meta(80, step=80)  # A newer checkpoint: its results are not stored.
  assert check() is None
  shutil.rmtree(os.path.join(ckpt, "80"))
  meta = edit_meta(40, digest={"params": "0" * 64})  # Other params at the same step.
  assert check() is None
  edit_meta(40, **meta)
  for name in ("summary.json", "pixel_removal.png"):  # Written over or missing.
    original = shutil.copy(os.path.join(out, name), str(tmp_path / name))
    with open(os.path.join(out, name), "ab") as f:
      f.write(b" ")
    assert check() is None, name
    os.remove(os.path.join(out, name))
    assert check() is None, name
    shutil.copy(original, os.path.join(out, name))
  held = workdir_lib.Workdir(copy, ckpt)
  held.open()  # Another run holds the workdir.
  try:
    assert check() is None
  finally:
    held.close()
  assert check() == done  # Everything as it was.


def test_result_files_are_digested_as_the_checkpoints_are():
  for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((2, 0, 3)),
                np.arange(10)[::3], np.float64(2.5)):
    assert result_store.array_digest(array) == checkpoint.digest_of(array)
