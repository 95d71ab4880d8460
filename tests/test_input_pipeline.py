"""Tests of codajax.input_pipeline: determinism, exact evaluation, host splits, sources.

The tfds path runs on `codajax_toy`, a tiny data set defined below and prepared
for real (tfds records on disk), so `split_for_jax_process`, `is_prepared` and
`prepare` are exercised without a download. Pixel values of toy images equal
the example id, so every example can be identified after the pipeline.
"""

import collections
import gzip
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from codajax import config_lib
from codajax import input_pipeline
from codajax import local_data
from configs import digits as digits_config
from configs import image_folder as image_folder_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

TOY_TRAIN = range(0, 30)
TOY_TEST = range(100, 113)  # 13 examples: not a multiple of any batch below.


class CodajaxToy(tfds.core.GeneratorBasedBuilder):
  """8x8 gray images whose pixels all equal the example id; 3 classes."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 1)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(TOY_TRAIN),
            "test": self._generate_examples(TOY_TEST)}

  def _generate_examples(self, ids):
    for i in ids:
      yield i, {"image": np.full((8, 8, 1), i, np.uint8), "label": i % 3}


def toy_config(data_dir, **overrides):
  c = config_lib.base_config()
  c.dataset = "tfds:codajax_toy"
  c.data_dir = str(data_dir)
  c.image_size = 8
  c.batch_size = 4
  c.eval_batch_size = 4
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  """codajax_toy prepared through input_pipeline.prepare (what codajax.prepare runs)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  input_pipeline.prepare(toy_config(data_dir))
  return data_dir


def digits(**overrides):
  c = digits_config.get_config("tiny")
  c.update(overrides)
  return c


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def ids(batches):
  """Toy example ids of the unmasked examples, in order."""
  out = []
  for b in batches:
    keep = b["mask"] > 0 if "mask" in b else np.ones(len(b["label"]), bool)
    out += [int(v) for v in np.round(b["image"][keep][:, 0, 0, 0] * 255)]
  return out


def as_uint8(images):
  return np.round(np.asarray(images) * 255).astype(np.uint8)


def example_counter(images, labels):
  return collections.Counter(
      (x.tobytes(), int(y)) for x, y in zip(as_uint8(images), labels))


def in_memory_counter(split_arrays):
  x, y = split_arrays
  return collections.Counter((a.tobytes(), int(b)) for a, b in zip(x, y))


def set_host(monkeypatch, index, count):
  monkeypatch.setattr(input_pipeline, "_host", lambda: (index, count))


# ------------------------------------------------------------ training stream


