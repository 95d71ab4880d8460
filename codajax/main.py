r"""Command line: python -m codajax.main --config configs/X.py[:variant] --workdir DIR.

  --mode=train    train and evaluate; an existing workdir resumes automatically
  --mode=accuracy top-1 / top-5 of the latest (or an imported) checkpoint
                  (--mode=eval, its old name, still works)
  --mode=explain  contribution-map figures of the first test images
  --mode=evaluate the interpretability evaluation (localisation, pixel removal)
                  of the checkpoint's attributions and the baselines', into
                  <workdir>/evaluation (config.evaluation; resumable; a
                  rerun with every result stored prints them in seconds,
                  before the heavy imports: codajax.evaluation_done)

Any config field can be overridden: --config.batch_size=64. Set
CODAJAX_DISTRIBUTED=1 (or --distributed) on multi-host TPU pods and SLURM GPU
clusters to call jax.distributed.initialize() with the platform's defaults.

Exit status: 0 done; 1 an error (one line naming the problem and the fix);
75 (EX_TEMPFAIL) stopped early by SIGTERM, Ctrl-C or a preemption notice, at
the mode's next safe point (training: once the current step's checkpoint is
committed; evaluate: once the result in flight is written; accuracy and explain:
before writing anything), with one line naming the mode and what was kept:
rerun the same command to resume; 130 interrupted at once, with one line: a
second Ctrl-C, or Ctrl-C while starting up (the imports). Neither leaves a
native crash or a file of a run that had not taken its first step; a save that
a second Ctrl-C cut short is removed by the next run.
"""

import os
import signal
import sys
import threading

from codajax import modes
from codajax import workdir as workdir_lib

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: try again (requeue) to resume.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention.
_checkpoints = None  # <workdir>/checkpoints, once the run starts.


def _kept() -> str:
  """What a run that exits at once keeps, for its one line."""
  if _checkpoints is None:
    return "nothing was written"
  try:
    steps = sorted(int(d) for d in os.listdir(_checkpoints) if d.isdigit())
  except OSError:
    steps = []
  if not steps:
    return "no checkpoint was saved"
  return f"the checkpoints saved before (steps {steps}) are kept in {_checkpoints}"


def _exit_at_once(signum, frame):
  """SIGTERM or Ctrl-C outside the run's own handlers (modes.stop_requests:
  while starting up, or a second Ctrl-C): one line, then exit at once, without
  the interpreter's teardown (see workdir_lib.exit_at_once)."""
  del frame
  kept = _kept()
  if signum == signal.SIGINT:
    workdir_lib.exit_at_once(EXIT_INTERRUPTED, f"codajax: interrupted by Ctrl-C; {kept}.")
  flags_ = globals().get("FLAGS")
  during = (f"during --mode {modes.ALIASES.get(flags_.mode, flags_.mode)}"
            if flags_ is not None and flags_.is_parsed()
            else "while starting")
  workdir_lib.exit_at_once(EXIT_PREEMPTED, f"codajax: preempted "
                           f"({signal.Signals(signum).name}) {during}: {kept}; rerun the "
                           "same command to resume.")


def _watch_for_a_second_ctrl_c() -> None:
  """Exits at the second Ctrl-C even while the main thread is inside XLA (a
  compilation can take minutes): Python runs its handlers only between
  bytecodes, and two signals that arrive meanwhile reach them as one. It also
  writes each signal's number to a wakeup fd, which a thread reads here."""
  read, write = os.pipe()
  os.set_blocking(write, False)
  signal.set_wakeup_fd(write)

  def watch():
    count = 0
    while True:
      count += os.read(read, 64).count(signal.SIGINT)
      if count >= 2:
        _exit_at_once(signal.SIGINT, None)

  threading.Thread(target=watch, name="codajax-ctrl-c", daemon=True).start()


# Before the heavy imports (TensorFlow, JAX: seconds), so that a signal during
# them gives one line too.
if __name__ == "__main__":  # Not when imported.
  signal.signal(signal.SIGINT, _exit_at_once)
  signal.signal(signal.SIGTERM, _exit_at_once)
  _watch_for_a_second_ctrl_c()

import logging as logging_std  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from codajax import cli
from codajax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and figures go.")
flags.DEFINE_enum("mode", "train", [*modes.MODES, *modes.ALIASES], "What to do.")
flags.DEFINE_bool("distributed", os.environ.get("CODAJAX_DISTRIBUTED", "") == "1",
                  "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(logging_std.Filter):
  """Orbax logs every file it writes at INFO; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  mode = modes.canonical(FLAGS.mode)  # An old name: a one-line notice.
  logging_std.getLogger("absl").addFilter(_QuietOrbax())
  cli.quiet_logs()
  workdir = os.path.abspath(FLAGS.workdir)
  if mode == "evaluate" and not FLAGS.distributed:  # Before TF, JAX and the restore.
    from codajax import evaluation_done  # pylint: disable=g-import-not-at-top
    done = evaluation_done.check(FLAGS.config, workdir)
    if done is not None:
      _print_done(mode, {"step": done.step, **done.metrics}, workdir, done.figures)
      return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # Keep TF (input only) off the accelerators.
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize()
  from codajax import train  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  from codajax import checkpoint, input_pipeline  # pylint: disable=g-import-not-at-top
  global _checkpoints
  _checkpoints = checkpoint.directory(workdir)
  try:
    result = train.train_and_evaluate(FLAGS.config, workdir, mode)
  except (input_pipeline.DataError, checkpoint.CheckpointError, config_lib.ConfigError,
          workdir_lib.WorkdirError, FloatingPointError) as e:
    raise SystemExit(cli.one_line(e)) from None  # One clear line.
  except KeyboardInterrupt:  # Only if a library put Python's SIGINT handler back.
    _exit_at_once(signal.SIGINT, None)
  if result.preempted is not None:
    p = result.preempted
    print(f"codajax: preempted ({p.signal}) during --mode {mode}: {p.kept}; "
          "rerun the same command to resume.", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  if jax.process_index() == 0:
    _print_done(mode, result.summary(), workdir, result.figures)


def _print_done(mode: str, summary: dict, workdir: str, figures: list) -> None:
  """The lines a finished run ends with."""
  print(f"codajax {mode} done: {summary}")
  print(f"  checkpoints: {os.path.join(workdir, 'checkpoints')}")
  print(f"  TensorBoard: tensorboard --logdir {workdir}  (also {workdir}/metrics.jsonl)")
  for path in figures:
    print(f"  figure: {path}")


if __name__ == "__main__":
  cli.run_app(main, flags_parser=cli.parse_flags)
