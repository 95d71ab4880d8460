"""Import the authors' PyTorch CoDA-Net checkpoints (github.com/moboehle/CoDA-Nets).

  python -m codajax.convert --torch_checkpoint=model_epoch_200.pkl \\
      --config=configs/cifar10.py:9L-S-CoDA-SQ-1000 --workdir=/tmp/9l-s-sq-1000

The PyTorch model is an nn.Sequential of CoDA layers followed by a sum pool
and a `FinalLayer`; `torch.save(model.state_dict())` stores, for layer i,

  "{i}.weight_mod.weighting_f.0.weight"  (R, C_in, k, k)   the k x k conv to rank R,
  "{i}.weight_mod.weighting_f.1.weight"  (C_out*d, R, 1, 1) the 1x1 conv to w,
  "{i}.weight_mod.weighting_f.1.bias"    (C_out*d,),

with d = C_in*k*k and the C_out*d channels ordered j*C_out + o (the torch code
views them as (d, C_out)), j = c*k*k + ky*k + kx the F.unfold patch index. A
DataParallel model prefixes every key with "module.". codajax keeps
B (k, k, C_in, R) HWIO and A (R, C_out*d), b (C_out*d,) with index o*d + j
(see `codajax.dau`), so the conversion transposes B and regroups A and b.

Nothing else is stored: strides, paddings, the norm, the temperature T and the
logit bias live in the authors' experiment parameters (T is the number in the
run name, e.g. 9L-S-CoDA-SQ-1000 has T = 1000), so the config must give them.
Layer 0 sees the encoded image [x, 1 - x] (the authors' `AddInverse`), so its
C_in is twice the number of image channels.

`from_torch_state_dict` and `to_torch_state_dict` need neither torch nor flags;
only `load_torch_state_dict` (and so the command line) needs torch.
"""

import os
import pickle
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np

from codajax import batching
from codajax import cli
from codajax import models

INSTALL_HINT = cli.install_hint("torch")
PREFIX = "module."
# Keys under which training scripts commonly nest the state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_TORCH_NAMES = {"B": "{i}.weight_mod.weighting_f.0.weight",
                "A": "{i}.weight_mod.weighting_f.1.weight",
                "b": "{i}.weight_mod.weighting_f.1.bias"}
_LAYER_KEY = re.compile(r"^(\d+)\.weight_mod\.weighting_f\.[01]\.(weight|bias)$")

Shape = tuple[Optional[int], ...]


def torch_key(layer: int, name: str) -> str:
  """The state-dict key of codajax parameter `name` ("B", "A", "b") of `layer`."""
  return _TORCH_NAMES[name].format(i=layer)


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (duck-typed, no torch import) or array-like as numpy."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if getattr(value, "is_floating_point", lambda: False)():
      value = value.float()  # bfloat16/float16 tensors; bfloat16 has no numpy dtype.
    return value.numpy()
  return np.asarray(value)


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """The state dict inside {"state_dict": ...} / {"model": ...} wrappers, as numpy."""
  while isinstance(obj, Mapping):
    inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if not inner:
      break
    obj = obj[inner[0]]
  if not isinstance(obj, Mapping):
    raise ValueError(
        f"Expected a PyTorch state dict (a mapping from names to tensors), got "
        f"{type(obj).__name__}. Save the model with torch.save(model.state_dict(), path).")
  return {str(k): to_numpy(v) for k, v in obj.items()}


def expected_torch_shapes(model: models.CoDANet,
                          in_channels: Optional[int]) -> dict[str, Shape]:
  """Every state-dict key the model needs and its shape (None where C_in is unknown)."""
  shapes = {}
  c_in = in_channels
  for i, (c_out, r, k) in enumerate(zip(model.out_channels, model.ranks,
                                        model.kernel_sizes)):
    c_out, r, k = int(c_out), int(r), int(k)
    d = None if c_in is None else c_in * k * k
    shapes[torch_key(i, "B")] = (r, c_in, k, k)
    shapes[torch_key(i, "A")] = (None if d is None else c_out * d, r, 1, 1)
    shapes[torch_key(i, "b")] = (None if d is None else c_out * d,)
    c_in = c_out
  return shapes


