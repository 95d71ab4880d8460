"""Tests of codajax.config_lib and the configs in configs/.

Every variant of every config file builds, with and without ',tiny', and
keeps the recipe it had before config_lib held the shared fields: the values
below are those the config files gave at c28d53c.
"""

import math
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from codajax import architectures
from codajax import config_lib
from codajax import methods
from configs import cifar10
from configs import digits
from configs import fashion_mnist
from configs import image_folder
from configs import imagenet100

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"cifar10": cifar10, "digits": digits, "fashion_mnist": fashion_mnist,
         "image_folder": image_folder, "imagenet100": imagenet100}
VARIANTS = {"cifar10": [None] + cifar10.VARIANTS, "digits": [None],
            "fashion_mnist": [None, "tfds", "4L-T10", "4L-T1000"], "image_folder": [None],
            "imagenet100": [None, *imagenet100.VARIANTS]}
ALL = [(name, v) for name, variants in VARIANTS.items() for v in variants]

# The recipe of each file's default variant.
RECIPES = {
    "cifar10": dict(
        variant="9L-S-CoDA-SQ-1000", dataset="tfds:cifar10", image_size=32, num_classes=10,
        augment="crop_flip", batch_size=16, grad_accum_steps=2, eval_batch_size=256,
        num_epochs=200.0, learning_rate=2.5e-4, lr_schedule="step",
        lr_decay_every_epochs=30.0, lr_decay_factor=1.5, log_every_steps=500,
        shuffle_buffer=10_000, cache=False, explain_at_end=False, matrix_reg_lambda=0.0),
    "digits": dict(
        variant="", dataset="digits", image_size=16, num_classes=10, augment="none",
        batch_size=32, grad_accum_steps=1, eval_batch_size=360, num_epochs=6.0,
        learning_rate=2e-3, lr_schedule="cosine", log_every_steps=45, shuffle_buffer=2_000,
        cache=True, explain_at_end=True),
    "fashion_mnist": dict(
        dataset="idx", data_dir="/usr/share/datasets/fashion-mnist", image_size=28,
        num_classes=10, augment="none", batch_size=64, eval_batch_size=256,
        num_epochs=10.0, learning_rate=1e-3, lr_schedule="cosine", log_every_steps=200,
        shuffle_buffer=10_000, cache=True, explain_at_end=False),
    "image_folder": dict(
        dataset="image_folder", data_dir="", image_size=64, num_classes=None,
        augment="crop_flip", batch_size=64, eval_batch_size=256, num_epochs=30.0,
        learning_rate=1e-3, lr_schedule="cosine", log_every_steps=200, cache=False),
    "imagenet100": dict(
        variant="9L-L-CoDA-SQ-100000", dataset="tfds:imagenet2012", class_subset=100,
        test_split="validation", image_size=240, resize_size=256, num_classes=100,
        augment="imagenet", randaugment_layers=2, randaugment_magnitude=10, batch_size=64,
        grad_accum_steps=4, eval_batch_size=64, num_epochs=60.0, learning_rate=1e-3,
        lr_schedule="warmup_step", warmup_epochs=15.0, warmup_start_lr=2.5e-4,
        lr_decay_every_epochs=20.0, lr_decay_factor=2.0, log_every_steps=500),
}
# Every file's model (default variant): (layers, temperature, norm).
MODELS = {
    "cifar10": (architectures.cifar10_9l_s(), 1000.0, "squash"),
    "digits": (architectures.layers((16, 32, 32, 10), (8, 8, 8, 8), (3, 3, 3, 1),
                                    (1, 2, 1, 1), (1, 1, 1, 0)), 10.0, "squash"),
    "fashion_mnist": (architectures.layers((16, 32, 32, 64, 64, 10), (16, 16, 32, 32, 32, 32),
                                           (3, 3, 3, 3, 3, 1), (1, 2, 1, 2, 1, 1),
                                           (1, 1, 1, 1, 1, 0)), 100.0, "squash"),
    "image_folder": (architectures.layers(
        (16, 32, 32, 64, 64, 64, 64, 64, -1), (32, 32) + (64,) * 7, (3,) * 8 + (1,),
        (1, 2, 1, 2, 1, 2, 1, 1, 1), (1,) * 8 + (0,)), 1000.0, "squash"),
    "imagenet100": (architectures.imagenet100_9l_l(), 100000.0, "squash"),
}
# What ',tiny' changes (everything else stays); "model" is the changed model fields.
TINY = {
    "cifar10": dict(num_steps=8, eval_batch_size=16, log_every_steps=2, eval_every_steps=4,
                    checkpoint_every_steps=4, shuffle_buffer=100,
                    model=architectures.tiny(10)),
    "digits": dict(num_steps=6, log_every_steps=2, eval_every_steps=3,
                   checkpoint_every_steps=3),
    "fashion_mnist": dict(num_steps=4, batch_size=8, eval_batch_size=16, log_every_steps=2),
    "image_folder": dict(num_steps=4, batch_size=8, eval_batch_size=8, log_every_steps=1,
                         image_size=16, model=dict(architectures.tiny(-1), temperature=1.0)),
    "imagenet100": dict(num_steps=4, batch_size=8, grad_accum_steps=1, eval_batch_size=8,
                        image_size=48, resize_size=56, log_every_steps=1, eval_every_steps=4),
}


