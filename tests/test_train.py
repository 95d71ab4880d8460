"""Tests of the trainer (codajax.train); the step itself is tests/test_steps.py.

End-to-end runs use the configs' `:tiny` variants: CIFAR-10 under
`tfds.testing.mock_data`, and scikit-learn's digits (no download). The
equivalence tests (sharded vs one device, several hosts vs one, resumed vs
uninterrupted) compare parameters, so each can
fail on a wrong data order, RNG, reduction or optimizer count.
"""

import asyncio
import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.path import atomicity
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from codajax import checkpoint
from codajax import config_lib
from codajax import input_pipeline
from codajax import models
from codajax import modes
from codajax import train
from codajax import workdir as workdir_lib
from configs import cifar10 as cifar10_config
from configs import digits as digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_TEST = 359  # Test examples of the digits config (a fixed 20% split).

# Every digits run here shares these settings, so its XLA programs (init,
# train step, eval step) are the same and compile once per session through
# the persistent compilation cache below. The lr halves every ~2 steps, so a
# wrong optimizer step count after a resume would change the parameters; the
# random crops and flips depend on the step, so would a wrong augmentation seed.
FAST_DIGITS = dict(batch_size=32, eval_batch_size=360, augment="crop_flip",
                   learning_rate=2e-3, lr_schedule="step", lr_decay_every_epochs=0.05, lr_decay_factor=2.0,
                   log_every_steps=1, eval_every_steps=1000, checkpoint_every_steps=1000,
                   explain_at_end=False, num_explain=4)


@pytest.fixture
def xla_cache():
  """The run's shared compilation cache (conftest.py), for subprocesses."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR", "")


# ------------------------------------------------------------------ helpers


def digits(**overrides):
  """digits:tiny with FAST_DIGITS (no figures unless asked for)."""
  c = digits_config.get_config("tiny")
  c.update(FAST_DIGITS)
  c.update(overrides)
  return c


def records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tensorboard_tags(workdir):
  """The scalar tags in the workdir's TensorBoard event files."""
  tags = set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      tags.update(v.tag for v in event.summary.value)
  return tags


def train_steps(workdir):
  return [r["step"] for r in records(workdir) if "train/loss" in r]


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(checkpoint.directory(workdir)) if d.isdigit())


def restore_params(workdir, config):
  """(step, params as numpy) of the latest checkpoint, through checkpoint.restore."""
  info = input_pipeline.get_info(config)
  model = models.from_config(
      config_lib.resolve(config, info.num_classes, jax.device_count()).model)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *info.image_shape)))["params"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes)
  mngr = checkpoint.manager(workdir, asynchronous=False)
  try:
    step, params, _, _ = checkpoint.restore(mngr, abstract)
  finally:
    mngr.close()
  return step, jax.device_get(params)


@contextlib.contextmanager
def mock_tfds(name, num_examples, metadata_dir):
  """tfds.testing.mock_data whose split metadata matches the mocked examples.

  Without metadata files mock_data leaves `info.splits` empty (and the builder
  unprepared), so the trainer could not size epochs and evaluation; with the
  real metadata the sizes would not match the mock. Writing the builder's own
  info with splits of `num_examples` keeps the input pipeline unchanged.
  """
  with tfds.testing.mock_data(num_examples=num_examples,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder(name)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
        for split in ("train", "test")]))
    path = os.path.join(metadata_dir, name, str(builder.version))
    os.makedirs(path)
    builder.info.write_to_directory(path)
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(metadata_dir),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield


def preempt_at(monkeypatch, step):
  """Sends this process SIGTERM while the batch for `step` is fetched."""
  original = input_pipeline.train_batches

  def batches(config, info, start_step=0):
    for s, batch in enumerate(original(config, info, start_step), start_step + 1):
      if s == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(input_pipeline, "train_batches", batches)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def subprocess_env(num_devices, cache_dir):
  """The test process's JAX settings (conftest.py), with `num_devices` devices."""
  env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="",
             JAX_DEFAULT_MATMUL_PRECISION="highest")
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={num_devices} "
                      "--xla_backend_optimization_level=0")
  return env


# ----------------------------------------------------------- end to end


