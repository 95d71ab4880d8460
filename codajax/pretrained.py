r"""The authors' released CoDA-Nets, converted to codajax, in one call.

  from codajax import pretrained
  model, variables = pretrained.load("9L-S-CoDA-SQ-1000")

`model.apply(variables, images)` then gives the logits of (N, H, W, 3) images
in [0, 1]. For the command line, the same net as a workdir:

  python -m codajax.pretrained 9L-S-CoDA-SQ-1000 --workdir workdirs/sq-1000
  python -m codajax.main --config configs/cifar10.py:9L-S-CoDA-SQ-1000 \
      --workdir workdirs/sq-1000 --mode accuracy

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

It downloads the file (`codajax.download`), converts it (`codajax.convert`),
checks the result against a torch forward of the authors' network, and keeps
it, so later loads need neither torch nor the network. The authors publish no
hashes, so the file's sha256 is recorded at its first download that passes
the checks: a later download that differs is an error rather than, silently,
another model. A file that fails a check before its hash was recorded is
removed, so the next run downloads it again; a failed run leaves no folder it
created empty.

Names are matched case-insensitively ("9l-s-coda-sq-1000"). Every failure is
a `PretrainedError`: one line naming the model and the fix. On the command
line, Ctrl-C (during the imports, the download or the conversion) prints one
line and exits with status 130, leaving no partial file.
"""

import os
import signal

from codajax import workdir as workdir_lib  # The standard library only: fast.

INTERRUPTED = ("codajax.pretrained: interrupted (Ctrl-C); no partial file was kept. Run the "
               "same command again.")

if __name__ == "__main__":
  # Before the imports below (jax, orbax: seconds), which Ctrl-C would
  # otherwise break with a long traceback: one line and status 130 (128 +
  # SIGINT) at once, without the teardown of XLA's and torch's threads.
  signal.signal(signal.SIGINT, lambda *_: workdir_lib.exit_at_once(130, INTERRUPTED))

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import dataclasses
import tempfile
from typing import Any, Optional

import jax
import numpy as np

from codajax import architectures
from codajax import batching
from codajax import checkpoint
from codajax import cli
from codajax import config_lib
from codajax import convert
from codajax import download
from codajax import models

CACHE_ENV = "CODAJAX_CACHE"
DEFAULT_CACHE = "~/.cache/codajax"
CONVERTED = "orbax"        # <cache>/<name>/orbax: the converted workdir.
RTOL = 1e-4                # Of the import check, relative to the largest evidence.


class PretrainedError(RuntimeError):
  """A pretrained model that cannot be loaded, and what to do about it, in one
  line (whitespace collapsed): the command line prints it as is."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))

  def _render_traceback_(self):  # IPython (notebooks): the line, no traceback.
    return [f"PretrainedError: {self}"]


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
  --mode accuracy` (or explain, evaluate) then uses it. The workdir must hold no
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
  try:
    sha = (download.check_cached(path) if os.path.exists(path)
           else download.fetch(url, path, progress=progress))
  except download.DownloadError as e:
    raise PretrainedError(f"{entry.name}: {e}") from e
  verified = download.recorded_sha256(path) is not None
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
    download.record_sha256(path, sha)
  meta = {"pretrained": entry.name, "config": entry.config, "source": url, "sha256": sha,
          "model": model_config(entry.name).to_dict()}
  converted = os.path.join(directory, CONVERTED)
  try:  # Written aside, then renamed: a crash never leaves a half-written entry.
    with workdir_lib.atomic_path(converted) as tmp:
      checkpoint.save_imported(tmp, variables["params"], meta)
  except OSError:
    if not os.path.isdir(converted):
      raise
    # Another process converted it meanwhile; use theirs.


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
        "weights_only=True) refused it), so not the authors' file: perhaps a download "
        f"cut short or a file host's error page; {fix}.") from e


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
    got = np.asarray(batching.forward(plain, variables, x), np.float64)
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
  x = jax.ShapeDtypeStruct((1, entry.image_size, entry.image_size, 3), np.float32)
  try:
    _, params, meta = checkpoint.load_params(converted, model, x)
  except checkpoint.CheckpointError as e:
    raise PretrainedError(
        f"{entry.name}: the converted copy {converted} is unusable ({e}); delete it and run "
        "again (it is rebuilt from the cached download).") from e
  return params, meta


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
        "--mode accuracy")


if __name__ == "__main__":
  define_flags()
  # From here on Ctrl-C raises KeyboardInterrupt, so that a download removes
  # its partial file on the way out; then one line and 130.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    cli.run_app(main)
  except KeyboardInterrupt:
    workdir_lib.exit_at_once(130, INTERRUPTED)
