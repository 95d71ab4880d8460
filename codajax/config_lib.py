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

import difflib
import math
import os
import re
from typing import Optional

import ml_collections

from codajax import architectures
from codajax import bootstrap
from codajax import finetune_spec
from codajax import methods

TINY_ARGS = ("tiny", "runlocal")
# The known values of the string fields that no jax-free module owns (the
# code that reads them, codajax.steps and codajax.input_pipeline, imports jax
# or TensorFlow; tests check that it knows each one). The model's choices are
# declared in `codajax.architectures`, the evaluation's in `codajax.methods`.
LR_SCHEDULES = ("constant", "cosine", "step", "warmup_step")
AUGMENTS = ("none", "crop_flip", "imagenet")
LOCAL_DATASETS = ("digits", "idx", "image_folder")
# The interpretability evaluation (--mode evaluate): each attribution method
# with its options and their defaults, the metrics.
ATTRIBUTION_OPTIONS = methods.OPTIONS
METRICS = methods.METRICS
# The order of the test images that the evaluation draws from: "dataset" (as
# read), "shuffled" (a permutation seeded by config.evaluation.seed) or "auto":
# the data set's own order for the tfds data sets whose order the authors
# evaluated (CIFAR-10, ImageNet), "shuffled" for every other one (an image
# folder or the digits come class by class, or in an order of their own).
IMAGE_ORDERS = ("auto", "dataset", "shuffled")
AUTHORS_ORDER_DATASETS = ("cifar10", "imagenet2012")  # tfds names; and imagenet2012_*.


class ConfigError(ValueError):
  """A config that cannot work, one line per problem naming the field and the fix."""


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
  c.evaluation = evaluation_config()
  # Fine-tuning (init_from, init_head, freeze_layers), class subsets (classes).
  c.update(finetune_spec.FIELDS)  # Each is described in codajax/finetune_spec.py.
  return c.lock()


def evaluation_config() -> ml_collections.ConfigDict:
  """--mode evaluate's settings: the authors' 500_3x3 localisation and default
  pixel removal (see codajax/metrics.py), for the methods of their figures."""
  e = ml_collections.ConfigDict()
  e.methods = methods.PAPER_METHODS  # Any of ATTRIBUTION_OPTIONS ("lime": the lime extra).
  e.metrics = METRICS
  # Localisation: num_grids n x n grids of confident, correct test images.
  e.grid_size = 3
  e.num_grids = 500
  e.conf_thresh = 0.5         # sigmoid(logit) must exceed it.
  e.skip_bug = True           # The original skips one image after every grid.
  e.smooth = 1                # Average-pool size before the clamp (odd; 1: none).
  e.seed = 42                 # Of the class draws and of a shuffled image order.
  e.num_comparison = 3        # Grids drawn in comparison.png (0: no figure).
  # Pixel removal: the first num_images test images, their true class.
  e.num_images = 1024
  # The order in which both metrics see the test images (IMAGE_ORDERS; the
  # grids' scan order, and which num_images come first). Seeded by `seed`.
  e.image_order = "auto"
  e.fraction = 0.25           # Remove up to this fraction of the pixels ...
  e.points = 128              # ... in this many steps (points + 1 values).
  e.order = "least"           # Least important first, or "most".
  e.fill = "encoded_zero"     # All 2C channels of [x, 1 - x] zeroed (original), or "black".
  e.batch_size = 8            # Grids or images per attribution call (per process).
  # The 95% bootstrap intervals of evaluation/summary.json (codajax.bootstrap):
  # resamples of whole grids (localisation) and images (pixel removal).
  e.bootstrap_resamples = bootstrap.NUM_RESAMPLES
  e.bootstrap_seed = bootstrap.SEED
  e.options = ml_collections.ConfigDict(
      {m: ml_collections.ConfigDict(o) for m, o in ATTRIBUTION_OPTIONS.items()})
  return e


def image_order(config) -> str:
  """config.evaluation.image_order with "auto" decided: "dataset" or "shuffled"."""
  order = config.evaluation.image_order
  if order != "auto":
    return order
  # "tfds:<name>[/<config>][:<version>]"; ImageNet also as imagenet2012_subset etc.
  name = re.split(r"[/:]", config.dataset[5:])[0] if config.dataset.startswith("tfds:") else ""
  known = name in AUTHORS_ORDER_DATASETS or name.startswith("imagenet2012_")
  return "dataset" if known else "shuffled"


def parse_arg(arg):
  """'tiny' or 'name,tiny' -> (name or None, tiny?)."""
  parts = [p for p in (arg or "").split(",") if p]
  tiny = any(p in TINY_ARGS for p in parts)
  rest = [p for p in parts if p not in TINY_ARGS]
  if len(rest) > 1:
    raise ConfigError(f"config arg {arg!r}: give at most one variant name plus ',tiny'.")
  return (rest[0] if rest else None), tiny