@pytest.mark.parametrize("source", ["digits", "tfds"])
def test_train_batches_resume_where_an_uninterrupted_run_is(source, toy_dir):
  """Batches from start_step=k equal batches k, k+1, ... of a run from 0.

  Crosses an epoch boundary, with augmentation on (the per-example crop/flip
  seeds must not depend on where the run started).
  """
  if source == "digits":
    config = digits(batch_size=256, augment="crop_flip", seed=3)  # 5 steps/epoch.
    start, n = 3, 4
  else:
    config = toy_config(toy_dir, augment="crop_flip", seed=3)  # 7 steps/epoch.
    start, n = 5, 4
  info = input_pipeline.get_info(config)
  per_epoch = input_pipeline.steps_per_epoch(config, info)
  assert start < per_epoch < start + n  # The resumed stretch crosses the boundary.
  uninterrupted = take(input_pipeline.train_batches(config, info, 0), start + n)
  resumed = take(input_pipeline.train_batches(config, info, start), n)
  for i, (got, want) in enumerate(zip(resumed, uninterrupted[start:])):
    for key in ("image", "label"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {start + i}, {key}")
  # Each epoch is reshuffled: the first batches of epochs 0 and 1 differ.
  assert not np.array_equal(uninterrupted[0]["label"], uninterrupted[per_epoch]["label"])


def test_train_epoch_is_a_seeded_permutation():
  """One epoch draws each training example at most once; the seed picks the order."""
  config = digits(batch_size=256, augment="none")
  info = input_pipeline.get_info(config)
  per_epoch = input_pipeline.steps_per_epoch(config, info)
  epoch = take(input_pipeline.train_batches(config, info, 0), per_epoch)
  images = np.concatenate([b["image"] for b in epoch])
  labels = np.concatenate([b["label"] for b in epoch])
  assert images.shape == (per_epoch * 256, 16, 16, 1)
  seen = example_counter(images, labels)
  available = in_memory_counter(input_pipeline._in_memory(config)[0])
  assert not seen - available  # Nothing drawn more often than it exists.
  other_seed = take(input_pipeline.train_batches(digits(batch_size=256, seed=1), info, 0), 1)
  assert not np.array_equal(other_seed[0]["label"], epoch[0]["label"])


# ------------------------------------------------------------------ evaluation


def test_eval_covers_every_test_example_once():
  config = digits(eval_batch_size=64)  # 359 test examples: 5 full batches + 39.
  info = input_pipeline.get_info(config)
  batches = list(input_pipeline.eval_batches(config, info))
  assert len(batches) == input_pipeline.num_eval_batches(config, info) == 6
  assert all(b["image"].shape == (64, 16, 16, 1) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(6 * 64) < info.num_test)
  keep = mask > 0
  test_x, test_y = input_pipeline._in_memory(config)[1]
  np.testing.assert_array_equal(
      as_uint8(np.concatenate([b["image"] for b in batches])[keep]), test_x)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[keep], test_y)
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[~keep], 0.0)


def test_eval_tfds_covers_every_test_example_once(toy_dir):
  config = toy_config(toy_dir, eval_batch_size=4)
  info = input_pipeline.get_info(config)
  assert (info.num_train, info.num_test, info.num_classes) == (30, 13, 3)
  batches = list(input_pipeline.eval_batches(config, info))
  assert len(batches) == 4
  assert sorted(ids(batches)) == list(TOY_TEST)
  assert sum(float(b["mask"].sum()) for b in batches) == 13


def test_first_test_examples_in_a_seeded_order(toy_dir):
  """seed=None: the data set's order; a seed: the first n of a seeded permutation
  of the whole test split (codajax_toy's pixels are the example ids)."""
  config = toy_config(toy_dir)

  def ids(images):
    return list(np.round(images[:, 0, 0, 0] * 255).astype(int))
  read = ids(input_pipeline.first_test_examples(config)[0])
  assert sorted(read) == list(TOY_TEST)
  assert ids(input_pipeline.first_test_examples(config, 5)[0]) == read[:5]
  want = [read[k] for k in np.random.RandomState(7).permutation(len(read))]
  assert want[:5] != read[:5]
  images, labels = input_pipeline.first_test_examples(config, 5, seed=7)
  assert ids(images) == want[:5] and list(labels) == [i % 3 for i in want[:5]]
  assert ids(input_pipeline.first_test_examples(config, seed=7)[0]) == want


