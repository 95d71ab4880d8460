"""Tests of codajax.pretrained with real torch and file:// URLs (no network).

The "authors' file" is a torch.save'd state dict, in the authors' layout
(with DataParallel's "module." prefix), of a randomly initialised 9L-S net,
served under a real model name through `url=`. One module-wide first load
fills a cache; tests that change a cache work on a copy of it.
"""

import hashlib
import http.server
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from unittest import mock

from absl import flags
import chex
import jax
import numpy as np
import pytest
import torch

from codajax import checkpoint
from codajax import convert
from codajax import models
from codajax import pretrained
from tests import test_convert

NAME = "9L-S-CoDA-SQ-1000"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Copied from the authors' interpretability/utils.py (moboehle/CoDA-Nets).
AUTHORS_MODEL_URLS = {
    "Imagenet": {
        "9L-L-CoDA-SQ-100000": ('https://nextcloud.mpi-klsb.mpg.de/index.php/s/pArrgmncXAAiH5R/download', 60)
    },
    "CIFAR10": {
        "9L-S-CoDA-SQ-10": ('https://nextcloud.mpi-klsb.mpg.de/index.php/s/H8FgwMHJTTTYDJw/download', 200),
        "9L-S-CoDA-SQ-50": ('https://nextcloud.mpi-klsb.mpg.de/index.php/s/SqPBioqmxEWbH9g/download', 200),
        "9L-S-CoDA-SQ-100": ('https://nextcloud.mpi-klsb.mpg.de/index.php/s/yk7LajwLwpXXzf5/download', 200),
        "9L-S-CoDA-SQ-500": ('https://nextcloud.mpi-klsb.mpg.de/index.php/s/zfeYMASLtKNGgsQ/download', 200),
        "9L-S-CoDA-SQ-1000": ('https://nextcloud.mpi-klsb.mpg.de/index.php/s/8ykMc8XLQMtCxHo/download', 200),
        "9L-S-CoDA-SQ-5000": ('https://nextcloud.mpi-klsb.mpg.de/index.php/s/6iY992FYEsfHkeA/download', 200),
    }
}
FILE = "model_epoch_200.pkl"


def random_variables(model, seed=0):
  """Random parameters of `model` (b not zero, so that it matters)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(seed)

  def draw(s):
    fan_in = np.prod(s.shape[:-1]) if len(s.shape) > 1 else 400.0
    return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree.map(draw, shapes)


def write_authors_file(path, variables):
  sd = {f"module.{k}": torch.from_numpy(v)
        for k, v in convert.to_torch_state_dict(variables).items()}
  torch.save(sd, path)
  return sd


def file_url(path):
  return "file://" + os.path.abspath(path)


def sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def listing(directory):
  """Every file under `directory` outside the converted checkpoint, relative."""
  out = []
  for root, _, files in os.walk(directory):
    rel = os.path.relpath(root, directory)
    if rel.split(os.sep)[:2] != [NAME, pretrained.CONVERTED]:
      out += [os.path.normpath(os.path.join(rel, f)) for f in files]
  return sorted(out)


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
  """(path, state dict, expected params) of the served file."""
  model = authors_model()
  variables = random_variables(model)
  path = str(tmp_path_factory.mktemp("served") / "download")
  sd = write_authors_file(path, variables)
  return path, sd, convert.from_torch_state_dict(model, sd)["params"]


@pytest.fixture(scope="module")
def first_load(authors, tmp_path_factory):
  """The cache after one first load, and that load's (model, variables)."""
  cache = str(tmp_path_factory.mktemp("cache"))
  return cache, pretrained.load(NAME, cache_dir=cache, url=file_url(authors[0]))


@pytest.fixture
def cache_copy(first_load, tmp_path):
  copy = str(tmp_path / "cache")
  shutil.copytree(first_load[0], copy)
  return copy


def authors_model():
  return models.from_config(pretrained.model_config(NAME))


