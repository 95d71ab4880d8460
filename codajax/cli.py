"""The command lines' shared helpers: flags, one-line errors, quiet start-up.

codajax.main, prepare, convert, pretrained and reproduce run through
`run_app` (help exits 0); main and prepare parse `--config` with
`parse_flags`, which turns absl's and ml_collections' errors about the config
file, its variant or an override into one line naming the argument. Every
error a command line expects is printed as `one_line`; `install_hint` names
the command that installs an optional extra. Like codajax.config_lib, this
module imports no jax (absl only when a command line runs).
"""

import logging
import os
import re
import sys

from codajax import config_lib


def one_line(error: BaseException) -> str:
  """`codajax: <Type>: <message>`, one such line per line of the message."""
  return "\n".join(f"codajax: {type(error).__name__}: {line}"
                   for line in str(error).splitlines() or [""])


def _config_flag_arg(argv) -> str:
  for i, a in enumerate(argv[1:], 1):
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
  return ""


def _parse_error(error: BaseException, argv, path: str) -> config_lib.ConfigError:
  """A ConfigError naming the argument behind an error of absl/ml_collections."""
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError)
    error = error.args[0]
  lines = [l.strip() for l in str(error.args[0] if error.args else error).splitlines()]
  lines = [l for l in lines if l]
  if isinstance(error, (KeyError, AttributeError)):  # A misspelt override.
    key = (lines or ["?"])[0].strip("'\"")
    arg = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                and key in a.split("=", 1)[0].split(".")), "--config.<field>")
    hint = " ".join(lines[1:]) or "The fields are those of codajax/config_lib.py:base_config."
    return config_lib.ConfigError(f"{arg}: the config has no field {key!r}. {hint}")
  if "Error whilst parsing config file" in str(error):  # get_config raised.
    last = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1]) if lines else str(error)
    return config_lib.ConfigError(f"--config={path}: {last}")
  return config_lib.ConfigError(f"--config={path}: cannot load the config: {' '.join(lines)}")


HELP_FLAGS = ("-?", "--help", "--helpshort", "--helpfull")
VERBOSE_ENV = "CODAJAX_VERBOSE"


def quiet_logs() -> None:
  """Unless $CODAJAX_VERBOSE=1: silences the start-up notices of TensorFlow's
  C++ logging (CPU features, oneDNN) and JAX's search for a TPU, so that a
  run prints codajax's own lines; warnings and errors stay. Call it before
  TensorFlow is imported."""
  if os.environ.get(VERBOSE_ENV, "") == "1":
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Info and warnings of TF's C++.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def run_app(main, **kwargs) -> None:
  """absl's app.run(main, **kwargs), except that asking for help (HELP_FLAGS)
  exits 0 after printing it, as a command line should (absl exits 1)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, **kwargs)
  except SystemExit as e:
    if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
      raise SystemExit(0) from None
    raise


def install_hint(extra: str) -> str:
  """The command that installs codajax's optional `extra` (setup.py) in a clone,
  as it can be copied into a shell (codajax is not on the package index)."""
  return (f"bash launch/setup.sh {extra} (or .venv/bin/pip install -e '.[{extra}]') in "
          "your codajax clone")


def parse_flags(argv):
  """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) with one line,
  not a traceback, for a missing config file, a bad variant, a misspelt
  override or a config that fails `config_lib.validate`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  path = _config_flag_arg(argv)
  try:
    if path and not os.path.isfile(path.split(":", 1)[0]):
      raise config_lib.ConfigError(
          f"--config={path}: no such config file {path.split(':', 1)[0]!r} (relative to "
          f"{os.getcwd()}); give configs/<name>.py[:variant].")
    try:
      rest = flags.FLAGS(argv)
      config_lib.validate(flags.FLAGS.config)
    except flags.Error as e:
      if "Error whilst parsing config file" not in str(e):
        raise SystemExit(one_line(e).replace("\n", " ")) from None
      raise _parse_error(e, argv, path) from None
    except (KeyError, AttributeError, OSError) as e:
      raise _parse_error(e, argv, path) from None
  except config_lib.ConfigError as e:
    raise SystemExit(one_line(e)) from None
  return rest
