"""Tests of the command line (codajax.main, codajax.prepare): a bad config file,
variant, override or field value gives one line, `codajax: ConfigError: ...`,
on stderr, a non-zero exit status, no traceback, and leaves no workdir behind.

The config is checked while the flags are parsed, before TF or JAX is imported,
so each of these runs takes about a second. So do the runs that get a signal
while TF is imported: one line, no traceback.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(tmp_path, *args, config="configs/digits.py:tiny", module="codajax.main"):
  workdir = tmp_path / "w"
  argv = [sys.executable, "-m", module]
  argv += [f"--config={config}"] if config else []
  argv += [f"--workdir={workdir}"] if module == "codajax.main" else []
  env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
  out = subprocess.run(argv + list(args), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0, out.stdout[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert not workdir.exists()
  return out.stderr.strip().splitlines()


# (arguments, the one line printed). These are the cases of issue 9.
CASES = [
    (["--config.batch_size=0"],
     "codajax: ConfigError: config.batch_size=0: must be an integer >= 1."),
    (["--config.batch_size=-32"],
     "codajax: ConfigError: config.batch_size=-32: must be an integer >= 1."),
    (["--config.seed=-1"],
     "codajax: ConfigError: config.seed=-1: must be an integer in [0, 2**32)."),
    (["--config.model.dtype=bfloat61"],
     "codajax: ConfigError: config.model.dtype='bfloat61': use one of "
     "('float32', 'bfloat16')."),
    (["--config.model.ranks=abc"],
     "codajax: ConfigError: config.model.ranks=('abc',): must be a sequence of integers, "
     "one per layer, e.g. --config.model.ranks='(1, 2, 3)'."),
    (["--config.num_epochs=-3", "--config.num_steps=-1"],
     "codajax: ConfigError: config.num_epochs=-3.0: must be > 0 (or set "
     "config.num_steps > 0, which overrides it)."),
    (["--config.log_every_steps=0"],
     "codajax: ConfigError: config.log_every_steps=0: must be an integer >= 1."),
    (["--config.num_explain=0"],
     "codajax: ConfigError: config.num_explain=0: must be an integer >= 1 (the test images "
     "explained); for no figures set config.explain_at_end=False."),
    (["--config.keep_checkpoints=0"],
     "codajax: ConfigError: config.keep_checkpoints=0: must be an integer >= 1."),
    (["--config.modle.ranks=(1,2,3)"],
     "codajax: ConfigError: --config.modle.ranks: the config has no field 'modle'. "
     "Did you mean \"model\" instead of \"modle\"?"),
    (["--config.batchsize=8"],
     "codajax: ConfigError: --config.batchsize: the config has no field 'batchsize'. "
     "Did you mean \"batch_size\" instead of \"batchsize\"?"),
]


@pytest.mark.parametrize("args, line", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_override_gives_one_line(tmp_path, args, line):
  assert run_cli(tmp_path, *args) == [line]


def test_every_problem_gets_its_line(tmp_path):
  lines = run_cli(tmp_path, "--config.batch_size=0", "--config.seed=-1")
  assert lines == ["codajax: ConfigError: config.batch_size=0: must be an integer >= 1.",
                   "codajax: ConfigError: config.seed=-1: must be an integer in [0, 2**32)."]


@pytest.mark.parametrize("config, line", [
    ("configs/nonexistent.py", "codajax: ConfigError: --config=configs/nonexistent.py: "
     f"no such config file 'configs/nonexistent.py' (relative to {ROOT}); give "
     "configs/<name>.py[:variant]."),
    ("configs/digits.py:typo", "codajax: ConfigError: --config=configs/digits.py:typo: "
     "Unknown digits variant 'typo'; choose one of ['classes=<labels, e.g. 0-4>'] or none."),
    ("configs/image_folder.py:big,tiny", "codajax: ConfigError: --config=configs/"
     "image_folder.py:big,tiny: Unknown image_folder variant 'big': configs/image_folder.py "
     "takes no variant name, only ',tiny'."),
    ("configs/cifar10.py:9L-S", "codajax: ConfigError: --config=configs/cifar10.py:9L-S: "
     "Unknown cifar10 variant '9L-S'; choose one of"),
])
def test_a_bad_config_file_or_variant_gives_one_line(tmp_path, config, line):
  lines = run_cli(tmp_path, config=config)
  assert len(lines) == 1 and lines[0].startswith(line), lines


def test_a_missing_config_flag_gives_one_line(tmp_path):
  assert run_cli(tmp_path, config=None) == [
      "codajax: IllegalFlagValueError: flag --config=None: Flag --config must have a "
      "value other than None."]


def test_prepare_gives_the_same_lines(tmp_path):
  assert run_cli(tmp_path, config="configs/nonexistent.py", module="codajax.prepare") == [
      "codajax: ConfigError: --config=configs/nonexistent.py: no such config file "
      f"'configs/nonexistent.py' (relative to {ROOT}); give configs/<name>.py[:variant]."]
  assert run_cli(tmp_path, "--config.modle.ranks=(1,)", module="codajax.prepare") == [
      "codajax: ConfigError: --config.modle.ranks: the config has no field 'modle'. "
      "Did you mean \"model\" instead of \"modle\"?"]


def loads_tensorflow(pid):
  with open(f"/proc/{pid}/maps") as f:
    return "tensorflow" in f.read()


@pytest.mark.parametrize("module, sig, status, line", [
    ("codajax.main", signal.SIGINT, 130, "codajax: interrupted by Ctrl-C; nothing was written."),
    ("codajax.main", signal.SIGTERM, 75, "codajax: preempted (SIGTERM) during --mode train: "
     "nothing was written; rerun the same command to resume."),
    ("codajax.prepare", signal.SIGINT, 130, "codajax: prepare interrupted by Ctrl-C; rerun "
     "the same command to prepare the data."),
], ids=["main-SIGINT", "main-SIGTERM", "prepare-SIGINT"])
def test_a_signal_during_the_imports_is_one_line(tmp_path, module, sig, status, line):
  """Issue 17, item 8: Ctrl-C while TensorFlow and JAX were imported gave a
  40-line KeyboardInterrupt traceback (SIGTERM: status 143 and no word)."""
  workdir = tmp_path / "w"
  argv = [sys.executable, "-m", module, "--config=configs/digits.py:tiny"]
  argv += [f"--workdir={workdir}"] if module == "codajax.main" else []
  env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 60
  while not loads_tensorflow(proc.pid):  # Seconds of imports are left then.
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.02)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == status, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert err.strip().splitlines()[-1] == line
  assert not workdir.exists()


@pytest.mark.parametrize("module", ["codajax.main", "codajax.prepare", "codajax.convert",
                                    "codajax.pretrained", "codajax.reproduce"])
def test_help_exits_0(module):
  env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "--help" in out.stdout, out.stdout[-2000:]  # absl: "Try --helpfull ..."


def test_the_mode_flag_takes_the_modes_and_the_old_name(tmp_path):
  """Issue 19, item 5: --mode's choices come from codajax.modes, the one list
  that codajax.train runs; a name outside it is one line before any import."""
  from codajax import modes  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", "codajax.main", "--helpfull"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
  assert f"<{'|'.join([*modes.MODES, *modes.ALIASES])}>" in out.stdout, out.stdout[-3000:]
  assert "accuracy" in modes.MODES and modes.ALIASES == {"eval": "accuracy"}
  lines = run_cli(tmp_path, "--mode=predict")
  assert len(lines) == 1 and lines[0].startswith(
      "codajax: IllegalFlagValueError: flag --mode=predict: value should be one of"), lines


@pytest.mark.parametrize("extra", ["torch", "video", "lime"])
def test_install_hints_work_from_a_clone(extra):
  """The hints name setup.py's extras and commands that run in a clone: pip
  resolves the printed install (a dry run: what the tests installed suffices)."""
  from codajax import cli  # pylint: disable=g-import-not-at-top
  hint = cli.install_hint(extra)
  assert hint.startswith(f"bash launch/setup.sh {extra} ")
  assert f".venv/bin/pip install -e '.[{extra}]'" in hint
  with open(os.path.join(ROOT, "setup.py")) as f:
    assert f'"{extra}": [' in f.read()
  out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
                        "--no-build-isolation", "-c", "constraints.txt", "-e", f".[{extra}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_run_prints_no_start_up_noise_unless_verbose(tmp_path, verbose):
  """TF's C++ notices and JAX's missing-TPU line only with CODAJAX_VERBOSE=1."""
  env = dict(os.environ, XLA_FLAGS="", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  env["CODAJAX_VERBOSE"] = "1" if verbose else ""
  out = subprocess.run([sys.executable, "-m", "codajax.main", "--config=configs/digits.py:tiny",
                        f"--workdir={tmp_path / 'w'}", "--config.num_steps=1",
                        "--config.explain_at_end=False"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  noise = [l for l in out.stderr.splitlines()
           if "cpu_feature_guard" in l or "libtpu" in l or "oneDNN" in l]
  assert bool(noise) == verbose, noise
  assert "codajax train done:" in out.stdout
