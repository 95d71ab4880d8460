"""The config schema: fields shared by every codajax config, and model presets.

Dataset configs in configs/ start from `base_config()` and override what differs.
"""

import math

import ml_collections


def model_config(out_channels, ranks, kernel_sizes, strides, paddings, *,
                 norm="squash", temperature=1.0, logit_bias=math.log(0.1 / 0.9),
                 dtype="float32", impl="fused", remat=False):
  """A ConfigDict holding the `codajax.models.CoDANet` constructor fields."""
  return ml_collections.ConfigDict(dict(
      out_channels=tuple(out_channels), ranks=tuple(ranks),
      kernel_sizes=tuple(kernel_sizes), strides=tuple(strides),
      paddings=tuple(paddings), norm=norm, temperature=float(temperature),
      logit_bias=float(logit_bias), dtype=dtype, impl=impl, remat=remat))


def cifar10_9l_s(temperature=1000.0, norm="squash", ranks=(32, 32) + (64,) * 7):
  return model_config(
      out_channels=(16, 16, 32, 32, 32, 64, 64, 64, 10), ranks=ranks,
      kernel_sizes=(3,) * 8 + (1,), strides=(1, 1, 2, 1, 1, 2, 1, 1, 1),
      paddings=(1,) * 8 + (0,), norm=norm, temperature=temperature)


def imagenet100_9l_l(temperature=100000.0, norm="squash"):
  return model_config(
      out_channels=(16, 32, 32, 64, 64, 64, 64, 64, 100),
      ranks=(64,) * 3 + (128,) * 3 + (256,) * 3,
      kernel_sizes=(7,) + (3,) * 8, strides=(3, 1, 1, 2, 1, 1, 2, 1, 1),
      paddings=(3,) + (1,) * 8, norm=norm, temperature=temperature)


def base_config():
  """Defaults; dataset configs override what differs."""
  c = ml_collections.ConfigDict()
  # Data. `dataset` is "tfds:<name>", "digits", "idx" (a directory of MNIST-style
  # IDX files) or "image_folder"; see codajax/input_pipeline.py.
  c.dataset = ""
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = "train"
  c.test_split = "test"
  c.image_size = 32
  c.num_classes = ml_collections.FieldReference(None, field_type=int)
  c.augment = "none"          # "none" | "crop_flip" | "imagenet"
  c.shuffle_buffer = 10_000
  c.cache = False             # Cache decoded examples in memory (small data sets).
  # Model.
  c.model = model_config((8, 8, 10), (4, 4, 4), (3, 3, 1), (1, 2, 1), (1, 1, 0))
  # Optimisation. `batch_size` is the global effective batch; each step sees
  # batch_size // grad_accum_steps examples and the optimizer applies every
  # grad_accum_steps steps (optax.MultiSteps).
  c.batch_size = 16
  c.grad_accum_steps = 1
  c.eval_batch_size = 256
  c.num_epochs = 1.0
  c.num_steps = -1            # > 0 overrides num_epochs (counted in steps).
  c.learning_rate = 2.5e-4
  c.lr_schedule = "step"      # "step" | "warmup_step" | "constant" | "cosine"
  c.lr_decay_every_epochs = 30.0
  c.lr_decay_factor = 1.5     # The lr is divided by this every lr_decay_every_epochs.
  c.warmup_epochs = 0.0
  c.warmup_start_lr = 0.0
  c.weight_decay = 0.0
  c.matrix_reg_lambda = 0.0   # lambda * mean|M| of the layer-0 linear map.
  c.matrix_reg_classes = 2    # The true class plus n - 1 random other classes.
  c.seed = 0
  # Logging, evaluation, checkpoints.
  c.log_every_steps = 100
  c.eval_every_steps = -1     # <= 0: once per epoch.
  c.checkpoint_every_steps = -1  # <= 0: once per epoch.
  c.keep_checkpoints = 3
  c.num_explain = 8           # Test images explained by --mode=explain and at the end.
  c.explain_at_end = False
  return c


def parse_arg(arg):
  """'tiny' or 'name,tiny' -> (name, tiny?)."""
  parts = [p for p in (arg or "").split(",") if p]
  tiny = any(p in ("tiny", "runlocal") for p in parts)
  rest = [p for p in parts if p not in ("tiny", "runlocal")]
  if len(rest) > 1:
    raise ValueError(f"config arg {arg!r}: give at most one variant name plus ',tiny'.")
  return (rest[0] if rest else None), tiny