def arg(variant, tiny=False):
  return ",".join(p for p in (variant, "tiny" if tiny else None) if p) or None


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_default_variants_keep_their_recipe(name):
  c = FILES[name].get_config()
  assert {k: c[k] for k in RECIPES[name]} == RECIPES[name]
  layers, temperature, norm = MODELS[name]
  assert {k: c.model[k] for k in layers} == layers
  assert (c.model.temperature, c.model.norm) == (temperature, norm)
  assert c.model.logit_bias == pytest.approx(math.log(0.1 / 0.9))
  assert (c.model.dtype, c.model.impl, c.model.contraction, c.model.remat) == (
      "float32", "fused", "auto", False)
  assert (c.num_steps, c.seed, c.weight_decay, c.keep_checkpoints) == (-1, 0, 0.0, 3)


@pytest.mark.parametrize("name, variant", ALL)
def test_tiny_changes_only_the_smoke_run_fields(name, variant):
  full = FILES[name].get_config(arg(variant)).to_dict()
  tiny = FILES[name].get_config(arg(variant, tiny=True)).to_dict()
  want = dict(TINY[name])
  model = want.pop("model", {})
  assert {k: v for k, v in tiny.items() if k != "model" and full[k] != v} == want
  assert {k: v for k, v in tiny["model"].items() if full["model"][k] != v} == {
      k: v for k, v in model.items() if full["model"][k] != v}


@pytest.mark.parametrize("variant", cifar10.VARIANTS)
def test_cifar10_variants_are_the_papers(variant):
  c = cifar10.get_config(variant)
  kind, value = variant.removeprefix("9L-S-CoDA-").rsplit("-", 1)
  r = int(value) if kind == "SQ-rank" else 32
  ranks = (r, r) + (2 * r,) * 7
  want = {"SQ": ("squash", float(value), 0.0), "L2": ("l2", float(value), 0.0),
          "SQ-rank": ("squash", 1000.0, 0.0), "SQ-lambda": ("squash", 64.0, float(value))}
  assert (c.model.norm, c.model.temperature, c.matrix_reg_lambda) == want[kind]
  assert c.model.to_dict() == config_lib.model_config(
      **architectures.cifar10_9l_s(ranks), norm=c.model.norm,
      temperature=c.model.temperature).to_dict()
  assert {k: c[k] for k in RECIPES["cifar10"] if k not in ("variant", "matrix_reg_lambda")} == {
      k: v for k, v in RECIPES["cifar10"].items() if k not in ("variant", "matrix_reg_lambda")}
  assert c.variant == variant


def test_fashion_mnist_tfds_variant_reads_tfds():
  c = fashion_mnist.get_config("tfds")
  assert (c.dataset, c.data_dir, c.variant) == ("tfds:fashion_mnist", None, "tfds")


@pytest.mark.parametrize("name, bad", [("cifar10", "9L-S-CoDA-SQ-7"), ("digits", "big"),
                                       ("fashion_mnist", "idx"), ("imagenet100", "9L-S"),
                                       ("cifar10", "9L-S-CoDA-SQ-10,9L-S-CoDA-SQ-50")])
def test_unknown_variants_are_refused(name, bad):
  with pytest.raises(ValueError, match="variant"):
    FILES[name].get_config(bad)


