"""Tests of codajax.checkpoint: fallback past damaged steps, clear refusals, and
checkpoints written by earlier codajax (tests/testdata/main_c28d53c) still
restore to the same numbers.
"""

import glob
import json
import logging
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codajax import checkpoint
from codajax import explain
from codajax import models
from codajax import train
from configs import digits as digits_config

OLD_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "main_c28d53c")


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(checkpoint.directory(workdir)) if d.isdigit())


def _save_two(workdir):
  mngr = checkpoint.manager(workdir, asynchronous=False)
  params = {"layer_0": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  opt = {"mu": np.zeros(2, np.float32)}
  checkpoint.save(mngr, 1, params, opt, {"model": {}})
  checkpoint.save(mngr, 2, jax.tree.map(lambda x: x + 1, params), opt, {"model": {}})
  mngr.wait_until_finished()
  mngr.close()
  return params, opt


def _corrupt(workdir, step):
  for path in glob.glob(os.path.join(checkpoint.directory(workdir), str(step), "params",
                                     "**", "d", "*"), recursive=True):
    with open(path, "wb") as f:
      f.write(b"not a tensorstore chunk")


def _abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


# Orbax's failed reads of the damaged step leave an asyncio callback behind.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
  params, opt = _save_two(str(tmp_path))
  _corrupt(str(tmp_path), 2)
  mngr = checkpoint.manager(str(tmp_path), asynchronous=False)
  with caplog.at_level(logging.WARNING):
    step, restored, restored_opt, _ = checkpoint.restore(mngr, _abstract(params), _abstract(opt))
  assert step == 1
  chex.assert_trees_all_equal(jax.device_get(restored), params)
  chex.assert_trees_all_equal(jax.device_get(restored_opt), opt)
  assert any("unreadable" in r.getMessage() and "/2 " in r.getMessage()
             for r in caplog.records)
  assert checkpoint_steps(str(tmp_path)) == [1, 2]  # Nothing deleted.

  _corrupt(str(tmp_path), 1)
  with pytest.raises(checkpoint.CheckpointError, match="(?s)No readable checkpoint.*step 2.*step 1"):
    checkpoint.restore(mngr, _abstract(params), _abstract(opt))
  mngr.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_training_sets_unreadable_steps_aside_and_can_save_them_again(tmp_path, caplog):
  workdir = str(tmp_path)
  params, opt = _save_two(workdir)
  _corrupt(workdir, 2)
  ckpts = checkpoint.directory(workdir)
  os.makedirs(os.path.join(ckpts, "3"))  # A stray empty step folder.
  os.makedirs(os.path.join(ckpts, "corrupt", "2"))  # Set aside by an earlier run.
  mngr = checkpoint.manager(workdir, asynchronous=False)
  with caplog.at_level(logging.WARNING):
    step, restored, _, _ = checkpoint.restore(mngr, _abstract(params), _abstract(opt),
                                              set_aside=True)
  assert step == 1
  chex.assert_trees_all_equal(jax.device_get(restored), params)
  assert checkpoint_steps(workdir) == [1]
  assert sorted(os.listdir(os.path.join(ckpts, "corrupt"))) == ["2", "2.1", "3"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and "moved aside" in r.getMessage()]
  assert len(warnings) == 1
  assert f"{ckpts}/3 -> {ckpts}/corrupt/3" in warnings[0]
  assert f"{ckpts}/2 -> {ckpts}/corrupt/2.1" in warnings[0]
  assert "resuming from step 1" in warnings[0]
  for s in (2, 3):  # Training saves these steps again.
    checkpoint.save(mngr, s, params, opt, {"model": {}})
  mngr.wait_until_finished()
  mngr.close()
  assert checkpoint_steps(workdir) == [1, 2, 3]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_flipped_bit_in_the_parameters_is_caught_by_the_digest(tmp_path, caplog):
  """zstd (no checksum) stores random bits verbatim, so a flipped bit decodes silently."""
  workdir = str(tmp_path)
  bits = np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint32)
  params = {"w": bits.view(np.float32)}
  mngr = checkpoint.manager(workdir, asynchronous=False)
  for step in (1, 2):
    checkpoint.save(mngr, step, params, None, {})
  mngr.close()
  pattern, flipped = bits.tobytes()[4000:4040], []
  for path in glob.glob(os.path.join(checkpoint.directory(workdir), "2", "params", "**", "d",
                                     "*"), recursive=True):
    with open(path, "rb") as f:
      data = bytearray(f.read())
    at = data.find(pattern)
    if at >= 0:
      data[at + 1] ^= 1
      with open(path, "wb") as f:
        f.write(data)
      flipped.append(path)
  assert len(flipped) == 1
  mngr = checkpoint.manager(workdir, asynchronous=False)
  with caplog.at_level(logging.WARNING):
    step, restored, _, _ = checkpoint.restore(mngr, _abstract(params), set_aside=True)
  mngr.close()
  assert step == 1
  np.testing.assert_array_equal(np.asarray(restored["w"]).view(np.uint32), bits)
  assert os.listdir(os.path.join(checkpoint.directory(workdir), "corrupt")) == ["2"]
  assert any("params digest mismatch" in r.getMessage() for r in caplog.records)


