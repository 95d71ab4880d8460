r"""scikit-learn's bundled 8x8 handwritten digits: the embedded default.

Needs no download: the 1,797 images ship inside scikit-learn. They are
upsampled to 16x16 (nearest neighbour); the last 20% (360 images, a fixed,
seeded split) are the test set.

  python -m codajax.main --config configs/digits.py --workdir workdirs/digits

On 2 CPU cores this trains in about two minutes and reaches >= 95% test top-1,
then writes contribution-map figures to workdirs/digits/explanations/.
"""

from codajax import config_lib


def get_config(arg=None):
  _, tiny = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.dataset = "digits"
  c.image_size = 16
  c.num_classes = 10
  c.cache = True
  c.shuffle_buffer = 2_000
  c.model = config_lib.model_config(
      out_channels=(16, 32, 32, 10), ranks=(8, 8, 8, 8),
      kernel_sizes=(3, 3, 3, 1), strides=(1, 2, 1, 1), paddings=(1, 1, 1, 0),
      temperature=10.0)
  c.batch_size = 32
  c.num_epochs = 6.0
  c.learning_rate = 2e-3
  c.lr_schedule = "cosine"
  c.eval_batch_size = 360
  c.log_every_steps = 45
  c.explain_at_end = True
  if tiny:
    c.num_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
  return c