@pytest.mark.parametrize("source", ["digits", "tfds"])
def test_hosts_split_the_data_disjointly(source, toy_dir, monkeypatch):
  """Two simulated hosts: same eval step count, disjoint eval examples whose
  union is the test set; disjoint training shards with half the batch each."""
  config = digits(eval_batch_size=64) if source == "digits" else toy_config(toy_dir)
  info = input_pipeline.get_info(config)
  evals, trains = [], []
  for index in range(2):
    set_host(monkeypatch, index, 2)
    evals.append(list(input_pipeline.eval_batches(config, info)))
    trains.append(take(input_pipeline.train_batches(config, info, 0),
                       input_pipeline.steps_per_epoch(config, info)))
  assert len(evals[0]) == len(evals[1]) == input_pipeline.num_eval_batches(config, info)
  for host in trains:
    assert all(len(b["label"]) == config.batch_size // 2 for b in host)
  for host in evals:
    assert all(len(b["label"]) == config.eval_batch_size // 2 for b in host)

  if source == "tfds":
    eval_ids = [ids(h) for h in evals]
    assert not set(eval_ids[0]) & set(eval_ids[1])
    assert sorted(eval_ids[0] + eval_ids[1]) == list(TOY_TEST)
    train_ids = [set(ids(h)) for h in trains]
    assert not train_ids[0] & train_ids[1]
    assert train_ids[0] | train_ids[1] <= set(TOY_TRAIN)
    return
  def unmasked(host):
    keep = np.concatenate([b["mask"] for b in host]) > 0
    return example_counter(np.concatenate([b["image"] for b in host])[keep],
                           np.concatenate([b["label"] for b in host])[keep])
  _, test = input_pipeline._in_memory(config)[:2]
  assert unmasked(evals[0]) + unmasked(evals[1]) == in_memory_counter(test)
  train_seen = [example_counter(np.concatenate([b["image"] for b in h]),
                                np.concatenate([b["label"] for b in h])) for h in trains]
  available = in_memory_counter(input_pipeline._in_memory(config)[0])
  assert not (train_seen[0] + train_seen[1]) - available


# --------------------------------------------------------------------- sources


def write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(
      d.to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def test_idx_reader_on_written_files(tmp_path):
  rng = np.random.RandomState(0)
  train_x, train_y = rng.randint(0, 256, (7, 4, 4)), np.array([0, 1, 2, 3, 0, 1, 2])
  test_x, test_y = rng.randint(0, 256, (3, 4, 4)), np.array([3, 2, 1])
  write_idx(str(tmp_path / "train-images-idx3-ubyte"), train_x)   # Plain ...
  write_idx(str(tmp_path / "train-labels-idx1-ubyte"), train_y)
  write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), test_x)  # ... and gzipped.
  write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), test_y)
  config = config_lib.base_config()
  config.update(dataset="idx", data_dir=str(tmp_path), image_size=4, eval_batch_size=2)
  info = input_pipeline.get_info(config)
  assert (info.num_train, info.num_test, info.num_classes, info.image_shape) == (7, 3, 4, (4, 4, 1))
  batches = list(input_pipeline.eval_batches(config, info))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  np.testing.assert_array_equal(
      as_uint8(np.concatenate([b["image"] for b in batches])[keep])[..., 0], test_x)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[keep], test_y)


def test_idx_reader_rejects_bad_files(tmp_path):
  path = str(tmp_path / "x-idx3-ubyte")
  write_idx(path, np.zeros((2, 3, 3)))
  with open(path, "rb+") as f:
    f.truncate(4 + 12 + 10)
  with pytest.raises(input_pipeline.DataError, match="truncated"):
    local_data._read_idx(path)
  with open(path, "wb") as f:
    f.write((0x0D03).to_bytes(4, "big") + bytes(12))  # float32 IDX: not supported.
  with pytest.raises(input_pipeline.DataError, match="unsigned-byte"):
    local_data._read_idx(path)
  with pytest.raises(input_pipeline.DataError, match="dataset-fashion-mnist"):
    local_data._idx(str(tmp_path / "empty"))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason=f"no {FASHION_MNIST}")
def test_idx_reader_on_fashion_mnist():
  (train_x, train_y), (test_x, test_y), names = local_data._idx(FASHION_MNIST)
  assert train_x.shape == (60000, 28, 28, 1) and test_x.shape == (10000, 28, 28, 1)
  assert len(names) == 10
  # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
  np.testing.assert_array_equal(np.bincount(train_y), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test_y), [1000] * 10)
  assert train_x.max() == 255 and train_x.min() == 0


COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def test_image_folder_infers_classes_and_reads_images(tmp_path):
  counts = {"train": {"ant": 2, "bee": 3, "cat": 1}, "test": {"ant": 1, "bee": 1, "cat": 2}}
  for split, per_class in counts.items():
    for name, n in per_class.items():
      folder = tmp_path / split / name
      folder.mkdir(parents=True)
      for i in range(n):
        image = np.broadcast_to(np.array(COLORS[name], np.uint8), (12 + i, 10, 3))
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
  (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
  config = image_folder_config.get_config("tiny")
  config.data_dir = str(tmp_path)
  config.image_size = 8
  config.batch_size = 8  # A multiple of the 8 test devices.
  info = input_pipeline.get_info(config)
  assert info.class_names == ("ant", "bee", "cat")
  assert (info.num_train, info.num_test, info.num_classes) == (6, 4, 3)
  assert info.image_shape == (8, 8, 3)
  resolved = config_lib.resolve(config, info.num_classes, 8)  # (8, 8, -1) -> 3.
  assert resolved.model.out_channels[-1] == 3 and resolved.num_classes == 3
  batches = list(input_pipeline.eval_batches(config, info))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  images = np.concatenate([b["image"] for b in batches])[keep]
  labels = np.concatenate([b["label"] for b in batches])[keep]
  assert images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(labels, [0, 1, 2, 2])
  want = np.array([COLORS[info.class_names[l]] for l in labels]) / 255.0
  np.testing.assert_allclose(images, np.broadcast_to(want[:, None, None], images.shape),
                             atol=1e-5)


# --------------------------------------------------------------- clear errors


def test_missing_tfds_data_names_the_prepare_command(tmp_path):
  config = toy_config(tmp_path / "nothing-here")
  with pytest.raises(input_pipeline.DataError) as e:
    input_pipeline.get_info(config)
  message = str(e.value)
  assert "codajax_toy" in message
  assert str(tmp_path / "nothing-here") in message
  assert "python -m codajax.prepare" in message


def test_bad_dataset_and_class_count_are_rejected():
  # The data set's name is checked once, by config_lib.validate (train.setup and
  # config_lib.load_config call it).
  with pytest.raises(config_lib.ConfigError, match="use 'tfds:<name>' or one of"):
    config_lib.validate(digits(dataset="mnist"))
  with pytest.raises(ValueError, match="num_classes=7.*10 classes"):
    input_pipeline.get_info(digits(num_classes=7))


def test_prepare_cli_validates_local_data():
  """python -m codajax.prepare exits 0 for a source that needs no download."""
  env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="")
  out = subprocess.run(
      [sys.executable, "-m", "codajax.prepare", "--config",
       os.path.join(ROOT, "configs", "digits.py")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "1438 training and 359 test examples, 10 classes" in out.stdout


# ------------------------------------------------------- issue 9: bad inputs


def write_folder(root, counts):
  for split, per_class in counts.items():
    for name, n in per_class.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(n):
        image = np.broadcast_to(np.array(COLORS[name], np.uint8), (8, 8, 3))
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())


def test_image_folder_rejects_a_class_that_only_test_has(tmp_path):
  """Its images would otherwise be dropped from evaluation without a word."""
  write_folder(tmp_path, {"train": {"ant": 1, "bee": 1}, "test": {"ant": 1, "cat": 2}})
  config = image_folder_config.get_config("tiny")
  config.data_dir = str(tmp_path)
  with pytest.raises(input_pipeline.DataError) as e:
    input_pipeline.get_info(config)
  assert str(e.value) == (
      f"image_folder: class folder {str(tmp_path / 'test' / 'cat')!r} is not in "
      f"{str(tmp_path / 'train')!r} (1 such); give the class training images or remove "
      "the folder.")


def folder_config(root):
  config = image_folder_config.get_config("tiny")
  config.update(data_dir=str(root), image_size=8, batch_size=8, eval_batch_size=8)
  return config


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_undecodable_image_is_named_by_training_eval_and_prepare(tmp_path, damage):
  """TF's InvalidArgumentError names no file, and prepare called the folder ready."""
  write_folder(tmp_path, {"train": {"ant": 3, "bee": 3}, "test": {"ant": 2, "bee": 2}})
  for split in ("train", "test"):
    bad = tmp_path / split / "bee" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a png" * 20)
  config = folder_config(tmp_path)
  info = input_pipeline.get_info(config)
  for split, batches in (("train", lambda: next(input_pipeline.train_batches(config, info))),
                         ("test", lambda: list(input_pipeline.eval_batches(config, info)))):
    with pytest.raises(input_pipeline.DataError) as e:
      batches()
    path = str(tmp_path / split / "bee" / "1.png")
    assert str(e.value) == (
        f"image_folder: 1 file(s) cannot be decoded as images, e.g. {path!r} (truncated "
        "or not a PNG/JPEG); replace or remove it.")
  with pytest.raises(input_pipeline.DataError, match=r"2 file\(s\) cannot be decoded"):
    input_pipeline.prepare(config)
  if damage == "garbage":  # And python -m codajax.prepare prints it as one line.
    env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-m", "codajax.prepare", "--config",
         os.path.join(ROOT, "configs", "image_folder.py:tiny"), f"--config.data_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith(
        "codajax: DataError: image_folder: 2 file(s) cannot be decoded as images, e.g. ")
    assert "Traceback" not in out.stderr