def test_checkpoint_of_another_model_is_refused(tmp_path):
  params, opt = _save_two(str(tmp_path))
  other = {"layer_0": {"kernel": np.ones((4, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  mngr = checkpoint.manager(str(tmp_path), asynchronous=False)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"(?s)1 parameters differ.*layer_0.*kernel.*\(3, 2\).*\(4, 2\)"):
    checkpoint.restore(mngr, _abstract(other), _abstract(opt))
  mngr.close()


@pytest.mark.parametrize("keep", [0, -1])
def test_keeping_fewer_than_one_checkpoint_is_refused(tmp_path, keep):
  """keep_checkpoints=0 deleted every checkpoint; -1 crashed after the first save."""
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=rf"config.keep_checkpoints={keep}: it must be an "
                     r"integer >= 1.*--config.keep_checkpoints=1 or more"):
    checkpoint.manager(workdir, keep=keep)
  assert not os.path.exists(workdir)


def test_metrics_filled_in_after_the_save_keep_the_best_checkpoint(tmp_path):
  """train saves first and evaluates after, filling the saved metrics dict in place."""
  mngr = checkpoint.manager(str(tmp_path), keep=1, asynchronous=False)
  params = {"w": np.ones(2, np.float32)}
  for step, top1 in [(1, 0.9), (2, 0.1), (3, 0.2)]:
    tracked = checkpoint.save(mngr, step, params, None, {}, {})
    tracked.update({checkpoint.BEST_METRIC: top1})
  checkpoint.save(mngr, 4, params, None, {}, None)  # Not evaluated.
  mngr.wait_until_finished()
  mngr.close()
  assert checkpoint_steps(str(tmp_path)) == [1, 4]  # The best by top-1, and the latest.


# --------------------------------------------------- checkpoints of old code


@pytest.fixture
def old_main(tmp_path):
  """Copies of the trained/ and imported/ workdirs (testdata is never written)."""
  for name in ("trained", "imported"):
    shutil.copytree(os.path.join(OLD_MAIN, name), tmp_path / name)
  return tmp_path


def old_config():
  """configs/digits.py:tiny with the model of trained/config.json."""
  with open(os.path.join(OLD_MAIN, "trained", "config.json")) as f:
    saved = json.load(f)
  config = digits_config.get_config("tiny")
  config.model.update({k: tuple(v) if isinstance(v, list) else v
                       for k, v in saved["model"].items()})
  return config


def restore_params(workdir, model):
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"])
  mngr = checkpoint.manager(workdir, asynchronous=False)
  try:
    step, params, opt_state, _ = checkpoint.restore(mngr, _abstract(abstract))
  finally:
    mngr.close()
  assert opt_state is None
  return step, params


def test_old_checkpoint_evaluates_to_its_logged_metrics(old_main):
  with open(os.path.join(OLD_MAIN, "trained", "metrics.jsonl")) as f:
    logged = [r for r in map(json.loads, f) if "eval/top1" in r and r["step"] == 6]
  assert len(logged) == 1
  run = train.setup(old_config(), str(old_main / "trained"))
  assert run.start == 6
  result = train.accuracy_mode(run)
  assert result.step == 6  # The accuracy mode says which step it evaluated.
  assert result.metrics["eval/count"] == logged[0]["eval/count"] == 359
  for key in ("eval/loss", "eval/top1", "eval/top5"):
    np.testing.assert_allclose(result.metrics[key], logged[0][key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("name, step", [("trained", 6), ("imported", 0)])
def test_old_checkpoint_gives_the_same_logits_and_contributions(old_main, name, step):
  reference = np.load(os.path.join(OLD_MAIN, "reference.npz"))
  model = models.from_config(old_config().model)
  restored_step, params = restore_params(str(old_main / name), model)
  assert restored_step == step
  variables = {"params": params}
  x = jnp.asarray(reference["x"])
  np.testing.assert_allclose(model.apply(variables, x), reference["logits"], rtol=1e-5)
  np.testing.assert_allclose(explain.contributions(model, variables, x),
                             reference["contributions"], rtol=1e-4, atol=1e-6)


def test_training_resumes_from_an_old_checkpoint(old_main):
  workdir = str(old_main / "trained")
  config = old_config()
  config.update(num_steps=8, eval_every_steps=100, checkpoint_every_steps=100)
  result = train.train_and_evaluate(config, workdir)
  assert result.metrics["eval/count"] == 359 and np.isfinite(result.metrics["eval/loss"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
  assert steps[-2:] == [6, 8]  # The copied log, then step 8 after the resume.
  assert checkpoint_steps(workdir) == [6, 8]


def test_unfinished_saves_are_removed_in_one_line_and_committed_ones_kept(tmp_path, caplog):
  """Issue 17, item 5: a run killed while saving left <step>.orbax-checkpoint-tmp
  for good; the next run (holding the lock) removes it before orbax reads."""
  workdir = str(tmp_path)
  _save_two(workdir)
  ckpts = checkpoint.directory(workdir)
  unfinished = [os.path.join(ckpts, "3.orbax-checkpoint-tmp"),
                os.path.join(ckpts, "4.orbax-checkpoint-tmp-1765000000")]
  for path in unfinished:
    os.makedirs(os.path.join(path, "params"))
  with caplog.at_level(logging.WARNING):
    assert checkpoint.remove_unfinished(workdir) == unfinished
  assert checkpoint_steps(workdir) == [1, 2] and sorted(os.listdir(ckpts)) == ["1", "2"]
  assert [r.getMessage() for r in caplog.records] == [
      f"Removed 2 unfinished checkpoint(s) of an interrupted run: {', '.join(unfinished)}"]
  mngr = checkpoint.manager(workdir)
  checkpoint.wait_committed(mngr, 2)
  with pytest.raises(checkpoint.CheckpointError, match="step 3 was not committed"):
    checkpoint.wait_committed(mngr, 3)
  mngr.close()


def test_load_params_gives_the_latest_step_as_saved_on_the_given_sharding(tmp_path):
  model = models.tiny(num_classes=3)
  x = jnp.zeros((1, 8, 8, 1))
  params = jax.device_get(model.init(jax.random.key(1), x)["params"])
  mngr = checkpoint.manager(str(tmp_path), asynchronous=False)
  checkpoint.save(mngr, 4, jax.tree.map(lambda a: a - 1, params), None, {"model": {}})
  checkpoint.save(mngr, 7, params, None, {"model": {}})
  mngr.close()
  device = jax.devices()[-1]
  step, restored, meta = checkpoint.load_params(
      str(tmp_path), model, x, sharding=jax.sharding.SingleDeviceSharding(device))
  assert (step, meta["step"]) == (7, 7)
  chex.assert_trees_all_equal(jax.device_get(restored), params)
  assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(restored))
  with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
    checkpoint.load_params(str(tmp_path / "empty"), model, x)
