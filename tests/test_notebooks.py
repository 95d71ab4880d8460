"""The Colab notebooks of notebooks/ run top to bottom in their smoke mode.

Each notebook runs launch/notebook_setup.py, which reads CODAJAX_NOTEBOOK_SMOKE:
unset (Colab), it installs codajax
and uses tfds data, the authors' pretrained nets and the TPU; set to a
directory, it runs offline on the CPU with tiny settings, loading the
"pretrained" nets from file://<dir>/<name>.pt. Here those files hold
random-init parameters written by a fixture. The kernel is the venv's
ipykernel ("python3"), started in the repository root; it inherits this
process's environment, so JAX sees the 8 fake CPU devices of conftest.py.
"""

import pathlib
import time

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SMOKE_ENV = "CODAJAX_NOTEBOOK_SMOKE"
SMOKE_MODELS = ("9L-S-CoDA-SQ-1000", "9L-S-CoDA-SQ-10")

# What each notebook leaves in the smoke directory.
OUTPUTS = {
    "quickstart": ["quickstart/checkpoints", "quickstart/metrics.jsonl"],
    "pretrained": [f"cache/{name}/orbax" for name in SMOKE_MODELS],
    "evaluation": ["evaluation/evaluation/localisation.png",
                   "evaluation/evaluation/pixel_removal.png"],
    "video": ["video.gif"],
}


def test_every_notebook_is_tested():
  assert NOTEBOOKS, "notebooks/*.ipynb not found"
  assert {p.stem for p in NOTEBOOKS} == set(OUTPUTS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata.get("accelerator") == "TPU"
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
  assert not dirty, f"{path.name}: cells {dirty} carry outputs or an execution_count; clear them"
  assert nb.cells[0].cell_type == "markdown"
  # The first code cell runs the one setup (which reads the smoke switch); no cell
  # repeats what it does.
  assert "%run -i" in code[0].source and "notebook_setup.py" in code[0].source
  repeating = [i for i, c in enumerate(code) if SMOKE_ENV in c.source or "pip install" in c.source]
  assert not repeating, f"{path.name}: cells {repeating} repeat launch/notebook_setup.py"


def test_the_notebooks_share_no_setup_code():
  """Each notebook's code cells, side by side: no six-line run (the
  `duplicates` tool's threshold) is the same in two notebooks."""
  runs = {}
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    lines = [l.strip() for c in nb.cells if c.cell_type == "code"
             for l in c.source.splitlines() if l.strip() and not l.strip().startswith("#")]
    for i in range(len(lines) - 5):
      runs.setdefault(tuple(lines[i:i + 6]), set()).add(path.name)
  shared = {run: names for run, names in runs.items() if len(names) > 1}
  assert not shared, f"repeated in notebooks: {next(iter(shared.items()))}"


@pytest.mark.parametrize("spec", ["configs/digits.py", "configs/cifar10.py:9L-S-CoDA-SQ-1000"])
def test_load_config_reads_a_spec_as_the_config_flag_does(spec, tmp_path, monkeypatch):
  # The notebooks' config loader: what `--config=<spec>` of codajax.main gives,
  # locked, and found through `root` from another working directory.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from codajax import config_lib  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv)
  monkeypatch.chdir(REPO)
  fv(["notebook", f"--config={spec}"])
  monkeypatch.chdir(tmp_path)
  config = config_lib.load_config(spec, root=str(REPO))
  assert config.to_dict() == fv.config.to_dict() and config.is_locked
  with pytest.raises(config_lib.ConfigError, match="no such config file"):
    config_lib.load_config(spec)  # Not in this working directory.


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
  """A directory with <name>.pt of random-init 9L-S nets, as the authors' files."""
  # No importorskip: CI installs torch (launch/test.sh), and a notebook that
  # silently skipped there would be a notebook nobody runs.
  import torch  # pylint: disable=g-import-not-at-top
  from codajax import convert  # pylint: disable=g-import-not-at-top
  from codajax import models  # pylint: disable=g-import-not-at-top
  from codajax import pretrained  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("smoke")
  for seed, name in enumerate(SMOKE_MODELS):
    model = models.from_config(pretrained.model_config(name))
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    state = convert.to_torch_state_dict(jax.device_get(variables))
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
               directory / f"{name}.pt")
  return directory


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, smoke_dir, monkeypatch):
  import nbclient  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(path, as_version=4)
  # The kernel inherits this environment: the smoke switch, and the CPU.
  monkeypatch.setenv(SMOKE_ENV, str(smoke_dir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO)}})
  start = time.time()
  client.execute()  # Raises CellExecutionError, naming the cell, if one fails.
  print(f"{path.name}: {time.time() - start:.0f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  missing = [f for f in OUTPUTS[path.stem] if not (smoke_dir / f).exists()]
  assert not missing, f"{path.name} did not write {missing} under {smoke_dir}"
