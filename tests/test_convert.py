"""Tests for codajax.convert, without torch.

The reference forward below is written from the authors' PyTorch code
(F.unfold patches, the weighting_f convs, the (d, C_out) view of their
output), in float64 numpy and NCHW, sharing nothing with codajax.
"""

import os
import sys
import types
from unittest import mock

from absl import flags
import chex
import jax
import numpy as np
import pytest

import codajax
from codajax import convert
from codajax import models

ARCH = dict(out_channels=(6, 7, 5), ranks=(4, 5, 3), kernel_sizes=(3, 3, 1),
            strides=(1, 2, 1), paddings=(1, 1, 0))
IMAGE_CHANNELS = 3


def make_model(norm="squash", **kw):
  return models.CoDANet(**ARCH, norm=norm, temperature=3.0, **kw)


def random_state_dict(seed=0, prefix="", arch=ARCH, in_channels=2 * IMAGE_CHANNELS):
  """A state dict in the authors' layout with random float32 weights."""
  rng = np.random.default_rng(seed)
  sd = {}
  c_in = in_channels
  for i, (c_out, r, k) in enumerate(zip(arch["out_channels"], arch["ranks"],
                                        arch["kernel_sizes"])):
    d = c_in * k * k
    sd[f"{prefix}{i}.weight_mod.weighting_f.0.weight"] = (
        rng.normal(size=(r, c_in, k, k)) / np.sqrt(d)).astype(np.float32)
    sd[f"{prefix}{i}.weight_mod.weighting_f.1.weight"] = (
        rng.normal(size=(c_out * d, r, 1, 1)) / np.sqrt(r)).astype(np.float32)
    sd[f"{prefix}{i}.weight_mod.weighting_f.1.bias"] = (
        0.3 * rng.normal(size=(c_out * d,))).astype(np.float32)
    c_in = c_out
  return sd


def unfold(x, k, s, p):
  """torch.nn.functional.unfold for NCHW: (N, C*k*k, H', W'), index c*k*k+ky*k+kx."""
  n, c, h, w = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
  cols = np.empty((n, c, k, k, ho, wo), x.dtype)
  for ky in range(k):
    for kx in range(k):
      cols[:, :, ky, kx] = xp[:, :, ky:ky + s * (ho - 1) + 1:s, kx:kx + s * (wo - 1) + 1:s]
  return cols.reshape(n, c * k * k, ho, wo)


def reference_logits(sd, x_nhwc, norm, temperature, logit_bias, arch=ARCH):
  """The authors' forward pass, float64 numpy, from the torch-layout state dict."""
  sd = {k.removeprefix("module."): np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.transpose(np.asarray(x_nhwc, np.float64), (0, 3, 1, 2))
  h = np.concatenate([x, 1.0 - x], axis=1)  # AddInverse
  for i, (c_out, k, s, p) in enumerate(zip(arch["out_channels"], arch["kernel_sizes"],
                                           arch["strides"], arch["paddings"])):
    B = sd[f"{i}.weight_mod.weighting_f.0.weight"]
    W = sd[f"{i}.weight_mod.weighting_f.1.weight"][:, :, 0, 0]
    bias = sd[f"{i}.weight_mod.weighting_f.1.bias"]
    cols = unfold(h, k, s, p)                                  # (N, d, H', W')
    z = np.einsum("rd,ndhw->nrhw", B.reshape(B.shape[0], -1), cols)
    w = np.einsum("mr,nrhw->nmhw", W, z) + bias[:, None, None]
    n, _, ho, wo = w.shape
    w = w.reshape(n, -1, c_out, ho, wo)                        # channel j*C_out + o
    dot = np.sum(cols[:, :, None] * w, axis=1)                 # (N, C_out, H', W')
    length = np.linalg.norm(w, axis=1)
    if norm == "squash":
      h = dot * length / (1.0 + length ** 2)
    else:
      h = dot / length
  return h.sum(axis=(2, 3)) / temperature + logit_bias


def count(tree):
  return sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(tree))


# Models are hashable, so equal models share one compilation across tests.
apply = jax.jit(lambda model, variables, x: model.apply(variables, x), static_argnums=0)


def write_config(directory, image_size=9):
  path = os.path.join(directory, "cfg.py")
  model = dict(ARCH, norm="squash", temperature=3.0)
  with open(path, "w") as f:
    f.write(
        "import ml_collections\n\n"
        "def get_config(arg=None):\n"
        "  c = ml_collections.ConfigDict()\n"
        f"  c.model = ml_collections.ConfigDict({model!r})\n"
        f"  c.image_size = {image_size}\n"
        "  return c\n")
  return path


