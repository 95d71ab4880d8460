"""The setup of every notebook in notebooks/, written once.

Each notebook's first code cell sets REPO_URL, REPO_REF and EXTRAS, clones
REPO_URL in Colab, and runs this file with `%run -i`, so that it reads those
names and sets SMOKE_DIR, SMOKE and REPO (the repository root, which holds
configs/) in the notebook:

- The tests' smoke run (CODAJAX_NOTEBOOK_SMOKE set to a directory, by
  tests/test_notebooks.py): the repository the kernel started in, all
  installed; offline, CPU, tiny settings.
- A clone: the notebook opened from notebooks/ of a checkout uses that
  checkout. Install it first (`bash launch/setup.sh torch,video`) and pick
  its .venv as the kernel; nothing is installed here.
- Colab: the first cell cloned REPO_URL at REPO_REF into /content/codajax.
  This installs codajax from it with EXTRAS and JAX for TPU, pinned by
  constraints.txt as launch/setup.sh pins them. One exception: where the
  runtime already has TensorFlow (Colab's GPU and CPU runtimes do), it is
  kept and codajax's pinned tensorflow-cpu is not installed over it: the two
  distributions share the `tensorflow` package folder, and writing one over
  the other breaks the runtime's TensorFlow. codajax uses TensorFlow only for
  tf.data and TensorBoard files, which any TensorFlow >= 2.16 serves. TPU
  runtimes have no TensorFlow, so they get the pinned tensorflow-cpu.
"""

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

COLAB_REPO = "/content/codajax"
SMOKE_DIR = os.environ.get("CODAJAX_NOTEBOOK_SMOKE") or None
SMOKE = SMOKE_DIR is not None


def _root() -> str:
  """The repository this file belongs to."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pip(*args: str) -> None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def _install_in_colab(repo: str, extras: str) -> None:
  """codajax[extras] from `repo` and jax[tpu], pinned by its constraints.txt."""
  constraints = os.path.join(repo, "constraints.txt")
  if importlib.util.find_spec("tensorflow") is None:
    _pip("-c", constraints, "-e", f"{repo}{extras}", "jax[tpu]")
    return
  with open(constraints) as f:  # Colab's TensorFlow stays (see the docstring).
    pins = [line for line in f if not re.match(r"(tensorflow[-_]cpu|tensorboard)\b", line)]
  kept = os.path.join(repo, ".constraints-colab.txt")
  with open(kept, "w") as f:
    f.writelines(pins)
  _pip("--no-deps", "-e", f"{repo}{extras}")
  needs = [r.split(";")[0] for r in importlib.metadata.requires("codajax") or ()
           if not r.startswith(("tensorflow-cpu", "tensorflow_cpu"))
           and ("extra ==" not in r or any(f'"{e}"' in r for e in extras.strip("[]").split(",")))]
  _pip("-c", kept, *needs, "jax[tpu]")


if SMOKE or "google.colab" not in sys.modules:
  REPO = _root()  # The smoke run, or a clone.
else:
  REPO = COLAB_REPO
  _install_in_colab(REPO, globals().get("EXTRAS", ""))
  print("codajax installed; if pip asked to restart the runtime, restart and run all again.")
