r"""The authors' released CoDA-Nets, converted to codajax, in one call.

  from codajax import pretrained
  model, variables = pretrained.load("9L-S-CoDA-SQ-1000")

`model.apply(variables, images)` then gives the logits of (N, H, W, 3) images
in [0, 1]. For the command line, the same net as a workdir:

  python -m codajax.pretrained 9L-S-CoDA-SQ-1000 --workdir workdirs/sq-1000
  python -m codajax.main --config configs/cifar10.py:9L-S-CoDA-SQ-1000 \
      --workdir workdirs/sq-1000 --mode eval

`MODELS` lists the seven nets of the authors' repository (its
interpretability/utils.py `_model_urls`): six 9L-S nets for CIFAR-10 at
temperatures T = 10 ... 5000 and the 9L-L net for ImageNet-100. Each is a
`torch.save(model.state_dict())` file, `model_epoch_<epoch>.pkl`. The first
load fills the cache, `cache_dir` or $CODAJAX_CACHE or ~/.cache/codajax:

  <cache>/<name>/model_epoch_<epoch>.pkl   the authors' file, kept so that it
                                           can be converted again offline,
  <cache>/<name>/sha256                    its sha256 (`sha256sum -c` format),
                                           recorded once it passed the checks,
  <cache>/<name>/orbax/                    the converted parameters, a workdir
                                           that `codajax.checkpoint` restores.

It downloads the file (atomically: a partial download never takes the file's
name), converts it with `codajax.convert`, checks the result against a torch
forward of the authors' network (`convert.torch_forward`), and keeps it, so
later loads need neither torch nor the network. The authors publish no
hashes, so the file's sha256 is recorded at its first download that passes
the checks: a later download that differs (the file behind the URL changed,
or arrived damaged) is an error rather than, silently, another model. A file
that fails a check before its hash was recorded is removed, so the next run
downloads it again; a failed run leaves no folder it created empty.

Names are matched case-insensitively ("9l-s-coda-sq-1000"). Every failure is
a `PretrainedError`: one line naming the model and the fix. On the command
line, Ctrl-C (during the imports, the download or the conversion) prints one
line and exits with status 130, leaving no partial file.
"""

import os
import signal
import sys


def _interrupted(*unused_signal_args) -> None:
  """Ctrl-C on the command line: one line and status 130 (128 + SIGINT), at
  once, without the interpreter's teardown (XLA's and torch's threads)."""
  sys.stdout.flush()
  sys.stderr.write("codajax.pretrained: interrupted (Ctrl-C); no partial file was kept. "
                   "Run the same command again.\n")
  sys.stderr.flush()
  os._exit(130)  # pylint: disable=protected-access


if __name__ == "__main__":
  # Before the imports below (jax, orbax: seconds), which Ctrl-C would
  # otherwise break with a long traceback.
  signal.signal(signal.SIGINT, _interrupted)

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import dataclasses
import hashlib
import http.client
import shutil
import tempfile
import urllib.request
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from codajax import architectures
from codajax import checkpoint
from codajax import config_lib
from codajax import convert
from codajax import models

CACHE_ENV = "CODAJAX_CACHE"
DEFAULT_CACHE = "~/.cache/codajax"
CONVERTED = "orbax"        # <cache>/<name>/orbax: the converted workdir.
SHA256 = "sha256"          # <cache>/<name>/sha256: recorded at first download.
CHUNK = 1 << 20            # Download read size (bytes).
TIMEOUT_S = 60.0           # Per network operation, not for the whole file.
RTOL = 1e-4                # Of the import check, relative to the largest evidence.
# Models are hashable: equal ones (every check of one architecture) share a compilation.
_apply = jax.jit(lambda model, variables, x: model.apply(variables, x), static_argnums=0)


