r"""ImageNet-100 (ImageNet-2012 class ids 0-99) with the paper's 9L-L CoDA-Net.

  # ImageNet cannot be downloaded automatically: place the ILSVRC2012 tars in
  # <data_dir>/downloads/manual as tfds documents, then
  python -m codajax.prepare --config configs/imagenet100.py --config.data_dir=DIR
  python -m codajax.main --config configs/imagenet100.py:9L-L-CoDA-SQ-100000 \
      --config.data_dir=DIR --workdir workdirs/imagenet100

Recipe: 60 epochs, effective batch 64 (4 x 16 accumulation in the original),
lr np.linspace(2.5e-4, 1e-3, 15)[epoch] for epochs 0-14 (constant within an
epoch, 1e-3 at epoch 14), then 1e-3 / 2^floor(epoch/20); training resize 256,
random crop 240, flip, RandAugment(n=2, m=10); test resize 256, centre crop 240;
top-1 and top-5. The paper reports about 77% top-1 for this model.
"""

from codajax import architectures
from codajax import config_lib

VARIANTS = ("9L-L-CoDA-SQ-100000",)


def get_config(arg=None):
  c, tiny = config_lib.start(arg, "imagenet100", VARIANTS, VARIANTS[0])
  # class_subset: keep labels 0..99 (ImageNet-100 as in the paper).
  c.update(dataset="tfds:imagenet2012", class_subset=100, test_split="validation",
           image_size=240, resize_size=256, num_classes=100, augment="imagenet",
           randaugment_layers=2, randaugment_magnitude=10)
  c.model = config_lib.model_config(**architectures.imagenet100_9l_l(), temperature=100000.0)
  config_lib.schedule(c, batch_size=64, grad_accum_steps=4, eval_batch_size=64,
                      num_epochs=60.0, learning_rate=1e-3, lr_schedule="warmup_step",
                      warmup_epochs=15.0, warmup_start_lr=2.5e-4,
                      lr_decay_every_epochs=20.0, lr_decay_factor=2.0, log_every_steps=500)
  if tiny:
    config_lib.tiny(c, num_steps=4, log_every_steps=1, eval_every_steps=4, batch_size=8,
                    grad_accum_steps=1, eval_batch_size=8, image_size=48, resize_size=56)
  return c