def served_by(read_fn):
  """torch.hub.urlopen whose responses read through `read_fn(read, calls, n)`:
  the response's own read, the number of reads so far (this one included), n."""
  def urlopen(*args, **kwargs):
    response = urllib.request.urlopen(*args, **kwargs)
    read, calls = response.read, []

    def patched_read(n):
      calls.append(n)
      return read_fn(read, len(calls), n)
    response.read = patched_read
    return response
  return urlopen


def no_network(*args, **kwargs):
  """torch.hub.urlopen (codajax.download goes through torch.hub) that must not be called."""
  raise AssertionError(f"unexpected download: {args}")


class TestTable:

  def test_urls_and_epochs_are_the_authors(self):
    ours = {m.name: (m.url, m.epoch) for m in pretrained.MODELS.values()}
    assert ours == {**AUTHORS_MODEL_URLS["Imagenet"], **AUTHORS_MODEL_URLS["CIFAR10"]}

  def test_fields(self):
    for m in pretrained.MODELS.values():
      assert m.temperature == float(m.name.rsplit("-", 1)[1])
      assert m.norm == "squash" and m.filename == f"model_epoch_{m.epoch}.pkl"
      want = (("cifar10", "9L-S", 32) if m.name.startswith("9L-S-") else
              ("imagenet100", "9L-L", 240))
      assert (m.dataset, m.architecture, m.image_size) == want

  @pytest.mark.parametrize("name", list(pretrained.MODELS))
  def test_config_is_the_named_config(self, name):
    # codajax.pretrained cannot import configs/ (not installed); its own
    # configs must be those that codajax.main gets from the printed spec.
    entry = pretrained.MODELS[name]
    path, variant = entry.config.split(":")
    config = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config(
        variant)
    assert pretrained.model_config(name).to_dict() == config.model.to_dict()
    assert entry.image_size == config.image_size
    assert config.dataset.endswith({"cifar10": "cifar10", "imagenet100": "imagenet2012"}[
        entry.dataset])

  def test_torch_forward_matches_numpy_reference(self):
    # The torch reference of the import check against test_convert's float64
    # numpy forward (two independent transcriptions of the authors' code).
    for norm in ("squash", "l2"):
      sd = test_convert.random_state_dict(prefix="module.")
      model = test_convert.make_model(norm)
      x = np.random.default_rng(1).uniform(size=(2, 9, 7, 3)).astype(np.float32)
      want = test_convert.reference_logits(sd, x, norm, model.temperature, model.logit_bias)
      np.testing.assert_allclose(convert.torch_forward(sd, model, x), want, rtol=1e-12)