class PretrainedError(RuntimeError):
  """A pretrained model that cannot be loaded, and what to do about it.

  The message is always one line (whitespace collapsed): the command line
  prints it as is, and notebooks show it without a traceback's noise.
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """One released net: where it is, and the codajax config of its training run."""
  name: str
  dataset: str          # "cifar10" | "imagenet100"
  url: str
  epoch: int            # The file is model_epoch_<epoch>.pkl.
  config: str           # The --config spec of codajax.main for this net.
  image_size: int       # The training and test image side.
  temperature: float    # T, the number in the name.
  norm: str             # "squash" (SQ).
  architecture: str     # "9L-S" | "9L-L", a key of ARCHITECTURES.

  @property
  def filename(self) -> str:
    return f"model_epoch_{self.epoch}.pkl"


ARCHITECTURES = {"9L-S": architectures.cifar10_9l_s, "9L-L": architectures.imagenet100_9l_l}


def _cifar10(temperature: int, url: str) -> Pretrained:
  name = f"9L-S-CoDA-SQ-{temperature}"
  return Pretrained(name, "cifar10", url, 200, f"configs/cifar10.py:{name}", 32,
                    float(temperature), "squash", "9L-S")


# The URLs and epochs of the authors' interpretability/utils.py `_model_urls`.
MODELS = {m.name: m for m in (
    _cifar10(10, "https://nextcloud.mpi-klsb.mpg.de/index.php/s/H8FgwMHJTTTYDJw/download"),
    _cifar10(50, "https://nextcloud.mpi-klsb.mpg.de/index.php/s/SqPBioqmxEWbH9g/download"),
    _cifar10(100, "https://nextcloud.mpi-klsb.mpg.de/index.php/s/yk7LajwLwpXXzf5/download"),
    _cifar10(500, "https://nextcloud.mpi-klsb.mpg.de/index.php/s/zfeYMASLtKNGgsQ/download"),
    _cifar10(1000, "https://nextcloud.mpi-klsb.mpg.de/index.php/s/8ykMc8XLQMtCxHo/download"),
    _cifar10(5000, "https://nextcloud.mpi-klsb.mpg.de/index.php/s/6iY992FYEsfHkeA/download"),
    Pretrained("9L-L-CoDA-SQ-100000", "imagenet100",
               "https://nextcloud.mpi-klsb.mpg.de/index.php/s/pArrgmncXAAiH5R/download", 60,
               "configs/imagenet100.py:9L-L-CoDA-SQ-100000", 240, 100000.0, "squash", "9L-L"),
)}

# The import check's inputs per dataset: (images, side). The nets are fully
# convolutional up to the sum pool, so a 48 x 48 image exercises every layer
# of the ImageNet net at a 25th of the cost of a 240 x 240 one.
CHECK_INPUTS = {"cifar10": (2, 32), "imagenet100": (1, 48)}


def get(name: str) -> Pretrained:
  """The table entry of `name`, matched case-insensitively; an unknown name
  suggests the closest ones."""
  match, close = config_lib.match_name(name, MODELS, n=3)
  if match:
    return MODELS[match]
  hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
  raise PretrainedError(f"Unknown pretrained model {name!r}.{hint} The authors released: "
                        f"{', '.join(MODELS)}.")


def model_config(name: str):
  """The `config.model` block of `name` (as in its `Pretrained.config`).

  Built here, not read from configs/, which is not installed with codajax.
  """
  entry = get(name)
  return config_lib.model_config(**ARCHITECTURES[entry.architecture](), norm=entry.norm,
                                 temperature=entry.temperature)


def cache_root(cache_dir: Optional[str] = None) -> str:
  """`cache_dir`, else $CODAJAX_CACHE, else ~/.cache/codajax (absolute)."""
  root = cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
  return os.path.abspath(os.path.expanduser(root))


def load(name: str, *, cache_dir: Optional[str] = None, url: Optional[str] = None,
         progress: bool = True) -> tuple[models.CoDANet, dict[str, Any]]:
  """(model, {"params": ...}) of the authors' net `name`; see the module docstring.

  Args:
    name: a key of MODELS, e.g. "9L-S-CoDA-SQ-1000".
    cache_dir: where downloads and conversions are kept (see `cache_root`).
    url: download from here instead of the table's URL (a mirror, or a
      file:// URL), when the cache lacks the file; it must still hash as
      recorded at the first download.
    progress: report the download on stderr.

  Raises:
    PretrainedError: one line naming the model and the fix.
  """
  _, model, params, _ = _load(name, cache_dir, url, progress)
  return model, {"params": params}


def to_workdir(name: str, workdir: str, *, cache_dir: Optional[str] = None,
               url: Optional[str] = None) -> str:
  """Writes `name` as the imported checkpoint (step 0) of `workdir`; returns the
  workdir's absolute path.

  `python -m codajax.main --config <MODELS[name].config> --workdir <workdir>
  --mode eval` (or explain, evaluate) then uses it. The workdir must hold no
  checkpoint yet.
  """
  entry, _, params, meta = _load(name, cache_dir, url, progress=True)
  keep = {k: meta[k] for k in ("pretrained", "config", "source", "sha256", "model") if k in meta}
  try:
    checkpoint.save_imported(workdir, params, keep)
  except checkpoint.CheckpointError as e:
    raise PretrainedError(f"{entry.name}: {e}") from e
  return os.path.abspath(workdir)


def _load(name, cache_dir, url, progress):
  """(entry, model, params, meta): converts into the cache first if needed."""
  entry = get(name)
  model = models.from_config(model_config(name))
  directory = os.path.join(cache_root(cache_dir), entry.name)
  converted = os.path.join(directory, CONVERTED)
  if not os.path.isdir(converted):
    _convert(entry, model, directory, url or entry.url, progress)
  params, meta = _restore(entry, model, converted)
  return entry, model, params, meta


# Conversion into the cache. ---------------------------------------------------


def _convert(entry: Pretrained, model: models.CoDANet, directory: str, url: str,
             progress: bool) -> None:
  """Fetches (or reuses) the authors' file, converts, checks and keeps it.

  A failure leaves no folder that this call created and left empty.
  """
  _require_torch(entry)  # Before a download that could not be used.
  created = _make_dir(entry, directory)
  try:
    _fetch_and_convert(entry, model, directory, url, progress)
  except BaseException:
    for d in reversed(created):  # Deepest first; os.rmdir keeps non-empty ones.
      with contextlib.suppress(OSError):
        os.rmdir(d)
    raise


def _fetch_and_convert(entry, model, directory, url, progress) -> None:
  """The file (downloaded unless cached), checked and converted into the cache.

  Its sha256 is recorded once it passed the checks: a file that never did (no
  recorded hash) and fails one is removed, so that the next run downloads it
  again instead of failing on it, or refusing the right file, for good.
  """
  path = os.path.join(directory, entry.filename)
  sha = (_check_cached(entry, path) if os.path.exists(path)
         else _download(entry, url, path, progress))
  verified = _recorded_sha256(path) is not None
  fix = (f"delete {directory} and run again, or check the URL" if verified else
         "it was removed from the cache; check the URL and run again")
  try:
    state_dict = _read(entry, path, fix)
    variables = _from_state_dict(entry, model, path, state_dict, fix)
    _check_against_torch(entry, model, state_dict, variables, sha, fix)
  except PretrainedError:
    if not verified:
      os.remove(path)
    raise
  if not verified:
    _record_sha256(path, sha)
  meta = {"pretrained": entry.name, "config": entry.config, "source": url, "sha256": sha,
          "model": model_config(entry.name).to_dict()}
  # Written aside, then renamed: a crash never leaves a half-written cache entry.
  tmp = tempfile.mkdtemp(prefix=f".{CONVERTED}-", dir=directory)
  try:
    checkpoint.save_imported(tmp, variables["params"], meta)
    os.replace(tmp, os.path.join(directory, CONVERTED))
  except OSError:
    if not os.path.isdir(os.path.join(directory, CONVERTED)):
      raise
    # Another process converted it meanwhile; use theirs.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _require_torch(entry: Pretrained) -> None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    del torch  # Only its presence matters here.
  except ImportError as e:
    raise PretrainedError(
        f"{entry.name}: the first load converts the authors' PyTorch file and needs "
        f"torch, which is not installed: run `{convert.INSTALL_HINT}` (later loads use "
        "the converted copy and need no torch).") from e


def _make_dir(entry: Pretrained, directory: str) -> list[str]:
  """Makes `directory` (checked writable); returns the folders it created, outermost first."""
  created, d = [], directory
  while not os.path.isdir(d) and os.path.dirname(d) != d:
    created.insert(0, d)
    d = os.path.dirname(d)
  try:
    os.makedirs(directory, exist_ok=True)
    tempfile.TemporaryFile(dir=directory).close()
    return created
  except OSError as e:
    raise PretrainedError(
        f"{entry.name}: cannot write the cache {directory} ({e.strerror or e}); pass "
        f"cache_dir= (--cache_dir) or set ${CACHE_ENV} to a writable directory.") from e


def _read(entry: Pretrained, path: str, fix: str) -> dict[str, np.ndarray]:
  try:
    return convert.load_torch_state_dict(path)
  except ValueError as e:
    # torch's own message (chained) is long and suggests unsafe loading.
    raise PretrainedError(
        f"{entry.name}: {path} is not a PyTorch state dict (torch.load(..., "
        "weights_only=True) refused it), so not the authors' file: perhaps a file host's "
        f"error page; {fix}.") from e


def _from_state_dict(entry, model, path, state_dict, fix):
  try:
    return convert.from_torch_state_dict(model, state_dict)
  except ValueError as e:
    lines = str(e).splitlines()
    raise PretrainedError(
        f"{entry.name}: {path} does not fit the {entry.architecture} architecture "
        f"({' '.join(lines[:2])}); it is not the authors' {entry.name} file: {fix}.") from e


def _check_against_torch(entry, model, state_dict, variables, sha, fix) -> None:
  """Raises unless codajax's forward matches the authors' torch forward.

  Compared is the evidence, the logits before / T and + logit bias (both
  models with T = 1 and no bias): with T = 1000 and more, the bias dominates
  the logits, and a test on them could not see a wrong layer.
  """
  n, side = CHECK_INPUTS[entry.dataset]
  x = np.random.default_rng(0).uniform(size=(n, side, side, 3)).astype(np.float32)
  plain = model.clone(temperature=1.0, logit_bias=0.0)
  want = convert.torch_forward(state_dict, plain, x)
  with jax.default_matmul_precision("highest"):  # Not TF32 on GPUs.
    got = np.asarray(_apply(plain, variables, x), np.float64)
  err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
  if not err <= RTOL:
    raise PretrainedError(
        f"{entry.name}: the converted model does not match the authors' torch forward "
        f"(relative difference {err:.2e} > {RTOL:g} on {n} random {side}x{side} images), "
        "so it was not kept: report this at the codajax issue tracker with the file's "
        f"sha256 {sha}; {fix}.")


# Restoring the converted copy. ------------------------------------------------


def _restore(entry: Pretrained, model: models.CoDANet, converted: str):
  """(params, meta) from the cache's converted workdir."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  x = jnp.zeros((1, entry.image_size, entry.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes)
  fix = f"delete {converted} and run again (it is rebuilt from the cached download)"
  mngr = checkpoint.manager(converted, asynchronous=False, keep_best=False)
  try:
    restored = checkpoint.restore(mngr, abstract)
  except checkpoint.CheckpointError as e:
    raise PretrainedError(f"{entry.name}: the converted copy is unusable ({e}); {fix}.") from e
  finally:
    mngr.close()
  if restored is None:
    raise PretrainedError(f"{entry.name}: the converted copy {converted} holds no "
                          f"checkpoint; {fix}.")
  _, params, _, meta = restored
  return params, meta