def test_cifar10_mock_trains_resumes_and_evaluates(tmp_path):
  """cifar10:tiny on 20 mocked examples: logs, checkpoint, resume, --mode accuracy.

  20 test examples in eval batches of 16: the second batch is 12/16 padding.
  """
  workdir = str(tmp_path / "run")
  config = cifar10_config.get_config("9L-S-CoDA-SQ-1000,tiny")
  # 2 x 8 accumulation: micro-batches of 8 on the 8 devices.
  config.update(batch_size=16, grad_accum_steps=2, eval_batch_size=16, num_steps=4,
                log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=4)
  with mock_tfds("cifar10", 20, tmp_path / "metadata"):
    first = train.train_and_evaluate(config, workdir)
    assert first.metrics["eval/count"] == 20
    assert os.path.exists(os.path.join(workdir, "config.json"))
    with open(os.path.join(workdir, "config.json")) as f:
      saved = json.load(f)
    assert saved["model"]["out_channels"] == list(config.model.out_channels)
    assert saved["num_classes"] == 10 and saved["num_steps"] == 4
    assert {"train/loss", "train/lr", "eval/top1", "eval/top5"} <= tensorboard_tags(workdir)
    assert checkpoint_steps(workdir) == [4]
    assert train_steps(workdir) == [2, 4]
    evals = [r for r in records(workdir) if "eval/top1" in r]
    assert [r["step"] for r in evals] == [4] and evals[0]["eval/count"] == 20
    assert all(np.isfinite(r["train/loss"]) for r in records(workdir) if "train/loss" in r)

    config.num_steps = 8  # The same workdir resumes from step 4.
    resumed = train.train_and_evaluate(config, workdir)
    assert train_steps(workdir) == [2, 4, 6, 8]
    assert checkpoint_steps(workdir) == [4, 8]

    evaluated = train.train_and_evaluate(config, workdir, mode="accuracy")
  assert evaluated.step == 8 and evaluated.metrics["eval/count"] == 20
  assert 0.0 <= evaluated.metrics["eval/top1"] <= evaluated.metrics["eval/top5"] <= 1.0
  # The restored parameters are those evaluated at the end of training.
  for key in ("eval/top1", "eval/top5", "eval/loss"):
    np.testing.assert_allclose(evaluated.metrics[key], resumed.metrics[key], rtol=1e-6)
  assert records(workdir)[-1]["step"] == 8 and "eval/top5" in records(workdir)[-1]


