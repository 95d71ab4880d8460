r"""Fashion-MNIST, from tfds or from a local directory of the original IDX files.

  # Offline, with Debian's dataset-fashion-mnist (installs the IDX files):
  python -m codajax.main --config configs/fashion_mnist.py \
      --config.data_dir=/usr/share/datasets/fashion-mnist --workdir workdirs/fmnist
  # Or through tfds (prepare first):
  python -m codajax.prepare --config configs/fashion_mnist.py:tfds
  python -m codajax.main --config configs/fashion_mnist.py:tfds --workdir ...

A 6-layer squash CoDA-Net; 10 epochs reach about 90% test top-1.
"""

from codajax import config_lib


def get_config(arg=None):
  variant, tiny = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  # "idx": t10k-/train-{images-idx3,labels-idx1}-ubyte[.gz] under data_dir.
  c.dataset = "tfds:fashion_mnist" if variant == "tfds" else "idx"
  if variant not in (None, "tfds"):
    raise ValueError(f"Unknown fashion_mnist variant {variant!r}; use 'tfds' or none.")
  c.data_dir = None if variant == "tfds" else "/usr/share/datasets/fashion-mnist"
  c.image_size = 28
  c.num_classes = 10
  c.cache = True
  c.augment = "none"
  c.model = config_lib.model_config(
      out_channels=(16, 32, 32, 64, 64, 10), ranks=(16, 16, 32, 32, 32, 32),
      kernel_sizes=(3, 3, 3, 3, 3, 1), strides=(1, 2, 1, 2, 1, 1),
      paddings=(1, 1, 1, 1, 1, 0), temperature=100.0)
  c.batch_size = 64
  c.num_epochs = 10.0
  c.learning_rate = 1e-3
  c.lr_schedule = "cosine"
  c.log_every_steps = 200
  if tiny:
    c.num_steps = 4
    c.batch_size = 8
    c.eval_batch_size = 16
    c.log_every_steps = 2
  return c
