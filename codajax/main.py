r"""Command line: python -m codajax.main --config configs/X.py[:variant] --workdir DIR.

  --mode=train    train and evaluate; an existing workdir resumes automatically
  --mode=eval     top-1 / top-5 of the latest (or an imported) checkpoint
  --mode=explain  contribution-map figures of the first test images
  --mode=evaluate the interpretability evaluation (localisation, pixel removal)
                  of the checkpoint's attributions and the baselines', into
                  <workdir>/evaluation (config.evaluation; resumable)

Any config field can be overridden: --config.batch_size=64. Set
CODAJAX_DISTRIBUTED=1 (or --distributed) on multi-host TPU pods and SLURM GPU
clusters to call jax.distributed.initialize() with the platform's defaults.

Exit status: 0 done; 1 an error (one line naming the problem and the fix);
75 (EX_TEMPFAIL) training stopped early by SIGTERM, Ctrl-C or a preemption
notice, after saving a checkpoint: rerun the same command to resume;
130 interrupted at once: a second Ctrl-C, or Ctrl-C in eval/explain mode.
"""

import logging as logging_std
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from codajax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and figures go.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "explain", "evaluate"], "What to do.")
flags.DEFINE_bool("distributed", os.environ.get("CODAJAX_DISTRIBUTED", "") == "1",
                  "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: try again (requeue) to resume.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention.


class _QuietOrbax(logging_std.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging_std.getLogger("absl").addFilter(_QuietOrbax())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # Keep TF (input only) off the accelerators.
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize()
  from codajax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  from codajax import checkpoint, input_pipeline  # pylint: disable=g-import-not-at-top
  from codajax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    result = train.train_and_evaluate(FLAGS.config, workdir, FLAGS.mode)
  except (input_pipeline.DataError, checkpoint.CheckpointError, config_lib.ConfigError,
          workdir_lib.WorkdirError, FloatingPointError) as e:
    raise SystemExit(config_lib.one_line(e)) from None  # One clear line.
  except KeyboardInterrupt:
    print(f"codajax: interrupted by Ctrl-C; the checkpoints saved before are kept in "
          f"{checkpoint.directory(workdir)}.", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  if "preempted" in result:
    p = result["preempted"]
    print(f"codajax: preempted ({p['signal']}) at step {p['step']}: checkpoint saved in "
          f"{checkpoint.directory(workdir)}; rerun the same command to resume.",
          file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  if jax.process_index() == 0:
    summary = {k: v for k, v in result.items() if k != "figures"}
    print(f"codajax {FLAGS.mode} done: {summary}")
    print(f"  checkpoints: {os.path.join(workdir, 'checkpoints')}")
    print(f"  TensorBoard: tensorboard --logdir {workdir}  (also {workdir}/metrics.jsonl)")
    for path in result["figures"]:
      print(f"  figure: {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
