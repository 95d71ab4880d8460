"""Tests of fine-tuning (codajax.finetune, config.init_from / init_head /
freeze_layers) and of class subsets (config.classes), end to end.

The source net is the digits config trained on the digits 0-4
(`configs/digits.py:classes=0-4`); the runs here fine-tune it on 5-9 or on all
ten digits, through `codajax.train` and real Orbax checkpoints.
"""

import logging
import os

import jax
import numpy as np
import pytest

from codajax import architectures
from codajax import checkpoint
from codajax import config_lib
from codajax import finetune
from codajax import input_pipeline
from codajax import models
from codajax import pretrained
from codajax import steps
from codajax import train
from configs import digits as digits_config
from configs import image_folder as image_folder_config

# Every digits run here shares these settings (one compilation each of the
# init, train and eval steps through the persistent cache).
SETTINGS = dict(batch_size=32, eval_batch_size=360, learning_rate=2e-3, lr_schedule="constant",
                log_every_steps=5, eval_every_steps=1000, checkpoint_every_steps=1000,
                explain_at_end=False, seed=0)
SOURCE_STEPS = 10  # The digits 0-4 source net: trained, if briefly.


def digits(classes, **overrides):
  c = digits_config.get_config(f"classes={classes}")
  c.update(SETTINGS)
  c.update(overrides)
  return c


def params_of(run):
  return jax.device_get(run.state.params)