@pytest.mark.parametrize("name, variant", ALL)
def test_every_config_field_is_declared_by_base_config(name, variant):
  for tiny in (False, True):
    c = FILES[name].get_config(arg(variant, tiny))
    assert c.is_locked and c.model.is_locked
    assert set(c.keys()) == set(config_lib.base_config().keys())
    assert set(c.model.keys()) == set(architectures.LAYER_FIELDS) | set(
        architectures.MODEL_DEFAULTS)


def test_misspelt_fields_fail():
  c = digits.get_config()
  with pytest.raises(AttributeError, match="batchsize"):
    c.batchsize = 8
  with pytest.raises(AttributeError, match="temprature"):
    c.model.temprature = 8.0
  with pytest.raises(KeyError, match="lr"):
    c.update(lr=0.1)
  with pytest.raises(ValueError, match="temprature"):
    config_lib.model_config(**architectures.tiny(10), temprature=1.0)


@pytest.mark.parametrize("override, ok", [("--config.batch_size=8", True),
                                          ("--config.model.temperature=3", True),
                                          ("--config.batchsize=8", False),
                                          ("--config.model.temprature=3", False)])
def test_misspelt_command_line_overrides_fail(override, ok):
  argv = ["prog", f"--config={ROOT}/configs/digits.py:tiny", override]
  fv = flags.FlagValues()  # As codajax.main defines --config.
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  if ok:
    fv(argv)
    assert fv.config.batch_size == 8 or fv.config.model.temperature == 3.0
  else:
    with pytest.raises(AttributeError, match="Did you mean"):
      fv(argv)


def test_config_lib_and_configs_import_no_jax():
  code = ("import sys; from configs import cifar10, digits, fashion_mnist, image_folder, "
          "imagenet100; cifar10.get_config(); assert 'jax' not in sys.modules, 'jax imported'")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                 env=dict(os.environ, PYTHONPATH=ROOT))


def test_resolve_fills_the_classes_and_rejects_bad_configs_with_clear_messages():
  folder = config_lib.resolve(image_folder.get_config("tiny"), 3, 8)
  assert (folder.num_classes, folder.model.out_channels) == (3, (8, 8, 3))
  assert folder.is_locked
  assert config_lib.resolve(digits.get_config(), 10, 8).eval_batch_size == 360
  assert config_lib.resolve(digits.get_config(), 10, 16).eval_batch_size == 352

  def tiny_digits(**overrides):
    c = digits.get_config("tiny")
    c.update(overrides)
    return c
  seven = tiny_digits()
  seven.model.out_channels = tuple(seven.model.out_channels[:-1]) + (7,)
  with pytest.raises(ValueError, match="ends in 7 but the data has 10 classes"):
    config_lib.resolve(seven, 10, 8)
  with pytest.raises(ValueError, match="12 must be a multiple of the 8 devices"):
    config_lib.resolve(tiny_digits(batch_size=12), 10, 8)
  with pytest.raises(ValueError, match="multiple of config.grad_accum_steps=3"):
    config_lib.resolve(tiny_digits(batch_size=32, grad_accum_steps=3), 10, 8)
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    config_lib.resolve(tiny_digits(learning_rate=0.0), 10, 8)


# ------------------------------------------------------------ validate (issue 9)


@pytest.mark.parametrize("name, variant", ALL)
def test_validate_accepts_every_config(name, variant):
  for tiny in (False, True):
    config_lib.validate(FILES[name].get_config(arg(variant, tiny)))