def start(arg, name: str, variants=(), default=None):
  """(base_config() with its variant set, tiny?) for the config file `name`.

  `variants` are the names the file accepts; `default` is used when `arg`
  names none (None: the file's unnamed default).
  """
  variant, tiny = parse_arg(arg)
  variant = variant or default
  if variant is not None and variant not in variants:
    if not variants:
      raise ConfigError(f"Unknown {name} variant {variant!r}: configs/{name}.py takes no "
                        "variant name, only ',tiny'.")
    raise ConfigError(f"Unknown {name} variant {variant!r}; choose one of "
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


def resolve(config, num_classes: int, num_devices: int,
            num_train: Optional[int] = None) -> ml_collections.ConfigDict:
  """A locked copy with num_classes and a last layer of -1 filled from the data.

  Checks that the batch sizes fit `num_devices` (an eval batch is rounded
  down to a multiple of them), that the lr is positive and, given `num_train`
  (training), that a batch does not exceed the training split.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if config.num_classes is None:
    config.num_classes = num_classes
  out = list(config.model.out_channels)
  if out[-1] == -1:
    out[-1] = num_classes
    config.model.out_channels = tuple(out)
  if out[-1] != num_classes:
    raise ConfigError(
        f"config.model.out_channels ends in {out[-1]} but the data has "
        f"{num_classes} classes; set the last entry to {num_classes} (or -1).")
  if num_train is not None and config.batch_size > num_train:
    raise ConfigError(
        f"config.batch_size={config.batch_size} exceeds the {num_train} training examples "
        f"of {config.dataset}; use at most {num_train}.")
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"config.grad_accum_steps={config.grad_accum_steps} (>= 1).")
  micro = config.batch_size // config.grad_accum_steps
  if micro % num_devices:
    raise ConfigError(
        f"The per-step batch batch_size // grad_accum_steps = {micro} must be a "
        f"multiple of the {num_devices} devices; change config.batch_size.")
  if config.eval_batch_size % num_devices:
    config.eval_batch_size = num_devices * max(1, config.eval_batch_size // num_devices)
  if config.learning_rate <= 0 or not math.isfinite(config.learning_rate):
    raise ConfigError(f"config.learning_rate must be > 0, got {config.learning_rate}.")
  return config.lock()


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(config) -> None:
  """Checks the whole config once, before any work; raises one ConfigError.

  Its message has one line per problem, naming the field and the fix.
  """
  problems = []

  def need(ok, field, rule):
    if not ok:
      value = config
      for part in field.split("."):
        value = value[part]
      problems.append(f"config.{field}={value!r}: {rule}")

  for f in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every_steps",
            "keep_checkpoints", "shuffle_buffer"):
    need(_is_int(config[f]) and config[f] >= 1, f, "must be an integer >= 1.")
  need(_is_int(config.num_explain) and config.num_explain >= 1, "num_explain",
       "must be an integer >= 1 (the test images explained); for no figures set "
       "config.explain_at_end=False.")
  if not problems and config.batch_size % config.grad_accum_steps:
    need(False, "batch_size", "must be a multiple of config.grad_accum_steps="
         f"{config.grad_accum_steps}.")
  if not (_is_int(config.num_steps) and config.num_steps > 0):
    need(_number(config.num_epochs) and config.num_epochs > 0, "num_epochs",
         "must be > 0 (or set config.num_steps > 0, which overrides it).")
  need(_is_int(config.seed) and 0 <= config.seed < 2**32, "seed",
       "must be an integer in [0, 2**32).")
  need(_number(config.learning_rate) and config.learning_rate > 0, "learning_rate",
       "must be a finite number > 0.")
  for f in ("weight_decay", "matrix_reg_lambda", "warmup_epochs", "warmup_start_lr"):
    need(_number(config[f]) and config[f] >= 0, f, "must be a finite number >= 0.")
  need(_number(config.lr_decay_every_epochs) and config.lr_decay_every_epochs > 0,
       "lr_decay_every_epochs", "must be > 0.")
  need(_number(config.lr_decay_factor) and config.lr_decay_factor > 0, "lr_decay_factor",
       "must be > 0.")
  need(config.lr_schedule in LR_SCHEDULES, "lr_schedule", f"use one of {LR_SCHEDULES}.")
  need(config.augment in AUGMENTS, "augment", f"use one of {AUGMENTS}.")
  for f in ("class_subset", "randaugment_layers"):
    need(_is_int(config[f]) and config[f] >= 0, f, "must be an integer >= 0.")
  need(_number(config.randaugment_magnitude) and 0 <= config.randaugment_magnitude <= 30,
       "randaugment_magnitude", "must be in [0, 30].")
  need(_is_int(config.matrix_reg_classes) and config.matrix_reg_classes >= 1,
       "matrix_reg_classes", "must be an integer >= 1.")
  for f in ("image_size", "resize_size", "num_classes"):
    need(config[f] is None or (_is_int(config[f]) and config[f] >= 1), f,
         "must be an integer >= 1 (or unset).")
  if config.augment == "imagenet":
    need(config.resize_size is not None, "resize_size",
         "must be set (the short side before the crop) when config.augment='imagenet'.")
  need(config.dataset in LOCAL_DATASETS or (
      isinstance(config.dataset, str) and config.dataset.startswith("tfds:")
      and len(config.dataset) > 5), "dataset",
       f"use 'tfds:<name>' or one of {LOCAL_DATASETS}.")
  _validate_model(config, need)
  _validate_evaluation(config, need)
  for field, rule in finetune_spec.problems(config):
    need(False, field, rule)
  if problems:
    raise ConfigError("\n".join(problems))


def _validate_model(config, need) -> None:
  """architectures.model_problems, with its examples written as the flag to type."""
  for field, rule in architectures.model_problems(config.model, last_from_data=True):
    need(False, f"model.{field}",
         rule.replace("e.g. (1, 2, 3).", f"e.g. --config.model.{field}='(1, 2, 3)'."))


def match_name(name, known, n: int = 1) -> tuple[Optional[str], list]:
  """(the entry of `known` that `name` is, case aside, []), or (None, up to n
  entries spelt close to it): one matcher for method, metric and model names."""
  by_lower = {k.lower(): k for k in known}
  if isinstance(name, str) and name.lower() in by_lower:
    return by_lower[name.lower()], []
  close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=n, cutoff=0.6)
  return None, [by_lower[c] for c in close]


def _spelling(names, known) -> str:
  """' Did you mean ...?' for the unknown `names` close to a `known` one, or ''."""
  hints = []
  for name in names if isinstance(names, (tuple, list)) else ():
    if isinstance(name, str) and name not in known:
      match, close = match_name(name, known)
      hints += [f"{(match or close[0])!r} for {name!r}"] if match or close else []
  return f" Did you mean {', '.join(hints)}?" if hints else ""


def _validate_evaluation(config, need) -> None:
  e = config.evaluation
  need(isinstance(e.methods, (tuple, list)) and len(e.methods) > 0
       and set(e.methods) <= set(ATTRIBUTION_OPTIONS), "evaluation.methods",
       f"must be a non-empty sequence of {tuple(ATTRIBUTION_OPTIONS)}."
       + _spelling(e.methods, tuple(ATTRIBUTION_OPTIONS)))
  need(isinstance(e.metrics, (tuple, list)) and len(e.metrics) > 0
       and set(e.metrics) <= set(METRICS), "evaluation.metrics",
       f"must be a non-empty sequence of {METRICS}." + _spelling(e.metrics, METRICS))
  need(e.image_order in IMAGE_ORDERS, "evaluation.image_order",
       f"use one of {IMAGE_ORDERS} (auto: the data set's order for tfds CIFAR-10 and "
       "ImageNet, else shuffled).")
  for f, low in (("grid_size", 2), ("num_grids", 1), ("num_images", 1), ("points", 1),
                 ("batch_size", 1), ("smooth", 1), ("num_comparison", 0), ("seed", 0),
                 ("bootstrap_resamples", 100), ("bootstrap_seed", 0)):
    need(_is_int(e[f]) and e[f] >= low, f"evaluation.{f}", f"must be an integer >= {low}.")
  need(not _is_int(e.smooth) or e.smooth % 2 == 1, "evaluation.smooth",
       "must be odd (a centred window).")
  need(_number(e.conf_thresh) and 0 <= e.conf_thresh < 1, "evaluation.conf_thresh",
       "must be in [0, 1).")
  need(_number(e.fraction) and 0 < e.fraction <= 1, "evaluation.fraction",
       "must be in (0, 1].")
  need(e.order in methods.ORDERS, "evaluation.order", f"use one of {methods.ORDERS}.")
  need(e.fill in methods.FILLS, "evaluation.fill", f"use one of {methods.FILLS}.")


def load_config(spec: str, root: Optional[str] = None) -> ml_collections.ConfigDict:
  """The locked config of `spec`, "configs/<name>.py[:<variant>]", as `--config`
  of codajax.main reads it: the file's `get_config(variant)` (`get_config()`
  without a variant), locked. For notebooks and scripts, which have no flags.

  The file is read by its path, relative to `root` (default: the working
  directory), so the clone that holds configs/ need not be on sys.path.

  Raises:
    ConfigError: no such file (one line, as on the command line); the
      config's own ConfigError for an unknown variant.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, *variant = spec.split(":", 1)
  full = os.path.join(root or os.getcwd(), path)
  if not os.path.isfile(full):
    raise ConfigError(f"{spec}: no such config file {full!r}; give configs/<name>.py[:variant].")
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f"codajax_config_{name}", full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(*variant)
  validate(config)  # One clear error now, not a confusing one from the data or model later.
  config.lock()
  return config
