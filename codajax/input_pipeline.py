"""Input pipelines: tfds / tf.data on the host, global batches on the mesh.

Every source yields per-host examples {"image": uint8 (H, W, C), "label": int}:
  "tfds:<name>"   a prepared tfds data set (`python -m codajax.prepare` first);
  "digits", "idx", "image_folder"   local files (`codajax.local_data`).

Training streams are deterministic functions of (config.seed, step): epoch e is
the host's shard shuffled with a seed derived from (seed, e), augmented with
stateless per-example seeds, so a resumed run sees exactly the batches an
uninterrupted run would. Evaluation covers every test example exactly once: each
host pads its shard to the same number of batches, with mask = 0.
"""

import dataclasses
import difflib
import json
import logging
import math
import os
from typing import Iterator, Optional

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from codajax import config_lib
from codajax import local_data
from codajax.local_data import DataError  # pylint: disable=unused-import
from codajax import randaugment


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_train: int          # Global number of training examples.
  num_test: int           # Global number of test examples.
  num_classes: int
  image_shape: tuple      # (H, W, C) of the model input.
  class_names: tuple = ()
  # Test examples before a class subset is taken (eval masks the other classes).
  num_test_stream: Optional[int] = None


def _host():
  return jax.process_index(), jax.process_count()


# ---------------------------------------------------------------- sources


def _tfds_builder(config, prepared: bool = True):
  """The tfds builder of config.dataset; `prepared`: check it is prepared."""
  name = config.dataset.split(":", 1)[1]
  try:
    builder = tfds.builder(name, data_dir=config.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(name.split(":")[0], tfds.list_builders(), n=3)
    raise DataError(
        f"config.dataset={config.dataset!r}: tfds has no data set {name!r}"
        + (f" (did you mean {', '.join(close)}?)" if close else "")
        + "; see https://www.tensorflow.org/datasets/catalog.") from None
  if prepared and not builder.is_prepared():
    raise DataError(
        f"The tfds data set {name!r} is not prepared in {builder.data_dir!r}. "
        f"Prepare it once, outside any multi-host run: python -m codajax.prepare "
        f"--config <this config>" + (f" --config.data_dir={config.data_dir}"
                                     if config.data_dir else "") + ".")
  return builder


def _in_memory(config):  # (train, test, class_names): arrays or file lists (not tfds).
  data = local_data.load(config.dataset, config.data_dir, config.image_size)
  return local_data.subset(data, config.get("classes", ""))  # A config.json from before it.


def _subset_counts(builder, config):
  """Train/test sizes after restricting labels to < class_subset (from prepare)."""
  path = os.path.join(builder.data_dir, f"codajax_subset_{config.class_subset}.json")
  if not os.path.exists(path):
    raise DataError(f"Missing {path}: the class-subset sizes are counted once by "
                    "python -m codajax.prepare --config <this config>.")
  with open(path) as f:
    return json.load(f)


def get_info(config) -> DatasetInfo:
  """Sizes, classes and image shape; raises DataError for missing data."""
  size = config.image_size
  if config.dataset.startswith("tfds:"):
    builder = _tfds_builder(config)
    info = builder.info
    num_classes = info.features["label"].num_classes
    names = tuple(info.features["label"].names)
    channels = info.features["image"].shape[-1] or 3
    if config.class_subset:
      counts = _subset_counts(builder, config)
      num_train, num_test = counts[config.train_split], counts[config.test_split]
      num_classes, names = config.class_subset, names[:config.class_subset]
    else:
      num_train, num_test = (info.splits[s].num_examples
                             for s in (config.train_split, config.test_split))
    num_stream = info.splits[config.test_split].num_examples
  else:
    (tr_x, _), (te_x, _), names = _in_memory(config)
    num_train, num_test, num_classes, num_stream = len(tr_x), len(te_x), len(names), len(te_x)
    channels = 3 if config.dataset == "image_folder" else tr_x.shape[-1]
  if config.num_classes is not None and config.num_classes != num_classes:
    raise config_lib.ConfigError(
        f"config.num_classes={config.num_classes} but the data has {num_classes} "
        "classes; unset it or fix the data.")
  return DatasetInfo(num_train, num_test, num_classes, (size, size, channels), names,
                     num_stream)


def _host_dataset(config, split: str, train: bool, shuffle_seed=None,
                  whole: bool = False) -> tf.data.Dataset:
  """This host's shard of a split (`whole`: all of it) as {"image": uint8, "label": int64}."""
  index, count = (0, 1) if whole else _host()
  if config.dataset.startswith("tfds:"):
    builder = _tfds_builder(config)
    host_split = tfds.split_for_jax_process(split, process_index=index,
                                            process_count=count, drop_remainder=train)
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    ds = builder.as_dataset(split=host_split, shuffle_files=shuffle_seed is not None,
                            read_config=read_config)
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    if config.class_subset and train:
      ds = ds.filter(lambda ex: ex["label"] < config.class_subset)
    return _checked(ds)
  tr, te, _ = _in_memory(config)
  x, y = tr if train else te
  x, y = x[index::count], y[index::count]
  ds = tf.data.Dataset.from_tensor_slices({"image": x, "label": y})
  if config.dataset == "image_folder":
    ds = ds.map(lambda ex: {"image": tf.io.decode_image(
        tf.io.read_file(ex["image"]), channels=3, expand_animations=False),
                            "label": ex["label"]}, num_parallel_calls=tf.data.AUTOTUNE)
  return _checked(ds)


# ---------------------------------------------------------------- preprocessing


def _resize_short(image, size):
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
  new = tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * scale), tf.int32)
  return tf.image.resize(image, tf.maximum(new, size), antialias=True)