def setup(config, workdir):
  """The state a training run starts from (train.setup; the run is closed)."""
  run = train.setup(config, str(workdir), training=True)
  run.close()
  return run


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_differs(a, b):
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(workdir, params) of the digits 0-4 net."""
  workdir = str(tmp_path_factory.mktemp("digits-0-4"))
  train.train_and_evaluate(digits("0-4", num_steps=SOURCE_STEPS), workdir)
  _, params, _ = checkpoint.load_stored_params(workdir)
  return workdir, jax.device_get(params)


def test_a_new_last_layer_when_the_class_count_differs(source, tmp_path):
  """0-4 -> all ten digits: layers 0-2 are the source's, layer 3 the model's
  own initialisation (that of the same run without init_from)."""
  fresh = params_of(setup(digits("0-9"), tmp_path / "fresh"))
  tuned = params_of(setup(digits("0-9", init_from=source[0]), tmp_path / "tuned"))
  for layer in ("layer_0", "layer_1", "layer_2"):
    assert_same(tuned[layer], source[1][layer])
  assert_same(tuned["layer_3"], fresh["layer_3"])
  assert tuned["layer_3"]["b"].shape != source[1]["layer_3"]["b"].shape


@pytest.mark.parametrize("init_head,kept", [("auto", True), ("keep", True), ("new", False)])
def test_init_head_with_the_same_class_count(source, tmp_path, init_head, kept):
  tuned = params_of(setup(digits("5-9", init_from=source[0], init_head=init_head), tmp_path))
  assert_same(tuned["layer_2"], source[1]["layer_2"])
  (assert_same if kept else assert_differs)(tuned["layer_3"], source[1]["layer_3"])


def test_keep_refuses_another_class_count(source, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match=r"init_head='keep'.*5 classes.*10"):
    setup(digits("0-9", init_from=source[0], init_head="keep"), tmp_path)


def test_a_mismatch_elsewhere_is_one_error_naming_the_layer(source, tmp_path):
  config = digits("5-9", init_from=source[0])
  config.model.out_channels = (16, 24, 32, -1)  # layer_1 narrower: A and b differ.
  with pytest.raises(checkpoint.CheckpointError) as e:
    setup(config, tmp_path / "w")
  message = str(e.value)
  assert "layer_1/A is (8, 4608) there but (8, 3456) in this model" in message, message
  assert "\n" not in message
  assert not os.path.exists(checkpoint.directory(tmp_path / "w"))  # Nothing written.


def test_a_missing_source_is_one_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist.*holds a trained run"):
    setup(digits("5-9", init_from=str(tmp_path / "nothing")), tmp_path / "w")


def test_frozen_layers_stay_bit_identical(source, tmp_path):
  config = digits("5-9", num_steps=6, init_from=source[0], freeze_layers=2,
                  weight_decay=1e-2)  # Not even decayed.
  train.train_and_evaluate(config, str(tmp_path))
  _, params, _ = checkpoint.load_stored_params(str(tmp_path))
  params = jax.device_get(params)
  for layer in ("layer_0", "layer_1"):
    assert_same(params[layer], source[1][layer])
  for layer in ("layer_2", "layer_3"):
    assert_differs(params[layer], source[1][layer])


def test_a_resumed_run_ignores_init_from(source, tmp_path, caplog):
  """Once the run has a checkpoint, init_from is not read (here it no longer
  exists): the run resumes from its own step, saying so in one line."""
  workdir = str(tmp_path / "tuned")
  train.train_and_evaluate(digits("5-9", num_steps=5, init_from=source[0]), workdir)
  _, own, _ = checkpoint.load_stored_params(workdir)
  with caplog.at_level(logging.INFO):
    run = setup(digits("5-9", num_steps=10, init_from=str(tmp_path / "gone")), workdir)
  assert run.start == 5
  assert_same(params_of(run), jax.device_get(own))
  ignored = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
  assert len(ignored) == 1 and "resumes from its own checkpoint" in ignored[0], ignored


def test_classes_keep_and_relabel_those_digits():
  """classes="7+2": the test images are exactly the 7s (now label 0) and the
  2s (label 1) of all ten digits, and the class names follow."""
  config = config_lib.resolve(digits("7+2"), 2, 1)
  info = input_pipeline.get_info(config)
  assert info.class_names == ("7", "2") and config.model.out_channels[-1] == 2
  images, labels = input_pipeline.first_test_examples(config)
  every, every_labels = input_pipeline.first_test_examples(digits_config.get_config())
  for new, old in ((0, 7), (1, 2)):
    np.testing.assert_array_equal(images[labels == new], every[every_labels == old])
  assert info.num_test == len(labels) == np.isin(every_labels, (7, 2)).sum()


def test_a_class_subset_is_part_of_what_an_evaluation_result_depends_on():
  """Results of the 0-4 net are not reused for 5-9; runs without a subset keep
  the records they had (no "classes" key)."""
  from codajax import result_store  # pylint: disable=g-import-not-at-top
  low, high = (result_store.data_record(digits(c)) for c in ("0-4", "5-9"))
  assert low != high and low["classes"] == "0-4"
  assert "classes" not in result_store.data_record(digits_config.get_config())


@pytest.mark.parametrize("field,value,message", [
    ("freeze_layers", 4, r"config.freeze_layers=4: must be an integer in \[0, 4\)"),
    ("freeze_layers", -1, r"in \[0, 4\)"),
    ("init_head", "fresh", r"config.init_head='fresh': use one of"),
    ("init_from", "pretrained:", r"names no model"),
    ("classes", "4-0", r"config.classes='4-0': the range '4-0' runs backwards"),
    ("classes", "1,x", r"'x' is not a label"),
    ("classes", "3,3", r"lists label 3 more than once"),
])
def test_bad_fields_are_one_clear_error(field, value, message):
  config = digits("0-4")
  config[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_classes_out_of_range_and_on_tfds_are_errors():
  with pytest.raises(config_lib.ConfigError, match=r"label 12 is not a class.*has 10"):
    input_pipeline.get_info(digits("8-12"))
  config = image_folder_config.get_config()
  config.update(dataset="tfds:cifar10", classes="0-4")
  with pytest.raises(config_lib.ConfigError, match=r"config.classes='0-4': applies to the "
                     r"local data sets.*class_subset"):
    config_lib.validate(config)
  with pytest.raises(config_lib.ConfigError, match="lists no labels"):
    digits_config.get_config("classes=")
  with pytest.raises(config_lib.ConfigError, match=r"Unknown digits variant 'typo'; choose "
                     r"one of \['classes=<labels, e.g. 0-4>'\] or none."):
    digits_config.get_config("typo,tiny")


def test_an_unknown_pretrained_net_is_one_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"init_from='pretrained:9L-S-CoDA-SQ-999'.*Unknown pretrained model"):
    setup(digits("5-9", init_from="pretrained:9L-S-CoDA-SQ-999"), tmp_path)


def test_from_a_pretrained_net(tmp_path, monkeypatch):
  """pretrained:<NAME> through codajax.pretrained's cache (here holding random
  9L-S weights, where its conversion leaves them): a 2-class 9L-S model gets
  layers 0-7 from it and keeps its own last layer."""
  name = "9L-S-CoDA-SQ-1000"
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  rng = np.random.RandomState(0)

  def random_params(model):  # Shapes by eval_shape: no 9L-S compilation.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
  weights = random_params(models.from_config(pretrained.model_config(name)))
  checkpoint.save_imported(str(tmp_path / name / pretrained.CONVERTED), weights,
                           {"pretrained": name})
  monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
  layers = dict(architectures.cifar10_9l_s(), out_channels=(16, 16, 32, 32, 32, 64, 64, 64, 2))
  own = random_params(models.from_config(config_lib.model_config(**layers)))
  config = digits("0-1", init_from=f"pretrained:{name}")
  state = steps.TrainState(0, jax.device_put(own), None)
  tuned = jax.device_get(finetune.start(config, state, restored=False).params)
  for layer in (f"layer_{i}" for i in range(8)):
    assert_same(tuned[layer], weights[layer])
  assert_same(tuned["layer_8"], own["layer_8"])


def test_resuming_with_other_frozen_layers_is_one_error(tmp_path):
  """The optimizer state differs with freeze_layers: resuming with another K
  is one error saying so, and leaves the checkpoints where they are."""
  workdir = str(tmp_path)
  train.train_and_evaluate(digits("0-4", num_steps=2), workdir)
  with pytest.raises(checkpoint.CheckpointError, match="does not fit this config's optimizer: "
                     "config.freeze_layers"):
    train.train_and_evaluate(digits("0-4", num_steps=4, freeze_layers=2), workdir)
  assert sorted(os.listdir(checkpoint.directory(workdir))) == ["2"]


# ------------------------------------------------ fine-tuning pays (item 7)

TARGET_TOP1 = 0.98  # On the 5-9 test images; the digits config's own schedule.


def steps_to(workdir, target):
  """The first evaluated step whose test top-1 reaches `target` (None: never)."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    curve = [(r["step"], r["eval/top1"]) for r in map(json.loads, f) if "eval/top1" in r]
  return next((step for step, top1 in curve if top1 >= target), None), curve