class FakeTensor:
  """Duck-types the bits of torch.Tensor that `to_numpy` uses."""

  def __init__(self, a):
    self.a = a

  def detach(self):
    return self

  def cpu(self):
    return self

  def is_floating_point(self):
    return True

  def float(self):
    return FakeTensor(self.a.astype(np.float32))

  def numpy(self):
    return self.a


# Every impl, and the fused impl with every contraction (the materialised impl has none).
VARIANTS = [("materialized", "auto")] + [("fused", c) for c in models.CONTRACTIONS]


class TestFromTorchStateDict:

  @pytest.mark.parametrize("prefix", ["", "module."])
  @pytest.mark.parametrize("norm", ["squash", "l2"])
  def test_logits_match_reference_forward(self, norm, prefix):
    sd = random_state_dict(prefix=prefix)
    model = make_model(norm)
    variables = convert.from_torch_state_dict(model, sd)
    x = np.random.default_rng(1).uniform(size=(2, 9, 7, IMAGE_CHANNELS)).astype(np.float32)
    logits = np.asarray(apply(model, variables, x))
    ref = reference_logits(sd, x, norm, model.temperature, model.logit_bias)
    chex.assert_shape(logits, (2, 5))
    # Dot products must not be negligible next to the bias, or the test is weak.
    assert np.abs(ref - model.logit_bias).max() > 0.1
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

  @pytest.mark.parametrize("impl,contraction", VARIANTS)
  def test_every_impl_matches_reference_forward(self, impl, contraction):
    sd = random_state_dict(seed=2)
    x = np.random.default_rng(3).uniform(size=(2, 9, 7, IMAGE_CHANNELS)).astype(np.float32)
    model = make_model(impl=impl, contraction=contraction)
    ref = reference_logits(sd, x, "squash", 3.0, model.logit_bias)
    logits = apply(model, convert.from_torch_state_dict(model, sd), x)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

  def test_reference_rejects_unpermuted_weights(self):
    # The same test with A, b taken in torch's channel order must fail, or the
    # comparison above could not see a layout error.
    sd = random_state_dict()
    model = make_model()
    variables = convert.from_torch_state_dict(model, sd)
    for i in range(3):
      layer = variables["params"][f"layer_{i}"]
      layer["A"] = sd[f"{i}.weight_mod.weighting_f.1.weight"][:, :, 0, 0].T
      layer["b"] = sd[f"{i}.weight_mod.weighting_f.1.bias"]
    x = np.random.default_rng(1).uniform(size=(2, 9, 7, IMAGE_CHANNELS)).astype(np.float32)
    ref = reference_logits(sd, x, "squash", model.temperature, model.logit_bias)
    assert not np.allclose(apply(model, variables, x), ref, rtol=1e-3)

  def test_tree_matches_init_and_round_trips(self):
    sd = random_state_dict()
    model = make_model()
    variables = convert.from_torch_state_dict(model, sd)
    init = jax.eval_shape(model.init, jax.random.key(0),
                          np.zeros((1, 9, 7, IMAGE_CHANNELS), np.float32))
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, init)
    assert count(variables) == count(sd)
    assert count(variables) == count(init)
    back = convert.to_torch_state_dict(variables)
    assert set(back) == set(sd)
    for k in sd:
      np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

  def test_one_error_lists_missing_unexpected_and_misshaped(self):
    sd = random_state_dict()
    del sd["1.weight_mod.weighting_f.1.bias"]
    sd["3.weight_mod.weighting_f.0.weight"] = np.zeros((2, 5, 1, 1), np.float32)
    sd["2.weight_mod.weighting_f.0.weight"] = np.zeros((8, 7, 1, 1), np.float32)
    with pytest.raises(ValueError) as e:
      convert.from_torch_state_dict(make_model(), sd)
    msg = str(e.value)
    assert "missing key '1.weight_mod.weighting_f.1.bias' (expected shape (378,))" in msg
    assert "unexpected key '3.weight_mod.weighting_f.0.weight'" in msg
    assert ("mis-shaped key '2.weight_mod.weighting_f.0.weight': expected "
            "(3, 7, 1, 1), got (8, 7, 1, 1)") in msg
    assert "3 problem(s)" in msg
    assert "ranks: checkpoint (4, 5, 8, 2), model (4, 5, 3)" in msg
    assert "temperature" in msg

  def test_wrong_preset_is_reported(self):
    with pytest.raises(ValueError, match=r"out_channels: checkpoint \(6, 7, 5\), "
                       r"model \(8, 8, 10\)"):
      convert.from_torch_state_dict(models.tiny(), random_state_dict())

  def test_odd_input_channels_rejected(self):
    sd = random_state_dict(in_channels=3)
    with pytest.raises(ValueError, match="must be even"):
      convert.from_torch_state_dict(make_model(), sd)

  @pytest.mark.parametrize("dtype", [np.int64, np.bool_])
  def test_non_floating_tensors_are_rejected(self, dtype):
    sd = random_state_dict()
    for key in ("0.weight_mod.weighting_f.1.bias", "2.weight_mod.weighting_f.0.weight"):
      sd[key] = sd[key].astype(dtype)
    with pytest.raises(ValueError, match=(
        r"2 non-floating-point parameter tensor\(s\): '0.weight_mod.weighting_f.1.bias' "
        rf"\({np.dtype(dtype)}\), '2.weight_mod.weighting_f.0.weight' \({np.dtype(dtype)}\)")):
      convert.from_torch_state_dict(make_model(), sd)

  def test_missing_first_weight_still_lists_all(self):
    sd = random_state_dict()
    del sd["0.weight_mod.weighting_f.0.weight"]
    with pytest.raises(ValueError) as e:
      convert.from_torch_state_dict(make_model(), sd)
    # C_in is recovered from layer 0's A, so the missing weight's shape is known.
    assert "'0.weight_mod.weighting_f.0.weight' (expected shape (4, 6, 3, 3))" in str(e.value)

  def test_unwrap_and_tensor_conversion(self):
    sd = random_state_dict()
    wrapped = {"epoch": 200,
               "state_dict": {k: FakeTensor(v.astype(np.float16)) for k, v in sd.items()}}
    out = convert.unwrap_state_dict({"model": wrapped})
    assert set(out) == set(sd)
    for k, v in out.items():
      assert v.dtype == np.float32
      np.testing.assert_allclose(v, sd[k], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="state_dict"):
      convert.unwrap_state_dict([1, 2])


