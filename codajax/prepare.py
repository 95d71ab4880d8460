r"""Prepares a config's data set once, before any training run.

  python -m codajax.prepare --config configs/cifar10.py [--config.data_dir=DIR]

tfds data sets are downloaded and converted here, once, outside any multi-host
job (training never downloads); ImageNet-style class subsets are counted.
Local sources (digits, IDX files, image folders) need no preparation: they are
only validated, with the same clear errors training would give.

SIGTERM or Ctrl-C stops it with one line (status 75 or 130; tfds removes its
unfinished files first): rerun the same command to go on.
"""

import signal

from codajax import workdir as workdir_lib


def _exit_at_once(signum, frame):
  """One line, then exit at once (no interpreter teardown: see codajax.workdir)."""
  del frame
  ctrl_c = signum == signal.SIGINT
  how = "interrupted by Ctrl-C" if ctrl_c else f"stopped by {signal.Signals(signum).name}"
  workdir_lib.exit_at_once(130 if ctrl_c else 75, f"codajax: prepare {how}; rerun the same "
                           "command to prepare the data.")


def _interrupt(signum, frame):
  """During the preparation: unwinds (tfds tidies up), then `_exit_at_once`."""
  del frame
  raise KeyboardInterrupt(signum)


# Before the heavy imports (TensorFlow: seconds), so that they give one line too.
if __name__ == "__main__":  # Not when imported.
  signal.signal(signal.SIGINT, _exit_at_once)
  signal.signal(signal.SIGTERM, _exit_at_once)

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from codajax import cli  # pylint: disable=g-import-not-at-top
from codajax import config_lib  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # Data preparation needs no accelerator.
  from codajax import input_pipeline  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGINT, _interrupt)
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    input_pipeline.prepare(FLAGS.config)
    info = input_pipeline.get_info(FLAGS.config)
  except (input_pipeline.DataError, config_lib.ConfigError) as e:
    raise SystemExit(cli.one_line(e)) from None  # One clear line.
  except KeyboardInterrupt as e:
    signum = e.args[0] if e.args else signal.SIGINT
    _exit_at_once(signum, None)
  print(f"{FLAGS.config.dataset} is ready: {info.num_train} training and "
        f"{info.num_test} test examples, {info.num_classes} classes, "
        f"images {info.image_shape}.")


if __name__ == "__main__":
  cli.run_app(main, flags_parser=cli.parse_flags)
