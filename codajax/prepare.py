r"""Prepares a config's data set once, before any training run.

  python -m codajax.prepare --config configs/cifar10.py [--config.data_dir=DIR]

tfds data sets are downloaded and converted here, once, outside any multi-host
job (training never downloads); ImageNet-style class subsets are counted.
Local sources (digits, IDX files, image folders) need no preparation: they are
only validated, with the same clear errors training would give.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from codajax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # Data preparation needs no accelerator.
  from codajax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    input_pipeline.prepare(FLAGS.config)
    info = input_pipeline.get_info(FLAGS.config)
  except (input_pipeline.DataError, config_lib.ConfigError) as e:
    raise SystemExit(config_lib.one_line(e)) from None  # One clear line.
  print(f"{FLAGS.config.dataset} is ready: {info.num_train} training and "
        f"{info.num_test} test examples, {info.num_classes} classes, "
        f"images {info.image_shape}.")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
