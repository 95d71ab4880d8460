"""The CoDA-Net architectures, each written once, without jax.

An architecture is the five per-layer sequences of `models.CoDANet`
(`LAYER_FIELDS`). The model presets (`codajax.models`) and the configs
(`codajax.config_lib`, `configs/`) both build on these functions, so a config
can be read and written on a machine without jax.

`MODEL_DEFAULTS` are the defaults of the other `CoDANet` fields, shared the
same way: the squash norm, T = 1, the paper's logit bias log(0.1 / 0.9) (a
prior of 0.1 per class under the sigmoid), float32, the fused layer with the
backend's contraction, no remat.
"""

import math

LAYER_FIELDS = ("out_channels", "ranks", "kernel_sizes", "strides", "paddings")

LOGIT_BIAS = math.log(0.1 / 0.9)

MODEL_DEFAULTS = dict(norm="squash", temperature=1.0, logit_bias=LOGIT_BIAS,
                      dtype="float32", impl="fused", contraction="auto", remat=False)


def layers(out_channels, ranks, kernel_sizes, strides, paddings) -> dict:
  """The five per-layer sequences as a dict of int tuples."""
  return dict(zip(LAYER_FIELDS, (tuple(int(v) for v in seq) for seq in (
      out_channels, ranks, kernel_sizes, strides, paddings))))


def cifar10_9l_s(ranks=(32, 32) + (64,) * 7) -> dict:
  """The paper's 9L-S CoDA-Net for CIFAR-10 (7,782,816 parameters at the default ranks)."""
  return layers(out_channels=(16, 16, 32, 32, 32, 64, 64, 64, 10), ranks=ranks,
                kernel_sizes=(3,) * 8 + (1,), strides=(1, 1, 2, 1, 1, 2, 1, 1, 1),
                paddings=(1,) * 8 + (0,))


def imagenet100_9l_l() -> dict:
  """The paper's 9L-L CoDA-Net for ImageNet-100 (47,517,408 parameters)."""
  return layers(out_channels=(16, 32, 32, 64, 64, 64, 64, 64, 100),
                ranks=(64,) * 3 + (128,) * 3 + (256,) * 3,
                kernel_sizes=(7,) + (3,) * 8, strides=(3, 1, 1, 2, 1, 1, 2, 1, 1),
                paddings=(3,) + (1,) * 8)


def tiny(num_classes: int = 10) -> dict:
  """A 3-layer net for tests, laptops and the configs' `tiny` variants.

  num_classes=-1 leaves the last layer to be set from the data (image folders).
  """
  return layers(out_channels=(8, 8, num_classes), ranks=(4, 4, 4), kernel_sizes=(3, 3, 1),
                strides=(1, 2, 1), paddings=(1, 1, 0))
