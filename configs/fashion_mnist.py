r"""Fashion-MNIST, from tfds or from a local directory of the original IDX files.

  # Offline, with Debian's dataset-fashion-mnist (installs the IDX files):
  python -m codajax.main --config configs/fashion_mnist.py \
      --config.data_dir=/usr/share/datasets/fashion-mnist --workdir workdirs/fmnist
  # Or through tfds (prepare first):
  python -m codajax.prepare --config configs/fashion_mnist.py:tfds
  python -m codajax.main --config configs/fashion_mnist.py:tfds --workdir ...

A 6-layer squash CoDA-Net; 10 epochs reach about 90% test top-1.

Variants 6L-T{10,100,1000,10000}: the 6-layer net at temperature T, trained
for 3 epochs with a cosine schedule, the same seed and schedule for every T,
evaluated every quarter epoch (the accuracy curve shows the plateau); the
reproduction of README.md (launch/reproduce_fashion_mnist.sh) uses them.

Variants 4L-T{10,100,1000}: a 4-layer net (stride 2 twice: 7x7 class maps, as
the 9L-S net's 8x8 on CIFAR-10) at temperature T, 1 epoch, small enough for a
2-core CPU.
"""

from codajax import config_lib

IDX_DIR = "/usr/share/datasets/fashion-mnist"


SMALL = tuple(f"4L-T{t}" for t in (10, 100, 1000))
SWEEP = tuple(f"6L-T{t}" for t in (10, 100, 1000, 10000))


def get_config(arg=None):
  c, tiny = config_lib.start(arg, "fashion_mnist", ("tfds",) + SMALL + SWEEP)
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
  if c.variant in SWEEP:
    c.model.temperature = float(c.variant.split("-T")[1])
    quarter = 60_000 // 64 // 4  # Steps per quarter epoch.
    c.update(num_epochs=3.0, lr_schedule="cosine", eval_every_steps=quarter,
             checkpoint_every_steps=quarter)
  if c.variant in SMALL:
    c.model = config_lib.model_config(
        out_channels=(16, 32, 32, 10), ranks=(8, 16, 16, 16), kernel_sizes=(3, 3, 3, 1),
        strides=(1, 2, 2, 1), paddings=(1, 1, 1, 0),
        temperature=float(c.variant.split("-T")[1]))
    c.update(num_epochs=1.0, log_every_steps=100)
  if tiny:
    config_lib.tiny(c, num_steps=4, log_every_steps=2, batch_size=8, eval_batch_size=16)
  return c