def override(*args):
  """The digits tiny config with command-line overrides, as codajax.main parses it."""
  argv = ["prog", f"--config={ROOT}/configs/digits.py:tiny", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


# --config.<override> of config.model and config.evaluation: the start of the one-line
# message that names it (after "config."), with spelling hints for the evaluation's names.
PROBLEMS = {
    "model.dtype=bfloat61": "model.dtype='bfloat61': use one of ('float32', 'bfloat16').",
    "model.impl=fast": "model.impl='fast': use one of",
    "model.contraction=matmul": "model.contraction='matmul': use one of",
    "model.norm=l1": "model.norm='l1': use one of",
    "model.ranks=abc": "model.ranks=('abc',): must be a sequence of integers, one per layer",
    "model.ranks=(8,8)":
        "model.ranks=(8, 8): has 2 entries but out_channels has 4; give one per layer.",
    "model.strides=(1,0,1,1)": "model.strides=(1, 0, 1, 1): entries must",
    "model.temperature=0": "model.temperature=0.0: must be",
    "evaluation.methods=('ours','shap')": "evaluation.methods=('ours', 'shap'): must be a "
    "non-empty sequence of ('ours', 'grad', 'ixg', 'intgrad', 'deeplift', 'gradcam', 'occ5', "
    "'occ9', 'rise', 'lime').",
    "evaluation.metrics=('pointing',)": "evaluation.metrics=('pointing',):",
    "evaluation.grid_size=1": "evaluation.grid_size=1: must be an integer >= 2.",
    "evaluation.smooth=4": "evaluation.smooth=4: must be odd",
    "evaluation.conf_thresh=1.5": "evaluation.conf_thresh=1.5: must be in",
    "evaluation.fraction=0": "evaluation.fraction=0.0: must be in (0, 1].",
    "evaluation.order=random": "evaluation.order='random': use one of ('least', 'most').",
    "evaluation.fill=grey": "evaluation.fill='grey': use one of",
    "evaluation.methods=('GradCAM','IxG')": "evaluation.methods=('GradCAM', 'IxG'): must be "
    "a non-empty sequence of ('ours', 'grad', 'ixg', 'intgrad', 'deeplift', 'gradcam', "
    "'occ5', 'occ9', 'rise', 'lime'). Did you mean 'gradcam' for 'GradCAM', 'ixg' for 'IxG'?",
    "evaluation.metrics=('pixel_remova',)": "evaluation.metrics=('pixel_remova',): must be a "
    "non-empty sequence of ('localisation', 'pixel_removal'). Did you mean 'pixel_removal' "
    "for 'pixel_remova'?",
    "evaluation.image_order=random":
        "evaluation.image_order='random': use one of ('auto', 'dataset', 'shuffled')",
}


@pytest.mark.parametrize("args, message", [
    (["--config.batch_size=0"], "config.batch_size=0: must be an integer >= 1."),
    (["--config.batch_size=-32"], "config.batch_size=-32: must be an integer >= 1."),
    (["--config.eval_batch_size=0"], "config.eval_batch_size=0: must be"),
    (["--config.grad_accum_steps=0"], "config.grad_accum_steps=0: must be"),
    (["--config.grad_accum_steps=3"], "config.batch_size=32: must be a multiple of "
                                      "config.grad_accum_steps=3."),
    (["--config.num_epochs=-3", "--config.num_steps=-1"],
     "config.num_epochs=-3.0: must be > 0 (or set config.num_steps > 0"),
    (["--config.log_every_steps=0"], "config.log_every_steps=0: must be"),
    (["--config.num_explain=0"], "config.num_explain=0: must be an integer >= 1 (the test "
                                 "images explained); for no figures set "
                                 "config.explain_at_end=False."),
    (["--config.num_explain=-1"], "config.num_explain=-1: must be"),
    (["--config.keep_checkpoints=0"], "config.keep_checkpoints=0: must be an integer >= 1."),
    (["--config.keep_checkpoints=-1"], "config.keep_checkpoints=-1: must be"),
    (["--config.seed=-1"], "config.seed=-1: must be an integer in [0, 2**32)."),
    (["--config.learning_rate=0"], "config.learning_rate=0.0: must be a finite number > 0."),
    (["--config.learning_rate=nan"], "config.learning_rate=nan: must be"),
    # The choices, named with the list to pick from.
    (["--config.lr_schedule=cosin"], "config.lr_schedule='cosin': use one of ('constant', "),
    (["--config.augment=flip"], "config.augment='flip': use one of ('none', "),
    (["--config.image_size=0"], "config.image_size=0: must be an integer >= 1 (or unset)."),
    (["--config.dataset=mnist"], "config.dataset='mnist': use 'tfds:<name>' or one of"),
    *[([f"--config.{k}"], f"config.{v}") for k, v in PROBLEMS.items()],
    (["--config.evaluation.options.rise.num_mask=5"], None),
])
def test_validate_names_the_field_and_the_fix(args, message):
  if message is None:  # A misspelt option is no field of the locked config.
    with pytest.raises(AttributeError, match="num_mask"):
      override(*args)
    return
  config = override(*args)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert str(e.value).startswith(message), str(e.value)
  assert len(str(e.value).splitlines()) == 1
  assert isinstance(e.value, ValueError)


def test_validate_gives_one_line_per_problem():
  config = override("--config.batch_size=0", "--config.seed=-1", "--config.model.dtype=x")
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  lines = str(e.value).splitlines()
  assert [l.split(":")[0] for l in lines] == [
      "config.batch_size=0", "config.seed=-1", "config.model.dtype='x'"]


def test_num_steps_overrides_a_bad_num_epochs():
  config_lib.validate(override("--config.num_epochs=-3", "--config.num_steps=5"))


def test_every_declared_choice_is_accepted_and_implemented():
  """Each choice is declared once (architectures, methods, config_lib) and
  read from there: the config accepts it and the code that owns it runs it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from codajax import metrics, models, steps  # pylint: disable=g-import-not-at-top
  c = digits.get_config("tiny")
  for field, choices in (("norm", architectures.NORMS), ("dtype", architectures.DTYPES),
                         ("impl", architectures.IMPLS),
                         ("contraction", architectures.CONTRACTIONS)):
    for value in choices:
      config = digits.get_config("tiny")
      config.model[field] = value
      config_lib.validate(config)
      model = models.from_config(dict(architectures.tiny(3), **{field: value}))
      model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  for schedule in config_lib.LR_SCHEDULES:  # steps knows every one.
    c.lr_schedule = schedule
    steps.learning_rate_fn(config_lib.resolve(c, 10, 8), 10.0, 100)
  assert set(methods.PAPER_METHODS) <= set(methods.METHODS)
  maps = jnp.arange(16.0).reshape(1, 4, 4)
  ranks = {order: metrics.removal_ranks(maps, order) for order in methods.ORDERS}
  assert ranks["least"][0, 0, 0] == 0 and ranks["most"][0, 0, 0] == 15
  model = models.tiny(2)
  x = jnp.full((1, 8, 8, 3), 0.5)
  variables = model.init(jax.random.key(0), x)
  for fill in methods.FILLS:
    metrics.pixel_removal_curves(model, variables, x, maps=jnp.zeros((1, 8, 8)),
                                 targets=jnp.zeros(1, jnp.int32), fraction=0.25, points=2,
                                 order="least", fill=fill)


@pytest.mark.parametrize("name, variant, order", [
    ("cifar10", None, "dataset"), ("cifar10", "9L-S-CoDA-SQ-10,tiny", "dataset"),
    ("imagenet100", None, "dataset"), ("digits", None, "shuffled"),
    ("fashion_mnist", None, "shuffled"), ("fashion_mnist", "tfds", "shuffled"),
    ("image_folder", None, "shuffled")])
def test_auto_image_order_keeps_only_the_authors_orders(name, variant, order):
  """The evaluation sees CIFAR-10 and ImageNet in the order the authors did;
  every other test split (maybe class by class) in a seeded shuffle."""
  config = FILES[name].get_config(variant)
  assert config.evaluation.image_order == "auto"
  assert config_lib.image_order(config) == order
  for fixed in ("dataset", "shuffled"):
    config.evaluation.image_order = fixed
    assert config_lib.image_order(config) == fixed


@pytest.mark.parametrize("dataset, order", [
    ("tfds:cifar10:3.0.2", "dataset"), ("tfds:imagenet2012_subset/10pct", "dataset"),
    ("tfds:imagenet2012/5.1.0", "dataset"),
    ("tfds:cifar100", "shuffled"), ("tfds:imagenette", "shuffled"), ("idx", "shuffled")])
def test_auto_image_order_by_tfds_name(dataset, order):
  config = digits.get_config()
  config.dataset = dataset
  assert config_lib.image_order(config) == order


@pytest.mark.parametrize("name, bad", [("image_folder", "big"), ("image_folder", "tfds")])
def test_files_without_variants_refuse_any_variant(name, bad):
  with pytest.raises(config_lib.ConfigError,
                     match=f"Unknown {name} variant '{bad}': configs/{name}.py takes no "
                           "variant name, only ',tiny'."):
    FILES[name].get_config(bad)
  with pytest.raises(config_lib.ConfigError, match="variant"):
    FILES[name].get_config(f"{bad},tiny")
