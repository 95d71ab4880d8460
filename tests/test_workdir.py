"""Tests of codajax.workdir: the lock between processes, writability, tidying."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from codajax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A second process that takes the lock, says so, and waits to be killed.
_HOLDER = textwrap.dedent("""
    import sys, time
    from codajax import workdir
    wd = workdir.Workdir(sys.argv[1], sys.argv[1] + "/checkpoints")
    wd.open()
    print("locked", flush=True)
    time.sleep(600)
""")


def new(path):
  return workdir_lib.Workdir(str(path), str(path / "checkpoints"))


@pytest.fixture
def holder(tmp_path):
  """Starts another process holding tmp_path/run; yields (path, process)."""
  path = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    yield path, proc
  finally:
    proc.kill()
    proc.wait()


def test_a_second_run_fails_with_one_line_naming_the_holder(holder):
  path, proc = holder
  with pytest.raises(workdir_lib.WorkdirError) as e:
    new(path).open()
  message = str(e.value)
  assert message.startswith(f"--workdir={path} is in use by another codajax run (pid {proc.pid} on ")
  assert message.endswith("Wait for it to end, stop it, or choose another --workdir.")
  assert "\n" not in message


def test_the_lock_is_released_when_the_holder_is_killed(holder):
  """flock: the OS releases it even on SIGKILL, so a crash never blocks a rerun."""
  path, proc = holder
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  wd = new(path)
  wd.open()  # The stale lock file is taken over.
  with pytest.raises(workdir_lib.WorkdirError, match=f"pid {os.getpid()} on "):
    new(path).open()  # Also within one process: a second open is refused.
  wd.close()
  assert not os.path.exists(path / workdir_lib.LOCK_FILE)
  new(path).open()


def test_close_tidy_removes_only_what_the_run_created_empty(tmp_path):
  fresh = tmp_path / "fresh"
  wd = new(fresh)
  wd.open()
  assert os.listdir(fresh) == [workdir_lib.LOCK_FILE]
  wd.close(tidy=True)
  assert not fresh.exists()  # Created by this run, left empty: gone.

  kept = tmp_path / "kept"
  (kept / "checkpoints").mkdir(parents=True)
  wd = new(kept)
  wd.open()
  wd.close(tidy=True)
  assert sorted(os.listdir(kept)) == ["checkpoints"]  # Existed before: kept.

  used = tmp_path / "used"
  wd = new(used)
  wd.open()
  (used / "checkpoints" / "1").mkdir(parents=True)
  wd.close(tidy=True)
  assert sorted(os.listdir(used)) == ["checkpoints"]  # Not empty: never removed.
  assert os.listdir(used / "checkpoints") == ["1"]


def test_writable_names_the_problem(tmp_path, monkeypatch):
  assert new(tmp_path / "a" / "b").writable() is None  # Creatable.
  (tmp_path / "file").write_text("x")
  assert new(tmp_path / "file").writable() == "it exists and is not a directory"
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").write_text("x")
  assert new(tmp_path / "run").writable().endswith("checkpoints exists and is not a directory")
  # An unwritable checkpoints/ directory (simulated: the tests may run as root).
  (tmp_path / "ro" / "checkpoints").mkdir(parents=True)
  probe = workdir_lib._probe
  monkeypatch.setattr(workdir_lib, "_probe", lambda d: (
      "Permission denied" if d.endswith("checkpoints") else probe(d)))
  wd = new(tmp_path / "ro")
  with pytest.raises(workdir_lib.WorkdirError) as e:
    wd.check_writable()
  assert str(e.value) == (
      f"--workdir={tmp_path / 'ro'} cannot be written: {tmp_path / 'ro' / 'checkpoints'} is "
      "not writable (Permission denied). Fix the permissions or choose another --workdir.")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only directory")
def test_a_read_only_checkpoint_directory_is_not_writable(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  os.chmod(tmp_path / "checkpoints", 0o555)
  try:
    assert "Permission denied" in new(tmp_path).writable()
  finally:
    os.chmod(tmp_path / "checkpoints", 0o755)


def test_exit_at_once_tidies_the_workdir_and_prints_one_line(tmp_path):
  """Issue 17, item 5: a second Ctrl-C exits at once (os._exit: no teardown while
  XLA or Orbax threads run) and leaves no lock file nor a workdir it created empty."""
  path = tmp_path / "run"
  script = textwrap.dedent("""
      import sys
      from codajax import workdir
      wd = workdir.Workdir(sys.argv[1], sys.argv[1] + "/checkpoints")
      wd.open()
      print("buffered", end="")
      workdir.exit_at_once(130, "codajax: interrupted by Ctrl-C; nothing was written.")
      print("never")
  """)
  out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 130
  assert out.stdout == "buffered"  # Flushed first; nothing after.
  assert out.stderr == "codajax: interrupted by Ctrl-C; nothing was written.\n"
  assert not path.exists()