def test_fine_tuning_from_0_4_reaches_the_target_on_5_9_in_fewer_steps(tmp_path):
  """The digits config as it is (its model, schedule and seed), the same budget
  for both runs: trained on 0-4, then on 5-9 from scratch and from the 0-4 net
  (a new last layer). Measured: 0.98 at step 55 fine-tuned, step 90 from scratch
  (126 steps each; the curves are in the note of issue 21)."""
  run = dict(explain_at_end=False, eval_every_steps=5)
  source = str(tmp_path / "digits-0-4")
  train.train_and_evaluate(_full("0-4", **run), source)
  scratch, tuned = str(tmp_path / "scratch"), str(tmp_path / "tuned")
  train.train_and_evaluate(_full("5-9", **run), scratch)
  train.train_and_evaluate(_full("5-9", init_from=source, init_head="new", **run), tuned)
  (from_scratch, scratch_curve), (fine_tuned, tuned_curve) = (
      steps_to(w, TARGET_TOP1) for w in (scratch, tuned))
  assert scratch_curve[-1][0] == tuned_curve[-1][0]  # The same budget.
  assert fine_tuned is not None, tuned_curve
  assert from_scratch is None or fine_tuned < from_scratch, (scratch_curve, tuned_curve)


def _full(classes, **overrides):
  """configs/digits.py:classes=<classes> as a user runs it, with overrides."""
  c = digits_config.get_config(f"classes={classes}")
  c.update(overrides)
  return c
