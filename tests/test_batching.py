"""Tests for codajax.batching: fixed-size batches, padding, the mesh, the forward."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from codajax import batching
from codajax import models


def data_sharding(devices=None):
  return NamedSharding(Mesh(np.array(devices or jax.devices()), ("data",)), P("data"))


def test_map_batches_equals_one_call_and_compiles_once():
  """13 rows in batches of 5: three calls of 5 rows each (the last padded by
  repeating its last row), one trace, the same rows as one call over all."""
  chex.clear_trace_counter()
  seen = []

  def plain(x, k):
    return x * 2.0 + k[:, None], (x.sum(axis=1), k)

  fn = jax.jit(chex.assert_max_traces(plain, n=1))

  def recording(x, k):
    seen.append((np.asarray(x).copy(), np.asarray(k).copy()))
    return fn(x, k)

  x = np.arange(26, dtype=np.float32).reshape(13, 2)
  k = np.arange(13, dtype=np.int32)
  out, (sums, ks) = batching.map_batches(recording, x, k, batch_size=5)
  want, (want_sums, want_ks) = plain(x, k)
  np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(sums, want_sums)
  np.testing.assert_array_equal(ks, want_ks)
  assert isinstance(out, np.ndarray) and out.shape == (13, 2)
  assert [len(b[0]) for b in seen] == [5, 5, 5]
  np.testing.assert_array_equal(seen[-1][1], [10, 11, 12, 12, 12])  # Padding: the last row.


def test_map_batches_over_the_mesh_rounds_the_batch_up_to_the_devices():
  """8 devices, batch_size 3: every call gets 8 rows sharded over 'data'."""
  sharding = data_sharding()
  devices = sharding.mesh.size
  shapes = []

  def fn(x):
    shapes.append((x.shape, x.sharding))
    return jnp.square(x)

  x = np.arange(7, dtype=np.float32)
  np.testing.assert_array_equal(batching.map_batches(fn, x, batch_size=3, sharding=sharding),
                                x ** 2)
  size = batching.padded_size(3, sharding)
  assert size % devices == 0 and 3 <= size < 3 + devices
  assert len(shapes) == 3 and all(shape == (size,) and s.is_equivalent_to(sharding, 1)
                                  for shape, s in shapes)
  assert batching.padded_size(5) == 5  # Without a mesh: the batch size.


def test_map_batches_refuses_arrays_of_different_lengths():
  with pytest.raises(ValueError, match="same number of rows"):
    batching.map_batches(lambda a, b: a, np.zeros(3), np.zeros(4), batch_size=2)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    batching.map_batches(lambda a: a, np.zeros(3), batch_size=0)


def test_to_mesh_places_whole_and_per_host_arrays():
  sharding = data_sharding()
  x = np.arange(16, dtype=np.float32).reshape(8, 2)
  for per_host in (True, False):  # One process: its rows are all the rows.
    got = batching.to_mesh({"image": x}, sharding, per_host=per_host)["image"]
    assert got.sharding.is_equivalent_to(sharding, 2) and got.shape == x.shape
    np.testing.assert_array_equal(batching.to_host(got), x)
    assert len(got.addressable_shards) == sharding.mesh.size


def test_forward_is_model_apply_and_compiled_once_per_model():
  model = models.tiny()
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  before = batching.forward._cache_size()
  np.testing.assert_array_equal(batching.forward(model, variables, x),
                                jax.jit(model.apply)(variables, x))
  batching.forward(models.tiny(), variables, x + 1.0)  # An equal model: no new program.
  assert batching.forward._cache_size() == before + 1


def test_sum_chunks_pads_with_zeros_and_sums_every_term():
  xs = jnp.arange(1.0, 8.0)  # 7 terms in chunks of 3: the last one padded by 2 zeros.
  total = jax.jit(lambda xs: batching.sum_chunks(lambda c: (c ** 2).sum(), xs, 3))(xs)
  assert float(total) == float((xs ** 2).sum())
  # A chunk larger than the terms is one chunk.
  assert float(batching.sum_chunks(lambda c: c.sum(), xs, 100)) == 28.0
