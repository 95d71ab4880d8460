r"""Any image-folder data set: <data_dir>/{train,test}/<class>/*.{png,jpg,jpeg}.

E.g. TinyImageNet reorganised into that tree (64x64, 200 classes):

  python -m codajax.main --config configs/image_folder.py \
      --config.data_dir=/data/tiny-imagenet --config.image_size=64 \
      --workdir workdirs/tiny-imagenet

Classes are the sorted sub-folder names of train/; num_classes is inferred from
them when unset, and the last layer's out_channels follow it. Images are resized
to image_size x image_size.
"""

from codajax import config_lib


def get_config(arg=None):
  _, tiny = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.dataset = "image_folder"
  c.data_dir = ""
  c.image_size = 64
  c.augment = "crop_flip"
  c.model = config_lib.model_config(
      out_channels=(16, 32, 32, 64, 64, 64, 64, 64, -1),
      ranks=(32, 32, 64, 64, 64, 64, 64, 64, 64),
      kernel_sizes=(3,) * 8 + (1,), strides=(1, 2, 1, 2, 1, 2, 1, 1, 1),
      paddings=(1,) * 8 + (0,), temperature=1000.0)
  c.batch_size = 64
  c.num_epochs = 30.0
  c.learning_rate = 1e-3
  c.lr_schedule = "cosine"
  c.log_every_steps = 200
  if tiny:
    c.num_steps = 4
    c.batch_size = 8
    c.eval_batch_size = 8
    c.log_every_steps = 1
    c.image_size = 16
    c.model = config_lib.model_config((8, 8, -1), (4, 4, 4), (3, 3, 1), (1, 2, 1), (1, 1, 0))
  return c