def checkpoint_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """What a state dict says about the net: per-layer out_channels, ranks, kernels.

  Also `in_channels` of layer 0 (2x the image channels). Entries that cannot be
  read (missing or odd-shaped tensors) are None. Keys may carry "module.".
  """
  arrays = _strip_prefix(dict(state_dict))[0]
  layers = sorted({int(m.group(1)) for m in map(_LAYER_KEY.match, arrays) if m})
  arch = {"out_channels": [], "ranks": [], "kernel_sizes": [], "in_channels": None}
  for i in range(layers[-1] + 1 if layers else 0):
    B, A = arrays.get(torch_key(i, "B")), arrays.get(torch_key(i, "A"))
    r = c_in = k = c_out = None
    if B is not None and np.ndim(B) == 4:
      r, c_in, k = np.shape(B)[0], np.shape(B)[1], np.shape(B)[2]
      if A is not None and np.ndim(A) >= 1 and np.shape(A)[0] % (c_in * k * k) == 0:
        c_out = np.shape(A)[0] // (c_in * k * k)
    if i == 0:
      arch["in_channels"] = c_in
    arch["out_channels"].append(c_out)
    arch["ranks"].append(r)
    arch["kernel_sizes"].append(k)
  return {f: tuple(v) if isinstance(v, list) else v for f, v in arch.items()}