def test_an_unknown_tfds_name_is_one_line_with_suggestions():
  # Was a 510-line traceback listing every tfds data set.
  config = digits(dataset="tfds:fashion_mnsit")
  for call in (input_pipeline.get_info, input_pipeline.prepare):
    with pytest.raises(input_pipeline.DataError) as e:
      call(config)
    message = str(e.value)
    assert message.startswith(
        "config.dataset='tfds:fashion_mnsit': tfds has no data set 'fashion_mnsit' "
        "(did you mean fashion_mnist")
    assert "\n" not in message and len(message) < 300
  with pytest.raises(input_pipeline.DataError, match="no data set 'nonexistent_ds';"):
    input_pipeline.get_info(digits(dataset="tfds:nonexistent_ds"))


def fake_source(monkeypatch, images):
  """Every split of the digits config holds `images` (labels 0)."""
  split = (images, np.zeros(len(images), np.int64))
  monkeypatch.setattr(input_pipeline, "_in_memory", lambda config: (split, split, ("0",)))
  config = digits(batch_size=8, eval_batch_size=8, cache=False)
  info = input_pipeline.DatasetInfo(len(images), len(images), 10, (16, 16, 1))
  return config, info


def test_float_images_in_0_255_are_rejected(monkeypatch):
  """Floats above 1 used to be clipped to 1 silently: a white image."""
  images = np.full((16, 16, 16, 1), 200.0, np.float32)
  config, info = fake_source(monkeypatch, images)
  message = ("config.dataset='digits' has float images outside [0, 1]: images must be "
             "uint8 (0..255) or floats in [0, 1]; divide them by 255 or store uint8.")
  with pytest.raises(input_pipeline.DataError) as e:
    next(input_pipeline.eval_batches(config, info))
  assert str(e.value) == message
  with pytest.raises(input_pipeline.DataError) as e:
    next(input_pipeline.train_batches(config, info))
  assert str(e.value) == message


def test_integer_images_other_than_uint8_are_rejected(monkeypatch):
  """0..255 held as int32 used to be scaled by 2**31 - 1: a black image."""
  config, info = fake_source(monkeypatch, np.full((16, 16, 16, 1), 200, np.int32))
  with pytest.raises(input_pipeline.DataError,
                     match=r"The data set gives int32 images; images must be uint8 \(0..255\) "
                           r"or floats in \[0, 1\]\."):
    next(input_pipeline.eval_batches(config, info))


def test_float_images_in_0_1_and_uint8_images_pass_unchanged(monkeypatch):
  ramp = (np.arange(16 * 16 * 16).reshape(16, 16, 16, 1) % 256).astype(np.uint8)
  for images in (ramp, ramp.astype(np.float32) / 255):
    config, info = fake_source(monkeypatch, images)
    batch = next(input_pipeline.eval_batches(config, info))
    np.testing.assert_allclose(batch["image"], ramp[:8] / 255, atol=1e-6)