def test_digits_trains_writes_figures_and_guards_its_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  config = digits(num_steps=4, eval_every_steps=2, checkpoint_every_steps=2,
                  explain_at_end=True)
  progress = []  # The notebooks' progress bar hook.
  result = train.train_and_evaluate(config, workdir,
                                    on_step=lambda *a: progress.append(a))
  assert progress == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
  assert result.metrics["eval/count"] == DIGITS_TEST and result.step is None
  assert checkpoint_steps(workdir) == [2, 4]
  assert [r["step"] for r in records(workdir) if "eval/top1" in r] == [2, 4]
  figures = result.figures
  assert sorted(map(os.path.basename, figures)) == ["contribution_maps.png", "linear_maps.png"]
  for path in figures:
    assert os.path.dirname(path) == os.path.join(workdir, "explanations")
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000

  # --mode=explain redraws the figures from the latest checkpoint.
  explained = train.train_and_evaluate(config, workdir, mode="explain")
  assert explained.metrics == {} and explained.step == 4 and explained.preempted is None
  assert sorted(map(os.path.basename, explained.figures)) == sorted(
      map(os.path.basename, figures))

  # A checkpoint of another architecture is refused, naming what differs.
  other = digits()
  rank = other.model.ranks[0]
  other.model.ranks = (rank + 1,) + tuple(other.model.ranks[1:])
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.train_and_evaluate(other, workdir, mode="accuracy")
  assert "does not match the model (2 parameters differ)" in str(e.value)
  assert f"['layer_0']['A']: checkpoint ({rank}, " in str(e.value)
  assert f"vs model ({rank + 1}, " in str(e.value)
  # Training with it is refused too, and config.json still holds the config
  # of the checkpoints, which the error tells the user to look at.
  with open(os.path.join(workdir, "config.json")) as f:
    saved = f.read()
  with pytest.raises(checkpoint.CheckpointError, match="does not match the model"):
    train.train_and_evaluate(other, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == saved


def test_unprepared_tfds_data_fails_fast_naming_the_prepare_command(tmp_path):
  config = cifar10_config.get_config("9L-S-CoDA-SQ-1000")
  config.data_dir = str(tmp_path / "tfds")
  with pytest.raises(input_pipeline.DataError,
                     match=r"'cifar10' is not prepared.*python -m codajax.prepare"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_pretrained_workdir_is_evaluated_and_explained_with_its_config(tmp_path):
  """`python -m codajax.pretrained NAME --workdir W` makes a workdir that
  --mode accuracy and --mode explain take with the config MODELS[NAME].config."""
  import torch  # pylint: disable=g-import-not-at-top  # CI installs it (launch/test.sh).
  from codajax import convert, pretrained  # pylint: disable=g-import-not-at-top
  name = "9L-S-CoDA-SQ-1000"
  assert pretrained.MODELS[name].config == f"configs/cifar10.py:{name}"
  config = cifar10_config.get_config(name)  # Not ",tiny": that swaps the net.
  model = models.from_config(config.model)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  path = tmp_path / f"{name}.pt"
  torch.save({k: torch.from_numpy(v) for k, v in
              convert.to_torch_state_dict(jax.device_get(variables)).items()}, path)
  workdir = pretrained.to_workdir(name, str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                                  url=path.as_uri())
  config.update(eval_batch_size=16, num_steps=1)
  with mock_tfds("cifar10", 20, tmp_path / "metadata"):
    evaluated = train.train_and_evaluate(config, workdir, mode="accuracy")
    explained = train.train_and_evaluate(config, workdir, mode="explain")
  assert evaluated.step == 0 and evaluated.metrics["eval/count"] == 20
  assert sorted(map(os.path.basename, explained.figures)) == [
      "contribution_maps.png", "linear_maps.png"]


def test_imported_weights_are_evaluated_and_fine_tuned(tmp_path):
  """A checkpoint written like codajax.convert's (step 0, no optimizer state)."""
  workdir = str(tmp_path)
  config = digits(num_steps=1)
  model = models.from_config(config.model)
  params = model.init(jax.random.key(7), jnp.zeros((1, 16, 16, 1)))["params"]
  checkpoint.save_imported(workdir, params, {"source": "test", "model": config.model.to_dict()})
  evaluated = train.train_and_evaluate(config, workdir, mode="accuracy")
  assert evaluated.step == 0 and evaluated.metrics["eval/count"] == DIGITS_TEST
  assert records(workdir)[-1]["step"] == 0
  trained = train.train_and_evaluate(config, workdir)  # Fine-tunes from step 0.
  assert train_steps(workdir) == [1] and checkpoint_steps(workdir) == [0, 1]
  assert trained.metrics["eval/loss"] != evaluated.metrics["eval/loss"]


def test_a_bad_mode_is_rejected_before_any_work(tmp_path, monkeypatch):
  def no_data(config):
    raise AssertionError("the data was read")
  monkeypatch.setattr(input_pipeline, "get_info", no_data)
  with pytest.raises(ValueError, match="mode must be one of .*got 'predict'"):
    train.train_and_evaluate(digits(), str(tmp_path / "run"), mode="predict")
  assert not os.path.exists(tmp_path / "run")


def test_accuracy_without_a_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError,
                     match="--mode=accuracy needs a checkpoint.*train first.*codajax.convert"):
    train.train_and_evaluate(digits(), str(tmp_path), mode="accuracy")


def test_the_old_mode_eval_is_accuracy_with_a_one_line_notice(tmp_path, capsys):
  """Issue 19, item 1: --mode eval became --mode accuracy; the old name works."""
  with pytest.raises(checkpoint.CheckpointError, match="--mode=accuracy needs a checkpoint"):
    train.train_and_evaluate(digits(), str(tmp_path), mode="eval")
  assert capsys.readouterr().err == "codajax: --mode eval is now --mode accuracy.\n"
  assert set(train.MODES) == set(modes.MODES) and train.MODES["accuracy"] is train.accuracy_mode


# ------------------------------------------------------------ equivalences


def test_resume_reaches_the_uninterrupted_parameters(tmp_path, monkeypatch):
  """6 steps in one go == 2 steps (num_steps=2), then to 6 with a SIGTERM at 4.

  Same data order (per-step batches), same RNG (fold_in of the step), same
  optimizer count (the lr halves every ~2 steps).
  """
  straight, pieces = str(tmp_path / "straight"), str(tmp_path / "pieces")
  train.train_and_evaluate(digits(num_steps=6), straight)

  train.train_and_evaluate(digits(num_steps=2), pieces)
  assert checkpoint_steps(pieces) == [2]
  preempt_at(monkeypatch, 4)
  interrupted = train.train_and_evaluate(digits(num_steps=6), pieces)
  monkeypatch.undo()
  assert "eval/top1" not in interrupted.metrics  # It stopped early, without evaluating.
  assert interrupted.preempted.step == 4
  assert checkpoint_steps(pieces) == [2, 4]
  assert train_steps(pieces) == [1, 2, 3, 4]
  train.train_and_evaluate(digits(num_steps=6), pieces)
  assert train_steps(pieces) == train_steps(straight) == list(range(1, 7))

  def by_step(workdir, key):
    return [r[key] for r in records(workdir) if key in r]
  np.testing.assert_allclose(by_step(pieces, "train/loss"), by_step(straight, "train/loss"),
                             rtol=1e-6)
  np.testing.assert_allclose(by_step(pieces, "train/lr"), by_step(straight, "train/lr"),
                             rtol=1e-7)
  step_a, params_a = restore_params(straight, digits())
  step_b, params_b = restore_params(pieces, digits())
  assert step_a == step_b == 6
  chex.assert_trees_all_close(params_b, params_a, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- multi-host


_WORKER = textwrap.dedent("""
    import itertools, json, sys
    import jax
    num_devices, port, process_id, num_processes, workdir, emulate, overrides = sys.argv[1:]
    jax.config.update("jax_num_cpu_devices", int(num_devices))
    if int(num_processes) > 1:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                 num_processes=int(num_processes),
                                 process_id=int(process_id))
    import numpy as np
    from codajax import input_pipeline, train
    from configs import digits
    config = digits.get_config("tiny")
    config.update(json.loads(overrides))
    if int(emulate) > 1:
      # One process fed the global batches that `emulate` hosts build together:
      # host i's slice of every batch, concatenated in process order.
      host, batches = input_pipeline._host, input_pipeline.train_batches
      def global_batches(config, info, start_step=0):
        per_host = []
        for i in range(int(emulate)):
          input_pipeline._host = lambda i=i: (i, int(emulate))
          per_host.append(list(itertools.islice(batches(config, info, start_step),
                                                config.num_steps - start_step)))
        input_pipeline._host = host
        for parts in zip(*per_host):
          yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      input_pipeline.train_batches = global_batches
    result = train.train_and_evaluate(config, workdir)
    print("RESULT", json.dumps({"process": jax.process_index(),
                                "count": jax.process_count(),
                                "devices": jax.device_count(), **result.metrics}))
    if int(num_processes) > 1:
      jax.distributed.shutdown()
""")


def test_two_hosts_match_one_host(tmp_path, xla_cache):
  """2 processes x 2 CPU devices (jax.distributed, gloo) == 1 process x 4 devices.

  Each host feeds its own slice of the data (per-host shards,
  `make_array_from_process_local_data`) and both write one shared workdir;
  the single-process run is fed the same global batches.
  """
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  port = free_port()
  overrides = json.dumps(dict(FAST_DIGITS, num_steps=3, eval_every_steps=3,
                              checkpoint_every_steps=3))
  multi, single = str(tmp_path / "two_hosts"), str(tmp_path / "one_host")
  runs = [(2, port, 0, 2, multi, 0), (2, port, 1, 2, multi, 0), (4, 0, 0, 1, single, 2)]
  procs = [subprocess.Popen([sys.executable, str(script), *map(str, run), overrides],
                            env=subprocess_env(run[0], xla_cache), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for run in runs]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("multi-host run timed out after 300 s:\n" +
                "\n".join(p.communicate()[0][-2000:] for p in procs))
  for p, out in zip(procs, outputs):
    if p.returncode and any(s in out for s in (
        "collectives are not supported", "Gloo is not available",
        "jax_cpu_collectives_implementation")):
      pytest.skip(f"this platform cannot run multi-process CPU collectives: {out[-500:]}")
    assert p.returncode == 0, out[-5000:]
  results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]
  assert [(r["process"], r["count"], r["devices"]) for r in results] == [
      (0, 2, 4), (1, 2, 4), (0, 1, 4)]
  for r in results:
    assert r["eval/count"] == DIGITS_TEST  # Padded per host, each example once.
    np.testing.assert_allclose(r["eval/loss"], results[2]["eval/loss"], rtol=1e-5)
  # Only process 0 writes metrics: each step is logged once.
  assert train_steps(multi) == train_steps(single) == [1, 2, 3]

  step_m, params_m = restore_params(multi, digits())
  step_s, params_s = restore_params(single, digits())
  assert step_m == step_s == 3
  chex.assert_trees_all_close(params_m, params_s, rtol=1e-5, atol=FAST_DIGITS["learning_rate"] / 100)


# -------------------------------------------------------------- preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_exits_75_with_one_line_and_the_rerun_resumes(
    tmp_path, xla_cache, sig):
  """`python -m codajax.main`, SIGTERM or Ctrl-C after the first logged step:
  a checkpoint at the step it stopped, exit status 75 and one line (it was 0
  with "train done" and stale metrics), and the same command continues there."""
  workdir = str(tmp_path / "run")
  flags = [f"--config.{k}={v}" for k, v in FAST_DIGITS.items()]
  flags.append("--config.num_steps=100000")
  proc = subprocess.Popen(
      [sys.executable, "-m", "codajax.main", f"--config={ROOT}/configs/digits.py:tiny",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=subprocess_env(8, xla_cache),
      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics)):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail("the run never logged a step:\n" + proc.communicate()[1][-5000:])
    time.sleep(0.1)
  proc.send_signal(sig)
  try:
    out, err = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the signal did not stop the run:\n" + proc.communicate()[1][-5000:])
  stopped = train_steps(workdir)[-1]
  assert proc.returncode == 75, err[-5000:]
  assert "train done" not in out
  assert err.splitlines()[-1] == (
      f"codajax: preempted ({sig.name}) during --mode train: checkpoint of step {stopped} "
      f"saved in {checkpoint.directory(workdir)}; rerun the same command to resume.")
  assert stopped < 100000
  assert checkpoint_steps(workdir) == [stopped]
  assert not os.path.exists(os.path.join(workdir, ".codajax.lock"))  # Released.

  # The same command again (here in-process, ending one step later) resumes.
  result = train.train_and_evaluate(digits(num_steps=stopped + 1), workdir)
  assert train_steps(workdir) == list(range(1, stopped + 2))
  assert checkpoint_steps(workdir) == [stopped, stopped + 1]
  assert result.metrics["eval/count"] == DIGITS_TEST


def cli(workdir, *flags, stderr, mode="train", cache_dir):
  """`python -m codajax.main` on digits:tiny with FAST_DIGITS, started."""
  flags = [f"--config.{k}={v}" for k, v in FAST_DIGITS.items()] + list(flags)
  return subprocess.Popen(
      [sys.executable, "-m", "codajax.main", f"--config={ROOT}/configs/digits.py:tiny",
       f"--workdir={workdir}", f"--mode={mode}", *flags], cwd=ROOT,
      env=subprocess_env(8, cache_dir), text=True, stdout=subprocess.PIPE, stderr=stderr)


def wait_for(proc, ready, what):
  deadline = time.time() + 240
  while not ready():
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(f"{what} never happened (status {proc.wait()})")
    time.sleep(0.1)


def finish(proc):
  """(stdout, stderr) of a run that a signal should end soon."""
  try:
    return proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the signal did not stop the run:\n" + str(proc.communicate()[1])[-5000:])


def test_a_second_ctrl_c_exits_130_at_once_with_one_line(tmp_path, xla_cache):
  """Issue 17, item 5: two Ctrl-C during the setup or compilation ended with
  `Fatal Python error: Segmentation fault` (the interpreter's teardown while
  XLA and TensorFlow threads ran). Now: status 130, one line, nothing left."""
  workdir, log = tmp_path / "run", tmp_path / "stderr"
  with open(log, "w") as stderr:
    proc = cli(workdir, "--config.num_steps=100000", stderr=stderr, cache_dir=xla_cache)
    wait_for(proc, lambda: "JAX process" in log.read_text(), "the setup")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    finish(proc)
  err = log.read_text()
  assert proc.returncode == 130, err[-3000:]
  assert "Fatal Python error" not in err and "Traceback" not in err, err[-3000:]
  assert re.fullmatch(r"codajax: interrupted by Ctrl-C; (no checkpoint was saved|nothing "
                      r"was written)\.", err.splitlines()[-1]), err[-3000:]
  assert not workdir.exists()  # Nor its lock file: it had not taken a step.


def test_saved_is_said_once_committed_and_a_save_cut_short_is_removed(
    tmp_path, monkeypatch, caplog):
  """Issue 17, item 5: "checkpoint saved" was logged while orbax still wrote the
  step, and a second Ctrl-C then left <step>.orbax-checkpoint-tmp for good."""
  commit = atomicity.AtomicRenameTemporaryPath.finalize

  async def slow_commit(self):  # The rename of a save's temporary folder.
    await asyncio.sleep(1.0)
    return await commit(self)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_commit)
  workdir, committed = str(tmp_path), []

  class WhenLogged(logging.Handler):
    def emit(self, record):
      if "Preempted" in record.getMessage():
        committed.append(checkpoint_steps(workdir))
  watch = WhenLogged()
  logging.getLogger().addHandler(watch)
  preempt_at(monkeypatch, 2)
  try:
    result = train.train_and_evaluate(digits(num_steps=4), workdir)
  finally:
    logging.getLogger().removeHandler(watch)
  assert committed == [[2]]
  assert result.preempted.kept == (
      f"checkpoint of step 2 saved in {checkpoint.directory(workdir)}")
  monkeypatch.undo()

  unfinished = os.path.join(checkpoint.directory(workdir), "3.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(unfinished, "params"))  # As a second Ctrl-C leaves it.
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(digits(num_steps=3), workdir)
  assert sorted(os.listdir(checkpoint.directory(workdir))) == ["2", "3"]
  assert [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()] == [
      f"Removed 1 unfinished checkpoint(s) of an interrupted run: {unfinished}"]


def test_every_mode_stops_at_its_next_safe_point(tmp_path):
  """Issue 17, item 6: only the training loop heeded SIGTERM or Ctrl-C. Each
  mode, asked to stop (`stops`, as `_stop_requests` fills it) before its work,
  returns at once, says what it kept, and writes nothing."""
  workdir = str(tmp_path / "run")
  config = digits(num_steps=2)
  config.evaluation.update(metrics=("pixel_removal",), methods=("ours",), num_images=8)
  fresh = train.train_mode(train.setup(config, workdir, training=True), ["SIGTERM"])
  assert fresh == train.Result(preempted=train.Preempted("SIGTERM", "nothing was written"))
  assert not os.path.exists(workdir)  # No step was compiled nor run.

  train.train_and_evaluate(config, workdir)
  files, lines = sorted(os.listdir(workdir)), records(workdir)
  config.explain_at_end = True
  kept = {"train": f"the checkpoint of step 2 is kept in {checkpoint.directory(workdir)}",
          "accuracy": "no metrics were written", "explain": "no figure was written",
          "evaluate": f"no result was finished in {workdir}/evaluation"}
  for mode, what in kept.items():
    needs = dataclasses.asdict(modes.MODES[mode])
    result = train.MODES[mode](train.setup(config, workdir, **needs), ["SIGINT"])
    assert result.preempted == train.Preempted("SIGINT", what)
    assert result.figures == [] and result.metrics == {}
  assert sorted(os.listdir(workdir)) == files  # No figure, no evaluation/.
  assert records(workdir) == lines


@pytest.mark.parametrize("mode", ["evaluate", "train"])
def test_sigterm_stops_evaluate_and_a_finished_run_with_exit_75_and_one_line(
    tmp_path, xla_cache, mode):
  """Issue 17, item 6: --mode evaluate died with status 143 and printed nothing;
  the rerun of a finished workdir (which only re-evaluates) ignored SIGTERM.
  Here it comes during the setup (the workdir is locked): the run stops
  before its first piece of work. (After a result: test_evaluation.)"""
  workdir = tmp_path / "run"
  train.train_and_evaluate(digits(num_steps=2), str(workdir))
  proc = cli(workdir, "--config.num_steps=2", "--config.evaluation.methods=('ours',)",
             mode=mode, stderr=subprocess.PIPE, cache_dir=xla_cache)
  wait_for(proc, lambda: os.path.exists(workdir / ".codajax.lock"), "the setup")
  proc.send_signal(signal.SIGTERM)
  out, err = finish(proc)
  assert proc.returncode == 75, err[-3000:]
  assert "done" not in out
  kept = {"evaluate": f"no result was finished in {workdir}/evaluation",
          "train": f"the checkpoint of step 2 is kept in {checkpoint.directory(str(workdir))}"}
  assert err.splitlines()[-1] == (f"codajax: preempted (SIGTERM) during --mode {mode}: "
                                  f"{kept[mode]}; rerun the same command to resume.")
  events = [os.path.basename(p) for p in glob.glob(str(workdir / "events.out.tfevents.*"))]
  assert sorted(os.listdir(workdir)) == sorted(  # No figure, no evaluation/.
      ["checkpoints", "config.json", "metrics.jsonl", *events])


# ---------------------------------------------------------------- bad input


def test_a_batch_larger_than_the_training_split_is_one_line_before_any_work(tmp_path):
  """Issue 17, item 7: --config.batch_size=100000 ran for 66 s, then died with a
  30-line RESOURCE_EXHAUSTED traceback, leaving config.json behind."""
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError) as e:
    train.train_and_evaluate(digits(batch_size=1440, num_steps=1), str(workdir))
  assert str(e.value) == ("config.batch_size=1440 exceeds the 1438 training examples of "
                          "digits; use at most 1438.")
  assert not workdir.exists()