# Download and hashes. ---------------------------------------------------------


def _download(entry: Pretrained, url: str, path: str, progress: bool) -> str:
  """Downloads url to path atomically; returns its sha256 (checked if recorded)."""
  recorded = _recorded_sha256(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part",
                             dir=os.path.dirname(path))
  h, done, shown = hashlib.sha256(), 0, False
  try:
    with os.fdopen(fd, "wb") as f:
      try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": "codajax"}), timeout=TIMEOUT_S)
      except (OSError, ValueError, http.client.HTTPException) as e:
        raise PretrainedError(
            f"{entry.name}: cannot download {url} ({_reason(e)}). Check the network "
            f"connection (or proxy), or download the file by hand to {path} and run "
            "again.") from e
      with response:
        total = int(response.headers.get("Content-Length") or 0)
        try:
          while chunk := response.read(CHUNK):
            f.write(chunk)
            h.update(chunk)
            done += len(chunk)
            if progress:
              shown = _show_progress(entry.name, done, total)
        except (OSError, http.client.HTTPException) as e:
          raise PretrainedError(
              f"{entry.name}: the download from {url} stopped after {done} bytes "
              f"({_reason(e)}); nothing was kept. Run again (check the network and the "
              f"free space in {os.path.dirname(path)}).") from e
      if total and done != total:
        raise PretrainedError(
            f"{entry.name}: the download from {url} ended after {done} of {total} bytes; "
            "nothing was kept. Run again.")
      f.flush()
      os.fsync(f.fileno())
    sha = h.hexdigest()
    if recorded and sha != recorded:
      raise PretrainedError(
          f"{entry.name}: the downloaded file has sha256 {sha}, not the {recorded} "
          f"recorded at its first download ({_sha256_path(path)}): the file behind {url} "
          "has changed or arrived damaged, and was not kept. Run again to retry; to "
          f"accept the new file, delete {_sha256_path(path)}.")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  finally:
    if shown:
      sys.stderr.write("\n")
  return sha