class TestLoad:

  def test_first_load_downloads_records_and_converts(self, authors, first_load):
    path, _, expected = authors
    cache, (model, variables) = first_load
    assert model == models.from_config(pretrained.model_config(NAME))
    assert model.temperature == 1000.0
    chex.assert_trees_all_equal(jax.device_get(variables["params"]), expected)
    assert listing(cache) == [f"{NAME}/{FILE}", f"{NAME}/sha256"]  # No temporary files.
    with open(os.path.join(cache, NAME, FILE), "rb") as f, open(path, "rb") as g:
      assert f.read() == g.read()
    with open(os.path.join(cache, NAME, "sha256")) as f:
      assert f.read() == f"{sha256(path)}  {FILE}\n"

  def test_later_load_needs_neither_torch_nor_the_file(self, authors, cache_copy):
    os.remove(os.path.join(cache_copy, NAME, FILE))
    with mock.patch.dict(sys.modules, {"torch": None}), \
        mock.patch.object(torch.hub, "urlopen", no_network):
      _, variables = pretrained.load(NAME, cache_dir=cache_copy)
    chex.assert_trees_all_equal(jax.device_get(variables["params"]), authors[2])

  def test_cache_dir_defaults_to_the_environment(self, first_load, monkeypatch):
    monkeypatch.setenv(pretrained.CACHE_ENV, first_load[0])
    assert pretrained.cache_root() == first_load[0]
    monkeypatch.delenv(pretrained.CACHE_ENV)
    assert pretrained.cache_root() == os.path.expanduser("~/.cache/codajax")

  def test_converted_again_from_the_cached_file_offline(self, authors, cache_copy):
    shutil.rmtree(os.path.join(cache_copy, NAME, pretrained.CONVERTED))
    with mock.patch.object(torch.hub, "urlopen", no_network):
      _, variables = pretrained.load(NAME, cache_dir=cache_copy, url="http://unused.invalid/")
    chex.assert_trees_all_equal(jax.device_get(variables["params"]), authors[2])

  def test_wrong_conversion_is_caught_and_not_cached(self, authors, tmp_path):
    # A plausible bug: A kept in torch's channel order (j*C_out + o).
    real = convert.from_torch_state_dict

    def unpermuted(model, sd):
      variables = real(model, sd)
      for i in range(model.num_layers):
        layer = variables["params"][f"layer_{i}"]
        layer["A"] = np.ascontiguousarray(convert.to_numpy(
            sd[f"module.{convert.torch_key(i, 'A')}"])[:, :, 0, 0].T)
      return variables

    cache = str(tmp_path / "cache")
    with mock.patch.object(pretrained.convert, "from_torch_state_dict", unpermuted):
      with pytest.raises(pretrained.PretrainedError,
                         match=f"^{NAME}: the converted model does not match the authors' "
                         "torch forward"):
        pretrained.load(NAME, cache_dir=cache, url=file_url(authors[0]))
    assert not os.path.exists(os.path.join(cache, NAME, pretrained.CONVERTED))


