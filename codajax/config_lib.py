"""The config schema: every field a codajax config has, and helpers for configs/.

`base_config()` declares every field that the trainer and the input pipeline
read, with neutral defaults, and is locked: a config in configs/ (or a
command-line override) can change a field but not add one, so a misspelt name
fails instead of being ignored. A config file starts from `base_config()` (or
`start`, which also checks its variant), sets its data, model and `schedule`,
and applies `tiny` for its ',tiny' smoke run. The architectures come from
`codajax.architectures`. Like that module, this one imports no jax, so
configs can be read and written anywhere.
"""

import math

import ml_collections

from codajax import architectures

TINY_ARGS = ("tiny", "runlocal")


def model_config(out_channels, ranks, kernel_sizes, strides, paddings, **fields):
  """A locked ConfigDict of the `codajax.models.CoDANet` constructor fields.

  `fields` override `architectures.MODEL_DEFAULTS` (norm, temperature, ...).
  """
  unknown = set(fields) - set(architectures.MODEL_DEFAULTS)
  if unknown:
    raise ValueError(f"model_config: unknown fields {sorted(unknown)}; the fields are "
                     f"{architectures.LAYER_FIELDS + tuple(architectures.MODEL_DEFAULTS)}.")
  values = dict(architectures.MODEL_DEFAULTS, **fields)
  values.update(temperature=float(values["temperature"]),
                logit_bias=float(values["logit_bias"]))
  layers = architectures.layers(out_channels, ranks, kernel_sizes, strides, paddings)
  return ml_collections.ConfigDict(dict(layers, **values)).lock()


def base_config() -> ml_collections.ConfigDict:
  """Every config field, with neutral defaults; locked against new fields."""
  c = ml_collections.ConfigDict()
  c.variant = ""              # The named variant of the config file ("" for none).
  # Data. `dataset` is "tfds:<name>", "digits", "idx" (a directory of MNIST-style
  # IDX files) or "image_folder"; see codajax/input_pipeline.py.
  c.dataset = ""
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = "train"
  c.test_split = "test"
  c.class_subset = 0          # > 0: keep labels 0..class_subset - 1 (ImageNet-100).
  c.image_size = ml_collections.FieldReference(None, field_type=int)  # Model input side.
  c.num_classes = ml_collections.FieldReference(None, field_type=int)  # None: from the data.
  c.augment = "none"          # "none" | "crop_flip" | "imagenet"
  c.resize_size = ml_collections.FieldReference(None, field_type=int)  # "imagenet": short side.
  c.randaugment_layers = 0    # "imagenet": RandAugment ops per image (0: none) ...
  c.randaugment_magnitude = 0  # ... at this magnitude (0..30).
  c.shuffle_buffer = 10_000
  c.cache = False             # Cache decoded examples in memory (small data sets).
  # Model: the tiny net, its last layer sized by the data (-1).
  c.model = model_config(**architectures.tiny(-1))
  # Optimisation (see `schedule`). `batch_size` is the global effective batch;
  # each step sees batch_size // grad_accum_steps examples and the optimizer
  # applies every grad_accum_steps steps (optax.MultiSteps).
  c.batch_size = 64
  c.grad_accum_steps = 1
  c.eval_batch_size = 256
  c.num_epochs = 1.0
  c.num_steps = -1            # > 0 overrides num_epochs (counted in steps).
  c.learning_rate = 1e-3
  c.lr_schedule = "constant"  # "constant" | "cosine" | "step" | "warmup_step"
  c.lr_decay_every_epochs = 1.0  # "step", "warmup_step": the lr is divided by
  c.lr_decay_factor = 1.0     # lr_decay_factor every lr_decay_every_epochs.
  c.warmup_epochs = 0.0       # "warmup_step": linspace(warmup_start_lr, lr,
  c.warmup_start_lr = 0.0     # warmup_epochs)[epoch] during the warm-up.
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
  return c.lock()


def parse_arg(arg):
  """'tiny' or 'name,tiny' -> (name or None, tiny?)."""
  parts = [p for p in (arg or "").split(",") if p]
  tiny = any(p in TINY_ARGS for p in parts)
  rest = [p for p in parts if p not in TINY_ARGS]
  if len(rest) > 1:
    raise ValueError(f"config arg {arg!r}: give at most one variant name plus ',tiny'.")
  return (rest[0] if rest else None), tiny


def start(arg, name: str, variants=(), default=None):
  """(base_config() with its variant set, tiny?) for the config file `name`.

  `variants` are the names the file accepts; `default` is used when `arg`
  names none (None: the file's unnamed default).
  """
  variant, tiny = parse_arg(arg)
  variant = variant or default
  if variant is not None and variant not in variants:
    raise ValueError(f"Unknown {name} variant {variant!r}; choose one of "
                     f"{list(variants)}" + (" or none." if default is None else "."))
  c = base_config()
  c.variant = variant or ""
  return c, tiny


def schedule(c, *, batch_size: int, num_epochs: float, learning_rate: float,
             lr_schedule: str = "cosine", log_every_steps: int, **fields) -> None:
  """Sets the optimisation recipe: batch, length, lr and its schedule.

  `fields`: any other optimisation fields (grad_accum_steps, the decay and
  warm-up fields, eval_batch_size, ...).
  """
  c.update(dict(batch_size=batch_size, num_epochs=num_epochs, learning_rate=learning_rate,
                lr_schedule=lr_schedule, log_every_steps=log_every_steps, **fields))


def tiny(c, *, num_steps: int, log_every_steps: int, net: bool = False,
         **overrides) -> None:
  """A ',tiny' smoke run: `num_steps` steps, logged every `log_every_steps`.

  net=True swaps the model's layers for `architectures.tiny` (the number of
  classes and the other model fields stay). `overrides`: any other fields.
  """
  c.update(dict(num_steps=num_steps, log_every_steps=log_every_steps, **overrides))
  if net:
    c.model.update(architectures.tiny(c.model.out_channels[-1]))


def resolve(config, num_classes: int, num_devices: int) -> ml_collections.ConfigDict:
  """A locked copy with num_classes and a last layer of -1 filled from the data.

  Checks that the batch sizes fit `num_devices` (an eval batch is rounded
  down to a multiple of them) and that the lr is positive.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if config.num_classes is None:
    config.num_classes = num_classes
  out = list(config.model.out_channels)
  if out[-1] == -1:
    out[-1] = num_classes
    config.model.out_channels = tuple(out)
  if out[-1] != num_classes:
    raise ValueError(
        f"config.model.out_channels ends in {out[-1]} but the data has "
        f"{num_classes} classes; set the last entry to {num_classes} (or -1).")
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"config.grad_accum_steps={config.grad_accum_steps} (>= 1).")
  micro = config.batch_size // config.grad_accum_steps
  if micro % num_devices:
    raise ValueError(
        f"The per-step batch batch_size // grad_accum_steps = {micro} must be a "
        f"multiple of the {num_devices} devices; change config.batch_size.")
  if config.eval_batch_size % num_devices:
    config.eval_batch_size = num_devices * max(1, config.eval_batch_size // num_devices)
  if config.learning_rate <= 0 or not math.isfinite(config.learning_rate):
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}.")
  return config.lock()
