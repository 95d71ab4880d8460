"""Batching: a jitted function over host arrays, in batches of one fixed size.

Every caller that runs a jitted function over more rows than one call takes
uses `map_batches`: --mode evaluate's logits and attributions
(`codajax.evaluation`), the masked forwards of pixel removal
(`metrics.pixel_removal_curves`), LIME's classifier (`codajax.attribution`)
and a video's frames (`codajax.video`). It splits the rows into batches of
`batch_size`, pads the last batch to that size by repeating its last row, so
that the function sees one shape and compiles once (each row's output depends
on that row alone, so the padded rows change nothing and are dropped),
places each batch on the mesh (`to_mesh`) when given a sharding, runs the
function, brings the outputs back to the host (`to_host`), drops the padding
and concatenates. All batches are dispatched before the first is fetched, so
the host never waits on the accelerator between batches.

`sum_chunks` is the same idea inside a jitted program: a sum over more terms
than fit in memory at once (occlusion's and RISE's masks, integrated
gradients' steps, `codajax.attribution`) as a scan over fixed-size chunks.

`to_mesh` is the one way host data becomes a global array over the mesh: the
input pipeline's per-host batches and the evaluation's whole arrays alike.
`forward` is the one jitted forward pass (logits) of a model, cached per model
(models are hashable: equal ones share a compilation) and per shape.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np


@functools.partial(jax.jit, static_argnums=0)
def forward(model, variables, x) -> jax.Array:
  """model.apply(variables, x): the logits (N, num_classes), jitted once per model."""
  return model.apply(variables, x)


def to_mesh(tree, sharding, *, per_host: bool = True):
  """Host numpy arrays (a pytree) -> global jax.Arrays laid out by `sharding`.

  per_host=True: each process holds its own rows (the input pipeline's
  batches), and the global array is their concatenation over processes.
  per_host=False: every process holds the whole array (e.g. the test images
  the evaluation reads on every host), which becomes the global array.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, None if per_host else np.shape(x)), tree)


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) jax.Array as a numpy array of its global value."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def padded_size(batch_size: int, sharding=None) -> int:
  """The rows of every call: batch_size, rounded up to a multiple of the mesh
  size with a sharding, so that the batch splits evenly over the devices."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  devices = 1 if sharding is None else sharding.mesh.size
  return batch_size + -batch_size % devices


def map_batches(fn: Callable, *arrays, batch_size: int, sharding=None):
  """fn(*arrays) computed `batch_size` rows at a time: numpy outputs (arrays
  or a pytree of them) with the rows of `arrays` along their first axis.

  arrays: host arrays with the same number of rows (the first axis), the same
  on every process. Every call of fn gets `padded_size(batch_size, sharding)`
  rows: the last batch (and, with a sharding, every batch) is padded by
  repeating its last row. sharding: a NamedSharding over the mesh's 'data'
  axis to place each batch with (`to_mesh`), or None to pass numpy arrays.
  """
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if n == 0 or any(len(a) != n for a in arrays):
    raise ValueError(f"map_batches: needs arrays with the same number of rows (>= 1), got "
                     f"shapes {[a.shape for a in arrays]}.")
  size = padded_size(batch_size, sharding)
  outs, rows = [], []
  for start in range(0, n, batch_size):
    batch = [_pad(a[start:start + batch_size], size) for a in arrays]
    if sharding is not None:
      batch = to_mesh(batch, sharding, per_host=False)
    outs.append(fn(*batch))  # Dispatched; fetched below, after the last one.
    rows.append(min(batch_size, n - start))
  return jax.tree.map(lambda *o: np.concatenate([to_host(a)[:k] for a, k in zip(o, rows)]),
                      *outs)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
  """a with its last row repeated up to `size` rows."""
  return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a


def sum_chunks(fn, xs, chunk: int) -> jax.Array:
  """sum_i fn(xs[i]) inside a jitted program, `chunk` rows of xs at a time.

  The traced counterpart of `map_batches`, for a sum whose terms do not fit
  in memory at once (the masks of occlusion and RISE, the steps of integrated
  gradients): a lax.scan over chunks of xs (a pytree of arrays with the same
  first axis), fn mapping a chunk to its sum. The last chunk is padded with
  zeros, which fn must map to zero.
  """
  m = jax.tree.leaves(xs)[0].shape[0]
  chunk = min(int(chunk), m)
  pad = -m % chunk
  xs = jax.tree.map(lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
                    .reshape(-1, chunk, *a.shape[1:]), xs)
  out = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xs))
  total, _ = jax.lax.scan(lambda acc, c: (acc + fn(c), None),
                          jnp.zeros(out.shape, out.dtype), xs)
  return total
