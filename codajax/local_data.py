"""Data sets read from local files, for `codajax.input_pipeline`.

  "digits"        scikit-learn's bundled 8x8 digits (no download);
  "idx"           MNIST-style IDX files in config.data_dir (e.g. Fashion-MNIST);
  "image_folder"  <data_dir>/{train,test}/<class>/*.{png,jpg,jpeg}, decoded
                  by tf.data; `undecodable` finds the files it cannot decode.

`subset` keeps some classes of any of them (config.classes).
"""

import functools
import gzip
import math
import os

import numpy as np
import tensorflow as tf

from codajax import config_lib
from codajax import finetune_spec


class DataError(RuntimeError):
  """A data set that cannot be read, with the command or path that fixes it."""


def _digits(image_size):
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  d = sk_datasets.load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  scale = image_size // 8
  if scale * 8 != image_size:
    raise config_lib.ConfigError(f"config.image_size={image_size}: digits needs a multiple of 8.")
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  labels = d.target.astype(np.int64)
  order = np.random.RandomState(0).permutation(len(labels))  # Fixed split.
  test, train = order[:len(labels) // 5], order[len(labels) // 5:]
  return ((images[train], labels[train]), (images[test], labels[test]),
          tuple(str(i) for i in range(10)))


def _read_idx(path):
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big")
  ndim = magic & 0xFF
  if magic >> 8 != 0x08:
    raise DataError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}).")
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if arr.size != math.prod(dims):
    raise DataError(f"{path} is truncated: header says {dims}, found {arr.size} bytes.")
  return arr.reshape(dims)


def _idx(root):
  def find(stem):
    for name in (stem, stem + ".gz"):
      if root and os.path.exists(os.path.join(root, name)):
        return os.path.join(root, name)
    raise DataError(f"IDX data: no {stem}[.gz] in data_dir={root!r}. Point --config.data_dir"
                    " at a folder with the standard files (on Debian: apt-get install dataset-"
                    "fashion-mnist, which installs /usr/share/datasets/fashion-mnist), or use "
                    "the ':tfds' variant of the config.")
  out = []
  for prefix in ("train", "t10k"):
    images = _read_idx(find(f"{prefix}-images-idx3-ubyte"))[..., None]
    labels = _read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
      raise DataError(f"IDX data in {root}: {len(images)} {prefix} images but {len(labels)} labels.")
    out.append((images, labels))
  num_classes = int(max(out[0][1].max(), out[1][1].max())) + 1
  return out[0], out[1], tuple(str(i) for i in range(num_classes))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _folder_files(data_dir, split):
  root = os.path.join(data_dir or "", split)
  if not os.path.isdir(root):
    raise DataError(
        f"image_folder: {root!r} does not exist. Expected "
        "<data_dir>/{train,test}/<class>/*.png|jpg; set --config.data_dir.")
  classes = sorted(d for d in os.listdir(os.path.join(data_dir, "train"))
                   if os.path.isdir(os.path.join(data_dir, "train", d)))
  extra = sorted(d for d in set(os.listdir(root)) - set(classes) if os.path.isdir(
      os.path.join(root, d)))  # Its images would be dropped from evaluation silently.
  if extra:
    raise DataError(f"image_folder: class folder {os.path.join(root, extra[0])!r} is not in "
                    f"{os.path.join(data_dir, 'train')!r} ({len(extra)} such); give the "
                    "class training images or remove the folder.")
  files, labels = [], []
  for i, c in enumerate(classes):
    folder = os.path.join(root, c)  # A class may have no test folder.
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(folder, f))
        labels.append(i)
  if not files:
    raise DataError(f"image_folder: no .png/.jpg images under {root}/<class>/.")
  return np.array(files), np.array(labels, np.int64), tuple(classes)


@functools.lru_cache(maxsize=4)
def load(dataset: str, data_dir: str, image_size: int):
  """((train_x, train_y), (test_x, test_y), class_names) of a local data set;
  for image folders, x holds file paths."""
  if dataset == "digits":
    return _digits(image_size)
  if dataset == "idx":
    return _idx(data_dir)
  # "image_folder", the last of config_lib.LOCAL_DATASETS (validate admits no other).
  tr, te = _folder_files(data_dir, "train"), _folder_files(data_dir, "test")
  return tr[:2], te[:2], tr[2]


def subset(data, spec: str):
  """`data` (as `load` returns it) with only the classes of `spec`
  (config.classes, e.g. "5-9"), relabelled 0..k-1 in the order given, and
  their names; `data` itself when `spec` is ""."""
  if not spec:
    return data
  *splits, names = data
  keep = finetune_spec.parse_classes(spec)  # config_lib.validate checked the syntax.
  if max(keep) >= len(names):
    raise config_lib.ConfigError(
        f"config.classes={spec!r}: label {max(keep)} is not a class of the data, which has "
        f"{len(names)} (labels 0..{len(names) - 1}: {', '.join(names[:12])}"
        f"{', ...' if len(names) > 12 else ''}); list labels below {len(names)}.")
  new_label = np.full(len(names), -1, np.int64)
  new_label[list(keep)] = np.arange(len(keep))
  picked = []
  for x, y in splits:
    y = new_label[y]
    picked.append((x[y >= 0], y[y >= 0]))
  return (*picked, tuple(names[k] for k in keep))


def undecodable(files) -> list:
  """The image files that tf.data cannot decode (truncated, or not an image)."""
  def decode(f):
    image = tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)
    return f, tf.shape(image)[0]
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(files, str)).map(
      decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  decoded = {f.decode() for f, _ in ds.as_numpy_iterator()}
  return [str(f) for f in files if str(f) not in decoded]


def check_images(files) -> None:
  """Raises a DataError naming the files that cannot be decoded, if any."""
  bad = undecodable(files)
  if bad:
    raise DataError(f"image_folder: {len(bad)} file(s) cannot be decoded as images, e.g. "
                    f"{bad[0]!r} (truncated or not a PNG/JPEG); replace or remove "
                    f"{'it' if len(bad) == 1 else 'them: ' + ', '.join(map(repr, bad[:5]))}.")
