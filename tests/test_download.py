"""Tests of codajax.download (through file:// URLs, no network) and of the
atomic write that it and every writer of a result file share,
`workdir.atomic_path`. The pinned-hash policy as the pretrained nets use it
is tested in tests/test_pretrained.py."""

import hashlib
import os
import stat

import pytest

from codajax import download
from codajax import workdir


def test_atomic_path_renames_a_whole_file_with_the_usual_permissions(tmp_path):
  final = tmp_path / "clip.mp4"
  final.write_text("old")
  with workdir.atomic_path(str(final)) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".mp4")
    with open(tmp, "w") as f:
      f.write("new")
    assert final.read_text() == "old"  # Untouched until the block ends.
  assert final.read_text() == "new" and os.listdir(tmp_path) == ["clip.mp4"]
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(final.stat().st_mode) == 0o666 & ~umask  # Not mkstemp's 0600.


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_atomic_path_leaves_nothing_on_error(tmp_path, kind):
  final = tmp_path / "out"
  with pytest.raises(KeyboardInterrupt):
    with workdir.atomic_path(str(final)) as tmp:
      if kind == "file":
        with open(tmp, "w") as f:
          f.write("half")
      else:
        os.makedirs(os.path.join(tmp, "checkpoints", "0"))
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == []


def test_atomic_path_moves_a_folder_into_place(tmp_path):
  with workdir.atomic_path(str(tmp_path / "orbax")) as tmp:
    os.makedirs(os.path.join(tmp, "checkpoints"))
  assert os.listdir(tmp_path) == ["orbax"] and os.listdir(tmp_path / "orbax") == ["checkpoints"]


def _served(tmp_path, content: bytes):
  path = tmp_path / "served"
  path.write_bytes(content)
  return "file://" + str(path)


def test_fetch_returns_the_sha256_and_records_nothing(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  target = str(cache / "file.bin")
  sha = download.fetch(_served(tmp_path, b"abc" * 1000), target, progress=False)
  assert sha == hashlib.sha256(b"abc" * 1000).hexdigest() == download.file_sha256(target)
  assert os.listdir(cache) == ["file.bin"] and download.recorded_sha256(target) is None


def test_fetch_refuses_another_file_than_the_recorded_one_and_keeps_the_old(tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  target = str(cache / "file.bin")
  sha = download.fetch(_served(tmp_path, b"first"), target, progress=False)
  download.record_sha256(target, sha)
  assert (cache / "sha256").read_text() == f"{sha}  file.bin\n"
  with pytest.raises(download.DownloadError, match=f"^the downloaded file has sha256 "
                     f"{hashlib.sha256(b'second').hexdigest()}, not the {sha} recorded"):
    download.fetch(_served(tmp_path, b"second"), target, progress=False)
  assert (cache / "file.bin").read_bytes() == b"first"
  assert sorted(os.listdir(cache)) == ["file.bin", "sha256"]
  assert download.check_cached(target) == sha
  (cache / "file.bin").write_bytes(b"changed")
  with pytest.raises(download.DownloadError, match="was changed or damaged"):
    download.check_cached(target)