def from_torch_state_dict(model: models.CoDANet,
                          state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Flax variables {"params": ...} (float32 numpy) computing the torch net's function.

  Args:
    model: the CoDANet the checkpoint was trained as (its out_channels, ranks and
      kernel_sizes must match; strides, paddings, norm, temperature and
      logit_bias are not stored in the checkpoint and are taken as given).
    state_dict: the authors' `model.state_dict()`, torch tensors or arrays,
      keys optionally prefixed with "module.".

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key at once.
  """
  arrays, problems = _strip_prefix({k: to_numpy(v) for k, v in state_dict.items()})
  _check_floating(arrays)
  in_channels = _in_channels(model, arrays)
  if in_channels is None:
    problems.append(
        f"cannot tell the input channel count: {torch_key(0, 'B')!r} is missing or "
        "not 4-D, so layer 0's shapes are partly unknown (shown as ?).")
  elif in_channels % 2:
    problems.append(
        f"layer 0 takes {in_channels} input channels, but codajax feeds it "
        "[x, 1 - x], so it must be even (6 for RGB). This checkpoint was not trained "
        "on the authors' AddInverse encoding and cannot be imported as is.")

  expected = expected_torch_shapes(model, in_channels)
  missing = [k for k in expected if k not in arrays]
  unexpected = sorted(k for k in arrays if k not in expected)
  misshaped = [(k, s, arrays[k].shape) for k, s in expected.items()
               if k in arrays and not _shape_matches(arrays[k].shape, s)]
  problems += [f"missing key {k!r} (expected shape {_fmt(expected[k])})" for k in missing]
  problems += [f"unexpected key {k!r} (shape {_fmt(arrays[k].shape)})" for k in unexpected]
  problems += [f"mis-shaped key {k!r}: expected {_fmt(s)}, got {_fmt(g)}"
               for k, s, g in misshaped]
  if problems:
    raise ValueError(_mismatch_message(model, arrays, problems))

  params = {}
  for i, (c_out, r) in enumerate(zip(model.out_channels, model.ranks)):
    c_out, r = int(c_out), int(r)
    B = arrays[torch_key(i, "B")]                    # (R, C_in, k, k)
    W = arrays[torch_key(i, "A")][:, :, 0, 0]        # (d*C_out, R), row j*C_out + o
    bias = arrays[torch_key(i, "b")]                 # (d*C_out,)
    d = W.shape[0] // c_out
    params[f"layer_{i}"] = {
        "B": _f32(B.transpose(2, 3, 1, 0)),
        "A": _f32(W.reshape(d, c_out, r).transpose(2, 1, 0).reshape(r, c_out * d)),
        "b": _f32(bias.reshape(d, c_out).T.reshape(c_out * d)),
    }
  return {"params": params}


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `from_torch_state_dict` (without prefix), float32 numpy."""
  params = variables.get("params", variables)
  out = {}
  for i in range(len(params)):
    p = params[f"layer_{i}"]
    B, A, b = (np.asarray(p[n], np.float32) for n in ("B", "A", "b"))
    c_in, r = B.shape[2], B.shape[3]
    d = c_in * B.shape[0] * B.shape[1]
    c_out = A.shape[1] // d
    out[torch_key(i, "B")] = np.ascontiguousarray(B.transpose(3, 2, 0, 1))
    out[torch_key(i, "A")] = np.ascontiguousarray(
        A.reshape(r, c_out, d).transpose(2, 1, 0).reshape(d * c_out, r, 1, 1))
    out[torch_key(i, "b")] = np.ascontiguousarray(b.reshape(c_out, d).T.reshape(-1))
  return out


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch.save'd state dict (possibly wrapped) as numpy arrays.

  Raises:
    FileNotFoundError: no such file.
    ImportError: torch is not installed (the message says how to install it).
    ValueError: the file is not a plain state dict.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist or is not a file.")
  if os.path.getsize(path) == 0:
    raise ValueError(f"PyTorch checkpoint {path!r} is empty (0 bytes): the download or "
                     "copy was cut short; fetch it again.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading PyTorch checkpoints needs torch, which is not installed: run "
        f"`{INSTALL_HINT}` (or `pip install torch`). Only the conversion needs it; "
        "the converted checkpoint loads without torch.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
    raise ValueError(
        f"torch.load({path!r}, weights_only=True) failed: {e}\nThe file must hold a "
        "state dict (tensors only). If it holds a pickled nn.Module, re-save it in "
        "the authors' code base with torch.save(model.state_dict(), path).") from e
  return unwrap_state_dict(obj)


def check_forward(model: models.CoDANet, variables: Mapping[str, Any],
                  image_size: int) -> np.ndarray:
  """Runs the model on one zero image; raises ValueError unless logits are finite."""
  channels = int(np.shape(variables["params"]["layer_0"]["B"])[2]) // 2
  x = np.zeros((1, image_size, image_size, channels), np.float32)
  logits = np.asarray(batching.forward(model, variables, x))
  if logits.shape != (1, model.num_classes) or not np.all(np.isfinite(logits)):
    raise ValueError(
        f"Converted model gives logits of shape {logits.shape} (expected "
        f"{(1, model.num_classes)}) with values {logits}; expected finite values.")
  return logits


def torch_forward(state_dict: Mapping[str, Any], model: models.CoDANet, x,
                  dtype: str = "float64") -> np.ndarray:
  """The authors' forward pass, in torch, on their state dict: (N, K) logits.

  The reference that imports are checked against, so it shares nothing with
  codajax but the layer description (`model`'s kernels, strides, paddings,
  norm, T and logit bias, which the checkpoint does not store). Written from
  the authors' modules/DAUs.py, coda_conv.py, norms.py and utils.py. x is NHWC
  in [0, 1] (numpy); the default float64 makes it the exact side of a
  comparison. Needs torch.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
  dt = getattr(torch, dtype)
  sd = {k.removeprefix(PREFIX): torch.as_tensor(to_numpy(v)).to(dt)
        for k, v in state_dict.items()}
  with torch.no_grad():
    h = torch.as_tensor(np.asarray(x)).to(dt).permute(0, 3, 1, 2)
    h = torch.cat([h, 1 - h], dim=1)                              # AddInverse.
    for i, (c_out, k, s, p) in enumerate(zip(model.out_channels, model.kernel_sizes,
                                             model.strides, model.paddings)):
      # DAUWeights: w = conv1x1(conv_kxk(h; B); A, b), viewed (N, d, C_out, H', W').
      z = F.conv2d(h, sd[torch_key(i, "B")], stride=s, padding=p)
      w = F.conv2d(z, sd[torch_key(i, "A")], sd[torch_key(i, "b")])
      w = w.view(w.shape[0], -1, int(c_out), *w.shape[-2:])
      # The input patches, index c*k*k + ky*k + kx, broadcast over C_out.
      cols = F.unfold(h, int(k), padding=p, stride=s).view(w.shape[0], -1, 1, *w.shape[-2:])
      length = w.norm(dim=1)                                      # |w|, (N, C_out, H', W').
      norm = (1 + length ** 2) / length if model.norm == "squash" else length
      h = (cols * w).sum(dim=1) / norm                            # CoDAConv2d.
    # AdaptiveSumPool2d, then FinalLayer: / T + logit bias.
    logits = h.sum(dim=(2, 3)) / model.temperature + model.logit_bias
  return logits.numpy()


def convert_checkpoint(torch_checkpoint: str, config, workdir: str) -> str:
  """Reads, converts, checks and saves a checkpoint; returns where it was written."""
  model = models.from_config(config.model)
  state_dict = load_torch_state_dict(torch_checkpoint)
  variables = from_torch_state_dict(model, state_dict)
  check_forward(model, variables, int(config.image_size))
  from codajax import checkpoint  # pylint: disable=g-import-not-at-top
  meta = {"source": os.path.abspath(torch_checkpoint), "model": config.model.to_dict()}
  return checkpoint.save_imported(workdir, variables["params"], meta)


def define_flags(flag_values=None) -> None:
  """The command line's flags; defined on demand so importing this module is inert."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_string("torch_checkpoint", None, "torch.save'd state dict of the "
                      "authors' CoDA-Net.", flag_values=fv)
  config_flags.DEFINE_config_file(
      "config", None, "Config whose `model` matches the checkpoint.", flag_values=fv,
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Where to write the converted checkpoint.",
                      flag_values=fv)
  flags.mark_flags_as_required(["torch_checkpoint", "config", "workdir"], flag_values=fv)


def main(argv, flag_values=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  try:
    path = convert_checkpoint(fv.torch_checkpoint, fv.config, fv.workdir)
  except (ImportError, FileNotFoundError, ValueError) as e:
    if isinstance(e, ImportError) and INSTALL_HINT not in str(e):
      raise
    raise SystemExit(f"codajax.convert: {e}") from e
  print(f"Wrote converted checkpoint of {fv.torch_checkpoint} to {path}")


def _strip_prefix(arrays: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
  out, problems = {}, []
  for k, v in arrays.items():
    name = k[len(PREFIX):] if k.startswith(PREFIX) else k
    if name in out:
      problems.append(f"key {name!r} appears both with and without {PREFIX!r}")
    out[name] = v
  return out, problems


def _check_floating(arrays: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError naming every CoDA parameter tensor that is not floating point.

  Integer or bool weights would be converted to float32 silently (their values
  already truncated), giving a model that evaluates but is not the trained one.
  """
  bad = [f"{k!r} ({a.dtype})" for k, a in sorted(arrays.items())
         if _LAYER_KEY.match(k) and not jax.numpy.issubdtype(a.dtype, jax.numpy.floating)]
  if bad:
    raise ValueError(
        f"The PyTorch state dict holds {len(bad)} non-floating-point parameter "
        f"tensor(s): {', '.join(bad)}. CoDA-Net weights are floating point; these "
        "were cast (and truncated) somewhere. Re-save the trained model's own "
        "state dict: torch.save(model.state_dict(), path).")


def _in_channels(model: models.CoDANet, arrays: Mapping[str, np.ndarray]) -> Optional[int]:
  """C_in of layer 0 from its B weight, else from its A weight if that divides."""
  B, A = arrays.get(torch_key(0, "B")), arrays.get(torch_key(0, "A"))
  if B is not None and B.ndim == 4:
    return int(B.shape[1])
  per_channel = int(model.out_channels[0]) * int(model.kernel_sizes[0]) ** 2
  if A is not None and A.ndim >= 1 and A.shape[0] % per_channel == 0:
    return int(A.shape[0] // per_channel)
  return None


def _shape_matches(got: tuple[int, ...], expected: Shape) -> bool:
  return len(got) == len(expected) and all(e is None or g == e for g, e in zip(got, expected))


def _fmt(shape: Shape) -> str:
  return str(tuple("?" if s is None else int(s) for s in shape)).replace("'?'", "?")


def _mismatch_message(model: models.CoDANet, arrays: Mapping[str, np.ndarray],
                      problems: list[str]) -> str:
  arch = checkpoint_architecture(arrays)
  ours = {"out_channels": tuple(int(v) for v in model.out_channels),
          "ranks": tuple(int(v) for v in model.ranks),
          "kernel_sizes": tuple(int(v) for v in model.kernel_sizes)}
  lines = [f"The PyTorch state dict does not fit the model ({len(problems)} problem(s)):"]
  lines += [f"  - {p}" for p in problems]
  lines.append("The checkpoint looks like (per layer, ? = unreadable):")
  for f, v in ours.items():
    lines.append(f"  {f}: checkpoint {_fmt(arch[f])}, model {v}")
  lines.append(f"  layer 0 input channels: checkpoint {arch['in_channels']}, model "
               "2 x image channels")
  lines.append(
      "To fix: use the config/preset the checkpoint was trained with (e.g. "
      "--config=configs/cifar10.py:9L-S-CoDA-SQ-1000 for the authors' 9L-S CIFAR-10 "
      "nets); only out_channels, ranks and kernel_sizes (and the layer count) shape "
      "the parameters. Strides, paddings, norm, temperature and logit_bias are not "
      "stored in the checkpoint and cannot cause this error, but they must still "
      "match the training run for the logits to be right.")
  return "\n".join(lines)


def _f32(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a, dtype=np.float32)


if __name__ == "__main__":
  define_flags()
  cli.run_app(main)
