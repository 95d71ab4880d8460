"""Test setup: 8 fake CPU devices, the repository on sys.path, exact matmuls.

Everything here must happen before JAX creates its backends, so it runs at
conftest import time, before any test module imports jax.
"""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

_NUM_DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={_NUM_DEVICES}"


def _add_xla_flag(name: str, flag: str) -> None:
  flags = os.environ.get("XLA_FLAGS", "")
  if name not in flags:  # A value set by the caller wins.
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


# Older JAX reads the XLA flag; newer JAX has jax_num_cpu_devices. Set both.
_add_xla_flag("xla_force_host_platform_device_count", _FLAG)
# The tests run many small programs once each, so XLA:CPU compile time (LLVM
# optimisation) dominates the suite; -O0 code gen roughly halves it. It does
# not change float semantics (fast-math stays off).
_add_xla_flag("xla_backend_optimization_level",
              "--xla_backend_optimization_level=0")


def _share_a_compilation_cache() -> None:
  """One persistent XLA compilation cache for the whole run: this process, the
  xdist workers and every subprocess (CLI runs, notebook kernels) read it
  through JAX_COMPILATION_CACHE_DIR. The tests build the same tiny programs
  many times over (each train_and_evaluate call jits anew, each subprocess
  starts cold), and XLA:CPU compilation is most of a tiny run's time; caching
  changes no result. The process that creates the directory (the xdist
  controller, or pytest itself without xdist) removes it at exit.
  CODAJAX_TEST_XLA_CACHE=0 turns it off (to measure what it saves)."""
  if os.environ.get("CODAJAX_TEST_XLA_CACHE") == "0" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # Off, or the caller chose a cache.
  path = os.environ.get("CODAJAX_TEST_XLA_CACHE")
  if not path:  # The first process of the run: make it, share it, remove it at exit.
    path = tempfile.mkdtemp(prefix="codajax-xla-cache-")
    os.environ["CODAJAX_TEST_XLA_CACHE"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


_share_a_compilation_cache()

# Import the checkout's codajax even when it is not pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

jax.config.update("jax_num_cpu_devices", _NUM_DEVICES)
# Tests compare independent float32 computations (e.g. explicit composition vs
# autodiff); default (bf16-pass) matmuls on some backends would need loose
# tolerances that hide real errors.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def perturbed_init():
  """init(model, shape, seed=0, scale=0.05): the model's initial variables plus
  noise, so that the bias b is not zero (it is initialised to 0)."""

  def init(model, shape, seed=0, scale=0.05):
    x = jnp.zeros((1, *shape[1:]), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(seed), x)
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [
        l + scale * jnp.std(l + 1.0) * jax.random.normal(k, l.shape)
        for l, k in zip(leaves, keys)])

  return init