def test_a_first_step_failing_when_it_runs_leaves_nothing_behind(tmp_path, monkeypatch):
  """Issue 17, item 7: config.json was written once the first step was
  dispatched, so an error that surfaces when it runs (RESOURCE_EXHAUSTED,
  raised where its result is fetched) left it behind."""
  class Exhausted:  # A loss whose computation fails when it is fetched.
    def __float__(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory")

    def __array__(self, *args, **kwargs):
      return float(self)

  original = train.setup

  def setup(*args, **kwargs):
    run = original(*args, **kwargs)
    step = run.train_step_fn
    run.train_step_fn = lambda state, batch: (step(state, batch)[0],
                                              {"train/loss": Exhausted()})
    return run
  monkeypatch.setattr(train, "setup", setup)
  workdir = tmp_path / "run"
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    train.train_and_evaluate(digits(num_steps=2), str(workdir))
  assert not workdir.exists()


def test_non_finite_loss_names_the_step_and_is_never_checkpointed(tmp_path, monkeypatch):
  original = input_pipeline.train_batches

  def nan_at_step_2(config, info, start_step=0):
    for s, batch in enumerate(original(config, info, start_step), start_step + 1):
      if s == 2:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, "train_batches", nan_at_step_2)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match="at step 2"):
    train.train_and_evaluate(digits(num_steps=4, checkpoint_every_steps=1), workdir)
  assert checkpoint_steps(workdir) == [1]  # A rerun resumes from finite parameters.