RANGE = "images must be uint8 (0..255) or floats in [0, 1]"


def _to_unit_range(image):
  """uint8/uint16 -> [0, 1]; floats checked (a min and a max per image)."""
  if image.dtype in (tf.uint8, tf.uint16):
    return tf.image.convert_image_dtype(image, tf.float32)
  with tf.control_dependencies([tf.debugging.Assert(
      (tf.reduce_min(image) >= 0) & (tf.reduce_max(image) <= 1), [RANGE])]):
    return tf.cast(image, tf.float32)


def _checked(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Refuses integer images other than uint8/uint16 (as int32, 0..255 would scale to ~0)."""
  if not (ds.element_spec["image"].dtype in (tf.uint8, tf.uint16)
          or ds.element_spec["image"].dtype.is_floating):
    raise DataError(f"The data set gives {ds.element_spec['image'].dtype.name} images; {RANGE}.")
  return ds


def _numpy(ds: tf.data.Dataset, config, train: bool) -> Iterator[dict]:
  """`ds.as_numpy_iterator()`, with a DataError for images out of range or
  image files that cannot be decoded (named)."""
  try:
    yield from ds.as_numpy_iterator()
  except tf.errors.InvalidArgumentError as e:
    if RANGE in str(e):
      raise DataError(f"config.dataset={config.dataset!r} has float images outside [0, 1]: "
                      f"{RANGE}; divide them by 255 or store uint8.") from None
    if config.dataset == "image_folder":  # Find the file(s) TF's error does not name.
      local_data.check_images(_in_memory(config)[0 if train else 1][0])
    raise


def preprocess(config, image, train: bool, seed):
  """uint8 (H, W, C) -> float32 in [0, 1] of shape (S, S, C); `seed` is (2,) int."""
  size = config.image_size
  image = _to_unit_range(image)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  if config.augment == "imagenet":
    image = _resize_short(image, config.resize_size)
    if train:
      image = tf.image.stateless_random_crop(image, (size, size, 3), seeds[0])
      image = tf.image.stateless_random_flip_left_right(image, seeds[1])
      image = randaugment.randaugment(image, config.randaugment_layers,
                                      config.randaugment_magnitude, seeds[2])
    else:
      image = tf.image.resize_with_crop_or_pad(image, size, size)
  else:
    if image.shape[0] != size or image.shape[1] != size:
      image = tf.image.resize(image, (size, size), antialias=True)
    if train and config.augment == "crop_flip":
      image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
      image = tf.image.stateless_random_crop(image, tf.shape(image[4:-4, 4:-4]), seeds[0])
      image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  return tf.clip_by_value(tf.ensure_shape(image, (size, size, None)), 0.0, 1.0)


def _epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
  return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0] >> 1)


def steps_per_epoch(config, info: DatasetInfo) -> int:
  """Optimizer micro-steps (batches of batch_size // grad_accum_steps) per epoch."""
  micro = config.batch_size // config.grad_accum_steps
  return max(1, info.num_train // micro)


def train_batches(config, info: DatasetInfo, start_step: int = 0) -> Iterator[dict]:
  """This host's training batches from `start_step` on, forever.

  Batch b of epoch e is the same whatever step the run (re)started from.
  """
  index, count = _host()
  local = config.batch_size // config.grad_accum_steps // count
  per_epoch = steps_per_epoch(config, info)
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    shuffle_seed = _epoch_seed(config.seed, epoch, index)
    ds = _host_dataset(config, config.train_split, True, shuffle_seed)
    if config.cache:
      ds = ds.cache()
    # A host whose shard is a little short wraps around instead of stalling.
    ds = ds.shuffle(config.shuffle_buffer, seed=shuffle_seed,
                    reshuffle_each_iteration=False).repeat()
    # Enumerate before skipping: example i of the epoch keeps its augmentation
    # seed (base, i) whatever step the run resumed from.
    ds = ds.take(per_epoch * local).enumerate().skip(skip * local)
    base = _epoch_seed(config.seed, epoch, 1000 + index)
    ds = ds.map(lambda i, ex: {
        "image": preprocess(config, ex["image"], True,
                            tf.stack([tf.constant(base, tf.int64), i])),
        "label": tf.cast(ex["label"], tf.int32)}, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(2)
    yield from _numpy(ds, config, train=True)
    epoch, skip = epoch + 1, 0


def num_eval_batches(config, info: DatasetInfo) -> int:
  _, count = _host()
  local = eval_local_batch(config)
  stream = info.num_test_stream or info.num_test
  return max(1, math.ceil(math.ceil(stream / count) / local))


def eval_local_batch(config) -> int:
  _, count = _host()
  return max(1, config.eval_batch_size // count)


def eval_batches(config, info: DatasetInfo) -> Iterator[dict]:
  """This host's test batches, padded to the same count on every host."""
  local = eval_local_batch(config)
  n = num_eval_batches(config, info) * local
  ds = _host_dataset(config, config.test_split, False)
  subset = config.class_subset
  ds = ds.map(lambda ex: {
      "image": preprocess(config, ex["image"], False, tf.zeros((2,), tf.int64)),
      "label": tf.cast(ex["label"], tf.int32) if not subset else
               tf.cast(tf.minimum(ex["label"], subset - 1), tf.int32),
      "mask": tf.constant(1.0) if not subset else
              tf.cast(ex["label"] < subset, tf.float32)},
              num_parallel_calls=tf.data.AUTOTUNE)
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros(info.image_shape, tf.float32), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0)}).repeat()
  ds = ds.take(n).concatenate(pad).take(n).batch(local).prefetch(2)
  return _numpy(ds, config, train=False)


def first_test_examples(config, n: Optional[int] = None,
                        seed: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of the first `n` (None: all) test examples, preprocessed
  for eval, the same on every host (not sharded).

  seed=None: in the data set's order. An int: in the order of
  np.random.RandomState(seed).permutation of the whole test split (after a
  class subset), so the first n are a random sample of it; this reads the
  whole split.
  """
  ds = _host_dataset(config, config.test_split, False, whole=True)
  if config.class_subset:
    ds = ds.filter(lambda ex: ex["label"] < config.class_subset)
  ds = ds.take(-1 if n is None or seed is not None else n).map(lambda ex: (
      preprocess(config, ex["image"], False, tf.zeros((2,), tf.int64)),
      tf.cast(ex["label"], tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
  batches = list(_numpy(ds.batch(1024), config, train=False))
  if not batches:
    raise DataError(f"config.dataset={config.dataset!r}: the test split is empty.")
  images, labels = (np.concatenate(parts) for parts in zip(*batches))
  if seed is not None:
    order = np.random.RandomState(seed).permutation(len(labels))[:n]
    images, labels = images[order], labels[order]
  return images, labels


def prepare(config) -> None:
  """Downloads and prepares a tfds data set; counts class subsets."""
  if not config.dataset.startswith("tfds:"):
    get_info(config)  # Validates the local files with a clear error.
    if config.dataset == "image_folder":
      train, test, _ = _in_memory(config)
      local_data.check_images(np.concatenate([train[0], test[0]]))
    logging.info("%s needs no preparation.", config.dataset)
    return
  builder = _tfds_builder(config, prepared=False)
  name = builder.name
  builder.download_and_prepare()
  if config.class_subset:
    counts = {split: int(builder.as_dataset(split=split).map(lambda ex: ex["label"]).reduce(
        0, lambda n, l: n + tf.cast(l < config.class_subset, tf.int32)))
              for split in (config.train_split, config.test_split)}
    with open(os.path.join(builder.data_dir, f"codajax_subset_{config.class_subset}.json"), "w") as f:
      json.dump(counts, f)
  logging.info("Prepared %s in %s.", name, builder.data_dir)
