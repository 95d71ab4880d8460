"""Downloads, pinned by the sha256 recorded at the first one.

`fetch(url, path)` downloads with `torch.hub.download_url_to_file` (a
temporary file, renamed when complete; a progress bar) and, if a hash was
recorded beside the file (`<folder>/sha256`, in `sha256sum -c` format),
refuses a download that differs from it: nothing of it is kept. The hash is
recorded by the caller with `record_sha256`, once the file passed the
caller's checks of its content (trust on first use: the authors of the
pretrained nets publish no hashes). `check_cached` checks a file kept from
before. Every failure is a one-line `DownloadError` that says what to do.

`fetch` needs torch (the callers that download require it anyway).
"""

import contextlib
import hashlib
import http.client
import os
import socket
import sys
from typing import Optional

from codajax import workdir as workdir_lib

SHA256 = "sha256"     # <folder>/sha256: the recorded hash of the file beside it.
TIMEOUT_S = 60.0      # Per network operation, not for the whole file.


class DownloadError(RuntimeError):
  """A download that failed or was refused, in one line with the fix."""


def fetch(url: str, path: str, *, progress: bool = True) -> str:
  """Downloads `url` to `path`; returns the file's sha256.

  Raises:
    DownloadError: the download failed, or its sha256 is not the one
      recorded (`recorded_sha256`); nothing of it was kept.
  """
  import torch.hub  # pylint: disable=g-import-not-at-top
  recorded = recorded_sha256(path)
  if progress:
    sys.stderr.write(f"codajax: downloading {url} to {path}\n")
  with workdir_lib.atomic_path(path) as tmp:
    try:
      with _network_timeout(TIMEOUT_S):
        torch.hub.download_url_to_file(url, tmp, progress=progress)
    except (OSError, ValueError, http.client.HTTPException) as e:
      raise DownloadError(
          f"cannot download {url} ({_reason(e)}); nothing was kept. Check the network "
          f"connection (or proxy) and the free space in {os.path.dirname(path)} and run "
          f"again, or download the file by hand to {path}.") from e
    sha = file_sha256(tmp)
    if recorded and sha != recorded:
      raise DownloadError(
          f"the downloaded file has sha256 {sha}, not the {recorded} recorded at its first "
          f"download ({sha256_path(path)}): the file behind {url} has changed or arrived "
          "damaged, and was not kept. Run again to retry; to accept the new file, delete "
          f"{sha256_path(path)}.")
  return sha


def check_cached(path: str) -> str:
  """The sha256 of the file kept at `path`, checked against the recorded one if any."""
  sha, recorded = file_sha256(path), recorded_sha256(path)
  if recorded and sha != recorded:
    raise DownloadError(
        f"the cached {path} has sha256 {sha}, not the {recorded} recorded at its first "
        f"download ({sha256_path(path)}): it was changed or damaged. Delete it to "
        "download it again.")
  return sha


def sha256_path(path: str) -> str:
  return os.path.join(os.path.dirname(path), SHA256)


def recorded_sha256(path: str) -> Optional[str]:
  try:
    with open(sha256_path(path)) as f:
      return f.read().split()[0]
  except (FileNotFoundError, IndexError):
    return None


def record_sha256(path: str, sha: str) -> None:
  """Writes `<sha>  <file name>` (sha256sum's format) atomically."""
  with workdir_lib.atomic_path(sha256_path(path)) as tmp, open(tmp, "w") as f:
    f.write(f"{sha}  {os.path.basename(path)}\n")


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _network_timeout(seconds: float):
  """torch.hub opens its connection without a timeout, so a stalled server
  would hang the download for good: a default for the sockets made meanwhile."""
  before = socket.getdefaulttimeout()
  socket.setdefaulttimeout(seconds)
  try:
    yield
  finally:
    socket.setdefaulttimeout(before)


def _reason(e: BaseException) -> str:
  """URLError hides the cause in .reason; a socket timeout says only 'timed out'."""
  reason = getattr(e, "reason", None) or e
  return str(reason) or type(reason).__name__