def test_non_finite_eval_logits_are_an_error_naming_the_step(tmp_path):
  """NaN parameters (e.g. badly converted weights) must not score top-1 = 1.0."""
  workdir = str(tmp_path)
  config = digits()
  model = models.from_config(config.model)
  params = model.init(jax.random.key(7), jnp.zeros((1, 16, 16, 1)))["params"]
  params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  checkpoint.save_imported(workdir, params, {"source": "test", "model": config.model.to_dict()})
  with pytest.raises(FloatingPointError, match=(
      rf"Non-finite logits .* for {DIGITS_TEST} of {DIGITS_TEST} test examples at step 0 "
      rf"\(checkpoints in {checkpoint.directory(workdir)}\)")):
    train.train_and_evaluate(config, workdir, mode="accuracy")


def test_a_failing_final_evaluation_keeps_the_final_checkpoint(tmp_path, monkeypatch):
  """The final step is saved before it is evaluated: a bad test image loses nothing."""
  def bad_test_image(config, info):
    raise tf.errors.InvalidArgumentError(None, None, "bad test image")
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(input_pipeline, "eval_batches", bad_test_image)
  workdir = str(tmp_path)
  with pytest.raises(tf.errors.InvalidArgumentError, match="bad test image"):
    train.train_and_evaluate(digits(num_steps=3, checkpoint_every_steps=2), workdir)
  assert checkpoint_steps(workdir) == [2, 3]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_training_past_an_unreadable_step_sets_it_aside_and_finishes(tmp_path):
  """Truncated step 4 and a stray empty step 6: resume from 2, save 4 and 6 again."""
  workdir = str(tmp_path)
  train.train_and_evaluate(digits(num_steps=4, checkpoint_every_steps=2), workdir)
  ckpts = checkpoint.directory(workdir)
  for path in glob.glob(os.path.join(ckpts, "4", "params", "**", "d", "*"), recursive=True):
    open(path, "wb").close()  # Truncated.
  os.makedirs(os.path.join(ckpts, "6"))
  result = train.train_and_evaluate(digits(num_steps=6, checkpoint_every_steps=2), workdir)
  assert result.metrics["eval/count"] == DIGITS_TEST
  assert checkpoint_steps(workdir) == [2, 4, 6]
  assert sorted(os.listdir(os.path.join(ckpts, "corrupt"))) == ["4", "6"]
  assert train_steps(workdir)[-4:] == [3, 4, 5, 6]  # Resumed from step 2.


