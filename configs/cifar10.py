r"""CIFAR-10 with the paper's 9L-S CoDA-Nets (Böhle et al., CVPR 2021).

Variants, named as in the paper (the number after SQ is the temperature T):
  9L-S-CoDA-SQ-{10,50,100,500,1000,5000,10000}   squash norm
  9L-S-CoDA-L2-1000                              l2 norm
  9L-S-CoDA-SQ-rank-{4,8,16,144}                 ranks r, r, then 2r x 7; T = 1000
  9L-S-CoDA-SQ-lambda-{0.0,0.1,0.25,0.5,1.0}     T = 64, lambda * mean|M| loss
Append ",tiny" for a few-step smoke run.

  python -m codajax.prepare --config configs/cifar10.py
  python -m codajax.main --config configs/cifar10.py:9L-S-CoDA-SQ-1000 \
      --workdir workdirs/cifar10-sq-1000

The recipe: Adam, lr 2.5e-4 divided by 1.5 every 30 epochs, 200 epochs,
effective batch 16 (2 x 8 with gradient accumulation, as in the original),
BCE-with-logits on one-hot targets, random crop 32 after 4-pixel zero padding
and horizontal flips, logit bias log(0.1/0.9). The paper reports about 93%
test accuracy for 9L-S-CoDA-SQ-1000 (the tiny variant only checks plumbing).
"""

import re

from codajax import architectures
from codajax import config_lib

TEMPERATURES = (10, 50, 100, 500, 1000, 5000, 10000)
RANKS = (4, 8, 16, 144)
LAMBDAS = ("0.0", "0.1", "0.25", "0.5", "1.0")
VARIANTS = ([f"9L-S-CoDA-SQ-{t}" for t in TEMPERATURES] + ["9L-S-CoDA-L2-1000"] +
            [f"9L-S-CoDA-SQ-rank-{r}" for r in RANKS] +
            [f"9L-S-CoDA-SQ-lambda-{l}" for l in LAMBDAS])


def model_for(variant):
  """(model ConfigDict, matrix_reg_lambda) of a paper variant."""
  layers, fields, lam = {}, {}, 0.0
  if m := re.fullmatch(r"9L-S-CoDA-SQ-rank-(\d+)", variant):
    r = int(m.group(1))
    layers, fields = dict(ranks=(r, r) + (2 * r,) * 7), dict(temperature=1000.0)
  elif m := re.fullmatch(r"9L-S-CoDA-SQ-lambda-([0-9.]+)", variant):
    fields, lam = dict(temperature=64.0), float(m.group(1))
  elif m := re.fullmatch(r"9L-S-CoDA-(SQ|L2)-(\d+)", variant):
    fields = dict(norm={"SQ": "squash", "L2": "l2"}[m.group(1)], temperature=float(m.group(2)))
  else:
    raise ValueError(f"Unknown cifar10 variant {variant!r}; choose one of {VARIANTS}.")
  return config_lib.model_config(**architectures.cifar10_9l_s(**layers), **fields), lam


def get_config(arg=None):
  c, tiny = config_lib.start(arg, "cifar10", VARIANTS, "9L-S-CoDA-SQ-1000")
  c.update(dataset="tfds:cifar10", image_size=32, num_classes=10, augment="crop_flip")
  c.model, c.matrix_reg_lambda = model_for(c.variant)
  config_lib.schedule(c, batch_size=16, grad_accum_steps=2, num_epochs=200.0,
                      learning_rate=2.5e-4, lr_schedule="step", lr_decay_every_epochs=30.0,
                      lr_decay_factor=1.5, log_every_steps=500)
  if tiny:  # 16 = 2 x 8: divisible by up to 8 devices.
    config_lib.tiny(c, num_steps=8, log_every_steps=2, eval_every_steps=4,
                    checkpoint_every_steps=4, eval_batch_size=16, shuffle_buffer=100,
                    net=True)
  return c