class TestFailures:

  def test_later_download_with_another_hash_is_refused(self, authors, cache_copy, tmp_path):
    shutil.rmtree(os.path.join(cache_copy, NAME, pretrained.CONVERTED))
    os.remove(os.path.join(cache_copy, NAME, FILE))
    other = str(tmp_path / "other.pkl")
    write_authors_file(other, random_variables(authors_model(), seed=1))
    with pytest.raises(pretrained.PretrainedError) as e:
      pretrained.load(NAME, cache_dir=cache_copy, url=file_url(other))
    msg = str(e.value)
    assert msg.startswith(f"{NAME}: the downloaded file has sha256 {sha256(other)}, not the "
                          f"{sha256(authors[0])} recorded at its first download")
    assert f"delete {os.path.join(cache_copy, NAME, 'sha256')}" in msg
    assert listing(cache_copy) == [f"{NAME}/sha256"]  # The new file was not kept.

  def test_changed_cached_file_is_refused(self, cache_copy):
    shutil.rmtree(os.path.join(cache_copy, NAME, pretrained.CONVERTED))
    with open(os.path.join(cache_copy, NAME, FILE), "ab") as f:
      f.write(b"\0")
    with pytest.raises(pretrained.PretrainedError,
                       match=f"^{NAME}: the cached .* was changed or damaged. Delete it"):
      pretrained.load(NAME, cache_dir=cache_copy)

  @pytest.mark.parametrize("error", [ConnectionResetError("reset by peer"), KeyboardInterrupt()])
  def test_interrupted_download_leaves_no_file(self, authors, tmp_path, error):
    def read_then_fail(read, calls, n):
      if calls > 2:
        raise error
      return read(n)

    cache = str(tmp_path / "cache")
    with mock.patch.object(torch.hub, "urlopen", served_by(read_then_fail)):
      with pytest.raises(type(error) if isinstance(error, KeyboardInterrupt)
                         else pretrained.PretrainedError) as e:
        pretrained.load(NAME, cache_dir=cache, url=file_url(authors[0]), progress=False)
    if not isinstance(error, KeyboardInterrupt):
      assert str(e.value).startswith(
          f"{NAME}: cannot download {file_url(authors[0])} (reset by peer); nothing was kept.")
    assert listing(cache) == []

  def test_short_download_leaves_no_file(self, authors, tmp_path):
    # urllib reads a response cut short as its end, so the check of the
    # content (not a state dict) is what catches it.
    def read_short(read, calls, unused_n):  # A server that closes the connection early.
      return read(1000) if calls == 1 else b""

    cache = str(tmp_path / "cache")
    with mock.patch.object(torch.hub, "urlopen", served_by(read_short)):
      with pytest.raises(pretrained.PretrainedError, match="is not a PyTorch state dict .* a "
                         "download cut short .* it was removed from the cache"):
        pretrained.load(NAME, cache_dir=cache, url=file_url(authors[0]))
    assert listing(cache) == []

  @pytest.mark.parametrize("where", ["missing_file", "closed_port"])
  def test_offline_names_the_model_and_the_fix(self, tmp_path, where):
    if where == "missing_file":
      url = file_url(tmp_path / "no" / "such.pkl")
    else:
      with socket.socket() as s:  # A port nothing listens on.
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/model.pkl"
    cache = str(tmp_path / "cache")
    with pytest.raises(pretrained.PretrainedError) as e:
      pretrained.load(NAME, cache_dir=cache, url=url)
    msg = str(e.value)
    assert msg.startswith(f"{NAME}: cannot download {url} (")
    assert f"download the file by hand to {os.path.join(cache, NAME, FILE)}" in msg
    assert "\n" not in msg
    assert listing(cache) == []

  @pytest.mark.parametrize("served", ["html", "other_net"])
  def test_file_that_is_not_the_net_is_refused(self, tmp_path, served):
    path = str(tmp_path / "served")
    if served == "html":  # What a file host answers when a share has gone.
      with open(path, "w") as f:
        f.write("<html><body>This share does not exist.</body></html>")
      match = (f"^{NAME}: .* is not a PyTorch state dict .* error page; it was removed from "
               "the cache; check the URL and run again")
    else:
      torch.save({k: torch.from_numpy(v) for k, v in test_convert.random_state_dict().items()},
                 path)
      match = (f"^{NAME}: .* does not fit the 9L-S architecture \\(The PyTorch state dict "
               "does not fit the model \\(\\d+ problem\\(s\\)\\): - missing key")
    with pytest.raises(pretrained.PretrainedError, match=match):
      pretrained.load(NAME, cache_dir=str(tmp_path / "cache"), url=file_url(path))

  def test_unknown_name_suggests_close_ones(self):
    with pytest.raises(pretrained.PretrainedError) as e:
      pretrained.load("9L-S-CoDA-SQ-100O")
    msg = str(e.value)
    assert msg.startswith("Unknown pretrained model '9L-S-CoDA-SQ-100O'. Did you mean ")
    assert "'9L-S-CoDA-SQ-1000'" in msg.split("?")[0]
    assert all(name in msg for name in pretrained.MODELS)
    with pytest.raises(pretrained.PretrainedError, match=r"'resnet50'\. The authors released"):
      pretrained.model_config("resnet50")

  def test_torch_missing_names_the_install_and_downloads_nothing(self, authors, tmp_path):
    cache = str(tmp_path / "cache")
    with mock.patch.dict(sys.modules, {"torch": None}), \
        mock.patch.object(torch.hub, "urlopen", no_network):
      with pytest.raises(pretrained.PretrainedError,
                         match=rf"^{NAME}: .*needs torch.*`bash launch/setup.sh torch "
                               r"\(or \.venv/bin/pip install -e '\.\[torch\]'\) in your "
                               r"codajax clone`"):
        pretrained.load(NAME, cache_dir=cache, url=file_url(authors[0]))
    assert listing(cache) == []

  @pytest.mark.parametrize("failure", ["not_a_state_dict", "torch_forward"])
  def test_file_failing_a_check_is_removed_and_downloaded_again(self, authors, tmp_path,
                                                                 failure):
    # Neither the file nor its hash may stay: the next run would fail on the
    # same file for good, or (its hash recorded) refuse the authors' file.
    cache = str(tmp_path / "cache")
    if failure == "not_a_state_dict":
      page = tmp_path / "page"
      page.write_text("<html><body>This share does not exist.</body></html>")
      with pytest.raises(pretrained.PretrainedError, match="it was removed from the cache"):
        pretrained.load(NAME, cache_dir=cache, url=file_url(page))
    else:
      with mock.patch.object(pretrained, "RTOL", -1.0), \
          pytest.raises(pretrained.PretrainedError, match=f"^{NAME}: the converted model "
                        f"does not match .* sha256 {sha256(authors[0])}; it was removed"):
        pretrained.load(NAME, cache_dir=cache, url=file_url(authors[0]))
    assert not os.path.exists(cache)  # Nothing kept, not even empty folders.
    _, variables = pretrained.load(NAME, cache_dir=cache, url=file_url(authors[0]))
    chex.assert_trees_all_equal(jax.device_get(variables["params"]), authors[2])
    with open(os.path.join(cache, NAME, "sha256")) as f:
      assert f.read().split()[0] == sha256(authors[0])

  def test_failed_offline_run_leaves_no_folder_it_created(self, tmp_path):
    url = file_url(tmp_path / "no" / "such.pkl")
    fresh = str(tmp_path / "fresh" / "cache")  # Neither folder exists yet.
    with pytest.raises(pretrained.PretrainedError, match="cannot download"):
      pretrained.load(NAME, cache_dir=fresh, url=url)
    assert not os.path.exists(tmp_path / "fresh")
    shared = tmp_path / "shared"  # A cache in use: only the model's folder goes.
    (shared / "9L-S-CoDA-SQ-10").mkdir(parents=True)
    with pytest.raises(pretrained.PretrainedError, match="cannot download"):
      pretrained.load(NAME, cache_dir=str(shared), url=url)
    assert os.listdir(shared) == ["9L-S-CoDA-SQ-10"]

  def test_names_are_case_insensitive(self, first_load, capsys, tmp_path):
    assert pretrained.get("9l-s-coda-sq-1000") is pretrained.MODELS[NAME]
    assert pretrained.get("9L-L-CODA-SQ-100000").name == "9L-L-CoDA-SQ-100000"
    with mock.patch.object(torch.hub, "urlopen", no_network):
      model, _ = pretrained.load("9l-s-coda-sq-1000", cache_dir=first_load[0])
    assert model == first_load[1][0]
    workdir = str(tmp_path / "w")
    pretrained.main(["pretrained", NAME.lower()],
                    flag_values=TestCommandLine.parse_flags(workdir, first_load[0]))
    assert f"Wrote the authors' {NAME} to {workdir}." in capsys.readouterr().out