# ------------------------------------------------------------- the workdir


def test_a_workdir_in_use_is_refused_with_one_line_before_the_model_is_built(
    tmp_path, monkeypatch):
  """Two runs in one workdir mixed their checkpoints and metrics without a word."""
  workdir = tmp_path / "run"
  other = workdir_lib.Workdir(str(workdir), checkpoint.directory(str(workdir)))
  other.open()  # Another run (in another process, the lock works the same: test_workdir).

  def no_model(config):
    raise AssertionError("the model was built")
  monkeypatch.setattr(models, "from_config", no_model)
  with pytest.raises(workdir_lib.WorkdirError, match=(
      rf"--workdir={workdir} is in use by another codajax run \(pid {os.getpid()} on ")):
    train.train_and_evaluate(digits(num_steps=1), str(workdir))
  other.close()
  assert os.listdir(workdir) == []


def test_an_unwritable_workdir_is_one_line_before_any_work(tmp_path, monkeypatch):
  """It hung for 5 minutes in orbax's retries, then printed 12 tracebacks."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)

  def no_data(config):
    raise AssertionError("the data was read")
  monkeypatch.setattr(input_pipeline, "get_info", no_data)
  monkeypatch.setattr(workdir_lib, "_probe", lambda d: "Permission denied")  # As root too.
  for mode in ("train", "explain"):
    with pytest.raises(workdir_lib.WorkdirError, match=(
        rf"--workdir={workdir} cannot be written: {workdir}(/checkpoints)? is not writable "
        r"\(Permission denied\)\. Fix the permissions or choose another --workdir\.")):
      train.train_and_evaluate(digits(num_steps=1), str(workdir), mode=mode)


def test_accuracy_in_a_read_only_workdir_prints_and_writes_nothing(tmp_path, monkeypatch):
  """It failed while creating the TensorBoard writer."""
  workdir = str(tmp_path)
  config = digits(num_steps=1)
  trained = train.train_and_evaluate(config, workdir)
  before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "**"),
                                                      recursive=True)}
  monkeypatch.setattr(workdir_lib, "_probe", lambda d: "Read-only file system")
  evaluated = train.train_and_evaluate(config, workdir, mode="accuracy")
  assert evaluated.step == 1
  np.testing.assert_allclose(evaluated.metrics["eval/loss"], trained.metrics["eval/loss"],
                             rtol=1e-6)
  after = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "**"),
                                                     recursive=True)}
  assert after == before  # No new file, nothing rewritten.


def test_a_run_failing_before_its_first_step_leaves_nothing_behind(tmp_path, monkeypatch):
  def broken(config, info, start_step=0):
    raise input_pipeline.DataError("broken batch")
    yield  # pylint: disable=unreachable
  monkeypatch.setattr(input_pipeline, "train_batches", broken)
  fresh = tmp_path / "fresh"
  with pytest.raises(input_pipeline.DataError, match="broken batch"):
    train.train_and_evaluate(digits(num_steps=2), str(fresh))
  assert not fresh.exists()  # No config.json, events file or empty checkpoints/.
  existing = tmp_path / "existing"
  existing.mkdir()
  with pytest.raises(input_pipeline.DataError, match="broken batch"):
    train.train_and_evaluate(digits(num_steps=2), str(existing))
  assert os.listdir(existing) == []


def test_a_kill_after_a_log_line_leaves_no_duplicate_line(tmp_path, monkeypatch):
  """Steps 3 was logged, then the run died before checkpointing it: the rerun
  from step 2 logs 3 again, once."""
  workdir = str(tmp_path)
  original = input_pipeline.train_batches

  def killed_at_step_4(config, info, start_step=0):
    for s, batch in enumerate(original(config, info, start_step), start_step + 1):
      if s == 4:
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
          f.write('{"step": 4, "train/lo')  # The kill also cut a line short.
        raise SystemExit("killed")
      yield batch

  monkeypatch.setattr(input_pipeline, "train_batches", killed_at_step_4)
  with pytest.raises(SystemExit):
    train.train_and_evaluate(digits(num_steps=4, checkpoint_every_steps=2), workdir)
  assert checkpoint_steps(workdir) == [2]
  monkeypatch.undo()
  train.train_and_evaluate(digits(num_steps=4, checkpoint_every_steps=2), workdir)
  assert train_steps(workdir) == [1, 2, 3, 4]
