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

IDX_DIR = "/usr/share/datasets/fashion-mnist"


def get_config(arg=None):
  c, tiny = config_lib.start(arg, "fashion_mnist", ("tfds",))
  # "idx": t10k-/train-{images-idx3,labels-idx1}-ubyte[.gz] under data_dir.
  if c.variant == "tfds":
    c.dataset = "tfds:fashion_mnist"
  else:
    c.update(dataset="idx", data_dir=IDX_DIR)
  c.update(image_size=28, num_classes=10, cache=True)
  c.model = config_lib.model_config(
      out_channels=(16, 32, 32, 64, 64, 10), ranks=(16, 16, 32, 32, 32, 32),
      kernel_sizes=(3, 3, 3, 3, 3, 1), strides=(1, 2, 1, 2, 1, 1),
      paddings=(1, 1, 1, 1, 1, 0), temperature=100.0)
  config_lib.schedule(c, batch_size=64, num_epochs=10.0, learning_rate=1e-3,
                      log_every_steps=200)
  if tiny:
    config_lib.tiny(c, num_steps=4, log_every_steps=2, batch_size=8, eval_batch_size=16)
  return c