class TestWorkdir:

  def test_to_workdir_restores_to_the_same_params(self, authors, first_load, tmp_path):
    workdir = str(tmp_path / "workdir")
    with mock.patch.object(torch.hub, "urlopen", no_network):
      assert pretrained.to_workdir(NAME, workdir, cache_dir=first_load[0]) == workdir
    # As codajax.train restores it (eval, explain and evaluate modes).
    mngr = checkpoint.manager(workdir, asynchronous=False)
    abstract = checkpoint.abstract(first_load[1][1]["params"])
    step, params, opt_state, meta = checkpoint.restore(mngr, abstract)
    mngr.close()
    assert (step, opt_state) == (0, None)
    chex.assert_trees_all_equal(jax.device_get(params), authors[2])
    assert meta["imported"] and meta["pretrained"] == NAME
    assert meta["sha256"] == sha256(authors[0])
    assert meta["config"] == "configs/cifar10.py:9L-S-CoDA-SQ-1000"
    with pytest.raises(pretrained.PretrainedError, match=f"^{NAME}: .*already holds "
                       "checkpoints"):
      pretrained.to_workdir(NAME, workdir, cache_dir=first_load[0])


class TestCommandLine:

  @staticmethod
  def parse_flags(workdir, cache_dir):
    fv = flags.FlagValues()
    pretrained.define_flags(fv)
    fv(["pretrained", f"--workdir={workdir}", f"--cache_dir={cache_dir}"])
    return fv

  def test_prints_where_and_the_next_command(self, first_load, tmp_path, capsys):
    workdir = str(tmp_path / "w")
    pretrained.main(["pretrained", NAME], flag_values=self.parse_flags(workdir, first_load[0]))
    out = capsys.readouterr().out
    assert f"Wrote the authors' {NAME} to {workdir}." in out
    assert (f"python -m codajax.main --config configs/cifar10.py:{NAME} --workdir {workdir} "
            "--mode accuracy\n") in out
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "0"))

  def test_failure_is_one_line_and_exit_status_1(self, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "codajax.pretrained", "9L-L-CoDA-SQ-10000",
         f"--workdir={tmp_path / 'w'}", f"--cache_dir={tmp_path / 'c'}"],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 1
    assert result.stderr.startswith(
        "codajax.pretrained: Unknown pretrained model '9L-L-CoDA-SQ-10000'. Did you mean "
        "'9L-L-CoDA-SQ-100000'")
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "c")


