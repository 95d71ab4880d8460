r"""Any image-folder data set: <data_dir>/{train,test}/<class>/*.{png,jpg,jpeg}.

E.g. TinyImageNet reorganised into that tree (64x64, 200 classes):

  python -m codajax.main --config configs/image_folder.py \
      --config.data_dir=/data/tiny-imagenet --config.image_size=64 \
      --workdir workdirs/tiny-imagenet

Classes are the sorted sub-folder names of train/; num_classes is inferred from
them when unset, and the last layer's out_channels follow it (-1). Images are
resized to image_size x image_size.
"""

from codajax import config_lib


def get_config(arg=None):
  c, tiny = config_lib.start(arg, "image_folder")
  c.update(dataset="image_folder", data_dir="", image_size=64, augment="crop_flip")
  c.model = config_lib.model_config(
      out_channels=(16, 32, 32, 64, 64, 64, 64, 64, -1),
      ranks=(32, 32, 64, 64, 64, 64, 64, 64, 64),
      kernel_sizes=(3,) * 8 + (1,), strides=(1, 2, 1, 2, 1, 2, 1, 1, 1),
      paddings=(1,) * 8 + (0,), temperature=1000.0)
  config_lib.schedule(c, batch_size=64, num_epochs=30.0, learning_rate=1e-3,
                      log_every_steps=200)
  if tiny:
    config_lib.tiny(c, num_steps=4, log_every_steps=1, batch_size=8, eval_batch_size=8,
                    image_size=16, net=True, model=dict(temperature=1.0))
  return c
