"""The workdir of a run: writable, held by one run at a time, left clean.

`Workdir(path).check_writable()` says, before any work, whether the run can
write there. `open()` (process 0 only) creates the directory if needed and
takes an exclusive lock, `<workdir>/.codajax.lock`: an advisory `flock`, so
the operating system releases it when the process ends, even on SIGKILL or a
crash. The file names the holder for the one line a second run prints.
`close(tidy=True)` removes what the run created and left empty (the lock
file, an empty `checkpoints/`, the directory itself if this run made it),
for a run that failed before its first step. Only empty directories are
ever removed (`os.rmdir`), so no data or checkpoint can be lost.

`exit_at_once(status, line)` ends the process at once (a second Ctrl-C, or a
signal before the run started): it closes and tidies the open workdirs, prints
its one line and leaves with `os._exit`, so that no thread of XLA, TensorFlow
or Orbax runs during the interpreter's teardown (that crashed natively).
"""

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from typing import Iterator, Optional

LOCK_FILE = ".codajax.lock"
_OPEN = []  # The open Workdirs of this process, for exit_at_once.
_EXITING = threading.Lock()  # Held by the exit_at_once that ends the process.


class WorkdirError(RuntimeError):
  """A workdir this run cannot use, with what to do about it."""


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def _probe(directory: str) -> Optional[str]:
  """None if a file can be created in `directory`, else the reason."""
  try:
    fd, name = tempfile.mkstemp(prefix=".codajax-write-test-", dir=directory)
    os.close(fd)
    os.remove(name)
    return None
  except OSError as e:
    return e.strerror or str(e)


class Workdir:
  """See the module docstring. One instance per run."""

  def __init__(self, path: str, checkpoint_dir: str):
    self.path = os.path.abspath(path)
    self.checkpoint_dir = checkpoint_dir
    self._fd = None
    self._opened = self._created = self._had_checkpoints = False

  def writable(self) -> Optional[str]:
    """None if the run can write its files, else why not (nothing is created)."""
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      return "it exists and is not a directory"
    for d in (self.path, self.checkpoint_dir):
      if os.path.isdir(d):
        reason = _probe(d)
        if reason:
          return f"{d} is not writable ({reason})"
      elif os.path.exists(d):
        return f"{d} exists and is not a directory"
    if not os.path.exists(self.path):
      parent = _nearest_existing(self.path)
      reason = _probe(parent) if os.path.isdir(parent) else "not a directory"
      if reason:
        return f"cannot create it in {parent} ({reason})"
    return None

  def check_writable(self) -> None:
    reason = self.writable()
    if reason:
      raise WorkdirError(f"--workdir={self.path} cannot be written: {reason}. Fix the "
                         "permissions or choose another --workdir.")

  def open(self) -> None:
    """Creates the directory if needed and takes the lock (process 0 only)."""
    self._opened, self._created = True, not os.path.exists(self.path)
    os.makedirs(self.path, exist_ok=True)
    self._had_checkpoints = os.path.exists(self.checkpoint_dir)
    path = os.path.join(self.path, LOCK_FILE)
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace")
        os.close(fd)
        raise WorkdirError(
            f"--workdir={self.path} is in use by another codajax run ({_describe(holder)}). "
            "Wait for it to end, stop it, or choose another --workdir.") from None
      # The previous holder unlinks the file when it releases: if it did so
      # between our open and our lock, lock the new file instead.
      try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    self._fd = fd
    _OPEN.append(self)

  @property
  def locked(self) -> bool:
    """Whether this run holds the workdir's lock (`open` succeeded)."""
    return self._fd is not None

  def close(self, tidy: bool = False) -> None:
    """Releases the lock; `tidy`: also removes what this run created empty."""
    if self._fd is not None:
      os.unlink(os.path.join(self.path, LOCK_FILE))  # Before unlocking (see `open`).
      os.close(self._fd)
      self._fd = None
      _OPEN.remove(self)
    if tidy and self._opened:
      self._tidy()

  def _tidy(self) -> None:
    dirs = [] if self._had_checkpoints else [self.checkpoint_dir]
    dirs += [self.path] if self._created else []
    for d in dirs:
      try:
        os.rmdir(d)  # Only ever removes an empty directory.
      except OSError:
        pass


def exit_at_once(status: int, line: str) -> None:
  """Ends the process now with `status` and one line on stderr (see the module
  docstring). A save in flight stays a temporary folder, which the next run
  removes (`checkpoint.remove_unfinished`). Thread-safe: the first caller
  exits, a second one waits for that."""
  if not _EXITING.acquire(blocking=False):
    threading.Event().wait()  # Forever: the first caller ends the process.
  for wd in list(_OPEN):
    try:
      wd.close(tidy=True)
    except OSError:
      pass  # Exiting anyway: the operating system releases the lock.
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except (OSError, RuntimeError, ValueError):
    pass  # E.g. a reentrant flush, when the signal came in the middle of a write.
  os.write(2, (line + "\n").encode(errors="replace"))
  os._exit(status)  # pylint: disable=protected-access


def _describe(holder: str) -> str:
  try:
    h = json.loads(holder)
    return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"


@contextlib.contextmanager
def atomic_path(final_path: str) -> Iterator[str]:
  """Yields a temporary path beside `final_path` for the block to write a file
  or a folder at; renames it to `final_path` when the block ends, and removes
  it if the block (or the rename) raises.

  So neither a reader nor a run killed midway sees a half-written
  `final_path`: it holds the old content or the whole new one. The temporary
  name is hidden (a leading dot), unique, in the same folder (os.replace does
  not cross file systems) and keeps the suffix (ffmpeg picks the container
  from it). Nothing is created there: a file gets the usual permissions
  (mkstemp's would stay private, 0600) and a writer can make a folder. A file
  is synced to disk before the rename; a folder replaces only a missing or
  empty `final_path` (os.replace's rule; else its OSError propagates).
  """
  directory, name = os.path.split(os.path.abspath(final_path))
  tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp{os.path.splitext(name)[1]}")
  try:
    yield tmp
    if os.path.isfile(tmp):
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final_path)
  finally:
    if os.path.isdir(tmp) and not os.path.islink(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
      os.remove(tmp)