INTERRUPTED = ("codajax.pretrained: interrupted (Ctrl-C); no partial file was kept. Run the "
               "same command again.\n")


class _StalledServer(http.server.BaseHTTPRequestHandler):
  """Announces a 100 MB file, then sends nothing until `release` is set."""
  requested, release = threading.Event(), threading.Event()

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header("Content-Length", str(100 << 20))
    self.end_headers()
    self.wfile.flush()
    type(self).requested.set()
    type(self).release.wait(timeout=120)

  def log_message(self, *args):
    pass


class TestCtrlC:
  """Ctrl-C on the command line: one line and status 130, no partial file."""

  def _start(self, tmp_path, url, *python_flags):
    return subprocess.Popen(
        [sys.executable, *python_flags, "-m", "codajax.pretrained", NAME,
         f"--workdir={tmp_path / 'w'}", f"--cache_dir={tmp_path / 'c'}", f"--url={url}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

  def test_during_the_download(self, tmp_path):
    _StalledServer.requested.clear()
    _StalledServer.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StalledServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
      proc = self._start(tmp_path, f"http://127.0.0.1:{server.server_port}/model.pkl")
      deadline = time.monotonic() + 240  # The imports take seconds.
      while not _StalledServer.requested.wait(timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
          proc.kill()
          pytest.fail(f"no request: {proc.communicate()}")
      parts = [f for f in os.listdir(tmp_path / "c" / NAME) if f.endswith(".partial")]
      assert len(parts) == 1  # Mid-download.
      proc.send_signal(signal.SIGINT)
      out, err = proc.communicate(timeout=60)
    finally:
      _StalledServer.release.set()
      server.shutdown()
    assert (proc.returncode, out) == (130, "")
    # The download's progress lines, then its one line.
    assert err.splitlines()[-1] + "\n" == INTERRUPTED and err.endswith(INTERRUPTED)
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "w")

  def test_during_the_imports(self, tmp_path):
    # -X importtime reports each import as it ends: Ctrl-C once jax's have begun.
    proc = self._start(tmp_path, "http://unused.invalid/", "-X", "importtime")
    lines = []
    for line in proc.stderr:
      lines.append(line)
      if "jax._src" in line:
        break
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, err = proc.communicate(timeout=60)
    rest = [l for l in err.splitlines(keepends=True) if not l.startswith("import time:")]
    assert (proc.returncode, "".join(rest), out) == (130, INTERRUPTED, ""), lines[-3:]
    assert time.monotonic() - start < 30
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "w")
