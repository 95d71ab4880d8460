r"""scikit-learn's bundled 8x8 handwritten digits: the embedded default.

Needs no download: the 1,797 images ship inside scikit-learn. They are
upsampled to 16x16 (nearest neighbour); the last 20% (359 images, a fixed,
seeded split) are the test set.

  python -m codajax.main --config configs/digits.py --workdir workdirs/digits

On 2 CPU cores this trains in about two minutes and reaches >= 95% test top-1,
then writes contribution-map figures to workdirs/digits/explanations/.

  python -m codajax.main --config configs/digits.py --workdir workdirs/digits \
      --mode evaluate

then runs a tiny interpretability evaluation (16 2x2 grids of 32x32, 32
images, three methods; about 40 s on 2 CPU cores; see
codajax/evaluation.py) into workdirs/digits/evaluation/.

The variant `classes=<labels>` keeps some digits, relabelled 0..k-1 in the
order given (config.classes, see codajax/finetune_spec.py), and sizes the last
layer to them: e.g. train on 0-4, then fine-tune that net on 5-9:

  python -m codajax.main --config configs/digits.py:classes=0-4 \
      --workdir workdirs/digits-0-4
  python -m codajax.main --config configs/digits.py:classes=5-9 \
      --config.init_from=workdirs/digits-0-4 --config.init_head=new \
      --workdir workdirs/digits-5-9
"""

from codajax import config_lib

CLASSES = "classes="  # The variant's prefix.


def get_config(arg=None):
  name = config_lib.parse_arg(arg)[0] or ""
  subset = name[len(CLASSES):] if name.startswith(CLASSES) else None
  if subset == "":
    raise config_lib.ConfigError(f"digits variant {name!r} lists no labels; e.g. classes=0-4.")
  c, tiny = config_lib.start(arg, "digits", variants=(
      (name,) if subset is not None else (f"{CLASSES}<labels, e.g. 0-4>",)))
  c.update(dataset="digits", image_size=16, num_classes=10, cache=True, shuffle_buffer=2_000,
           explain_at_end=True)
  if subset is not None:  # The data then sizes the last layer (-1) and num_classes.
    c.update(classes=subset, num_classes=None)
  c.model = config_lib.model_config(
      out_channels=(16, 32, 32, 10 if subset is None else -1), ranks=(8, 8, 8, 8),
      kernel_sizes=(3, 3, 3, 1), strides=(1, 2, 1, 1), paddings=(1, 1, 1, 0),
      temperature=10.0)
  config_lib.schedule(c, batch_size=32, eval_batch_size=360, num_epochs=6.0,
                      learning_rate=2e-3, log_every_steps=45)
  # Three methods keep it at about 40 s on 2 CPU cores (adding "occ5" costs about
  # 15 s more, mostly compiling); any of attribution.METHODS can be added.
  c.evaluation.update(methods=("ours", "ixg", "gradcam"), grid_size=2, num_grids=16,
                      num_images=32, num_comparison=2)
  if tiny:
    config_lib.tiny(c, num_steps=6, log_every_steps=2, eval_every_steps=3,
                    checkpoint_every_steps=3)
  return c