class TestCommandLine:

  @pytest.fixture(autouse=True)
  def _tmp(self, tmp_path):
    self.tmp = str(tmp_path)

  def _file(self, name, content="x"):
    path = os.path.join(self.tmp, name)
    with open(path, "w") as f:
      f.write(content)
    return path

  def _flags(self, ckpt, workdir):
    fv = flags.FlagValues()
    convert.define_flags(fv)
    fv(["convert", f"--torch_checkpoint={ckpt}",
        f"--config={write_config(self.tmp)}",
        f"--workdir={workdir}"])
    return fv

  def test_torch_missing_exits_with_install_hint(self):
    ckpt = self._file("model.pkl")
    fv = self._flags(ckpt, os.path.join(self.tmp, "workdir"))
    with mock.patch.dict(sys.modules, {"torch": None}):
      with pytest.raises(SystemExit) as e:
        convert.main(["convert"], flag_values=fv)
    assert "bash launch/setup.sh torch" in str(e.value.code)

  def test_missing_file_exits_clearly(self):
    fv = self._flags("/nonexistent/model.pkl", os.path.join(self.tmp, "workdir"))
    with pytest.raises(SystemExit) as e:
      convert.main(["convert"], flag_values=fv)
    assert "/nonexistent/model.pkl" in str(e.value.code)
    assert "does not exist" in str(e.value.code)

  def test_empty_file_exits_with_one_line(self):
    # Was a bare EOFError from torch.load.
    ckpt = self._file("empty.pt", content="")
    fv = self._flags(ckpt, os.path.join(self.tmp, "workdir"))
    with pytest.raises(SystemExit) as e:
      convert.main(["convert"], flag_values=fv)
    assert str(e.value.code) == (
        f"codajax.convert: PyTorch checkpoint {ckpt!r} is empty (0 bytes): the download "
        "or copy was cut short; fetch it again.")
    assert not os.path.exists(os.path.join(self.tmp, "workdir"))

  def test_end_to_end_with_fake_torch(self):
    sd = random_state_dict(prefix="module.")
    ckpt = self._file("model.pkl")
    workdir = os.path.join(self.tmp, "workdir")
    loads, saves = [], []
    fake_torch = types.ModuleType("torch")

    def load(path, **kw):
      loads.append((path, kw))
      return {"state_dict": sd}
    fake_torch.load = load

    fake_checkpoint = types.ModuleType("codajax.checkpoint")

    def save_imported(wd, params, meta):
      saves.append((wd, params, meta))
      return os.path.join(wd, "imported")
    fake_checkpoint.save_imported = save_imported

    fv = self._flags(ckpt, workdir)
    with mock.patch.dict(sys.modules, {"torch": fake_torch,
                                       "codajax.checkpoint": fake_checkpoint}), \
        mock.patch.object(codajax, "checkpoint", fake_checkpoint, create=True):
      convert.main(["convert"], flag_values=fv)

    assert loads == [(ckpt, {"map_location": "cpu", "weights_only": True})]
    (wd, params, meta), = saves
    assert wd == workdir
    assert meta["source"] == os.path.abspath(ckpt)
    assert tuple(meta["model"]["ranks"]) == ARCH["ranks"]
    expected = convert.from_torch_state_dict(make_model(), sd)["params"]
    chex.assert_trees_all_equal(params, expected)