def _check_cached(entry: Pretrained, path: str) -> str:
  """The cached file's sha256, checked against the recorded one if any."""
  sha, recorded = _file_sha256(path), _recorded_sha256(path)
  if recorded and sha != recorded:
    raise PretrainedError(
        f"{entry.name}: the cached {path} has sha256 {sha}, not the {recorded} recorded "
        f"at its first download ({_sha256_path(path)}): it was changed or damaged. Delete "
        "it to download it again.")
  return sha


def _sha256_path(path: str) -> str:
  return os.path.join(os.path.dirname(path), SHA256)


def _recorded_sha256(path: str) -> Optional[str]:
  try:
    with open(_sha256_path(path)) as f:
      return f.read().split()[0]
  except (FileNotFoundError, IndexError):
    return None


def _record_sha256(path: str, sha: str) -> None:
  """Writes `<sha>  <file name>` (sha256sum's format) atomically."""
  target = _sha256_path(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{SHA256}.", dir=os.path.dirname(target))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(f"{sha}  {os.path.basename(path)}\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _reason(e: BaseException) -> str:
  """URLError hides the cause in .reason; a socket timeout says only 'timed out'."""
  reason = getattr(e, "reason", None) or e
  return str(reason) or type(reason).__name__


def _show_progress(name: str, done: int, total: int) -> bool:
  mb = done / 1e6
  text = (f"{mb:.1f} of {total / 1e6:.1f} MB ({100 * done // total}%)" if total
          else f"{mb:.1f} MB")
  sys.stderr.write(f"\rcodajax: downloading {name}: {text}")
  sys.stderr.flush()
  return True


# Command line. ----------------------------------------------------------------


def define_flags(flag_values=None) -> None:
  """The command line's flags; defined on demand so importing this module is inert."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_string("workdir", None, "Where to write the converted checkpoint.",
                      flag_values=fv)
  flags.DEFINE_string("cache_dir", None, f"Download and conversion cache (default "
                      f"${CACHE_ENV} or {DEFAULT_CACHE}).", flag_values=fv)
  flags.DEFINE_string("url", None, "Download from here instead (a mirror or file:// URL).",
                      flag_values=fv)
  flags.mark_flags_as_required(["workdir"], flag_values=fv)


def main(argv, flag_values=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  if len(argv) != 2:
    raise app.UsageError(f"Give one model name (python -m codajax.pretrained NAME "
                         f"--workdir W), one of: {', '.join(MODELS)}.")
  try:
    entry = get(argv[1])
    workdir = to_workdir(entry.name, fv.workdir, cache_dir=fv.cache_dir, url=fv.url)
  except PretrainedError as e:
    raise SystemExit(f"codajax.pretrained: {e}") from None
  print(f"Wrote the authors' {entry.name} to {workdir}. Evaluate it (from a codajax "
        "checkout, which has configs/) with:")
  print(f"  python -m codajax.main --config {entry.config} --workdir {workdir} "
        "--mode eval")


if __name__ == "__main__":
  define_flags()
  # From here on Ctrl-C raises KeyboardInterrupt, so that a download removes
  # its partial file on the way out; then one line and 130.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    config_lib.run_app(main)
  except KeyboardInterrupt:
    _interrupted()
