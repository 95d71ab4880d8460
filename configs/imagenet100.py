r"""ImageNet-100 (ImageNet-2012 class ids 0-99) with the paper's 9L-L CoDA-Net.

  # ImageNet cannot be downloaded automatically: place the ILSVRC2012 tars in
  # <data_dir>/downloads/manual as tfds documents, then
  python -m codajax.prepare --config configs/imagenet100.py --config.data_dir=DIR
  python -m codajax.main --config configs/imagenet100.py:9L-L-CoDA-SQ-100000 \
      --config.data_dir=DIR --workdir workdirs/imagenet100

Recipe: 60 epochs, effective batch 64 (4 x 16 accumulation in the original),
lr warmed up linearly from 2.5e-4 to 1e-3 over epochs 0-14, then
1e-3 / 2^floor(epoch/20); training resize 256, random crop 240, flip,
RandAugment(n=2, m=10); test resize 256, centre crop 240; top-1 and top-5. The
paper reports about 77% top-1 for this model.
"""

from codajax import config_lib

VARIANTS = ("9L-L-CoDA-SQ-100000",)


def get_config(arg=None):
  variant, tiny = config_lib.parse_arg(arg)
  variant = variant or VARIANTS[0]
  if variant not in VARIANTS:
    raise ValueError(f"Unknown imagenet100 variant {variant!r}; choose one of {VARIANTS}.")
  c = config_lib.base_config()
  c.variant = variant
  c.dataset = "tfds:imagenet2012"
  c.class_subset = 100        # Keep labels 0..99 (ImageNet-100 as in the paper).
  c.test_split = "validation"
  c.image_size = 240
  c.resize_size = 256
  c.num_classes = 100
  c.augment = "imagenet"
  c.randaugment_layers = 2
  c.randaugment_magnitude = 10
  c.model = config_lib.imagenet100_9l_l(100000.0)
  c.batch_size = 64
  c.grad_accum_steps = 4
  c.eval_batch_size = 64
  c.num_epochs = 60.0
  c.learning_rate = 1e-3
  c.lr_schedule = "warmup_step"
  c.warmup_epochs = 15.0
  c.warmup_start_lr = 2.5e-4
  c.lr_decay_every_epochs = 20.0
  c.lr_decay_factor = 2.0
  c.log_every_steps = 500
  if tiny:
    c.num_steps = 4
    c.batch_size = 8
    c.grad_accum_steps = 1
    c.eval_batch_size = 8
    c.image_size = 48
    c.resize_size = 56
    c.log_every_steps = 1
    c.eval_every_steps = 4
  return c
