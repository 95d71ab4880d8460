"""The CoDA-Net architectures, each written once, without jax.

An architecture is the five per-layer sequences of `models.CoDANet`
(`LAYER_FIELDS`). The model presets (`codajax.models`) and the configs
(`codajax.config_lib`, `configs/`) both build on these functions, so a config
can be read and written on a machine without jax.

`MODEL_DEFAULTS` are the defaults of the other `CoDANet` fields, shared the
same way: the squash norm, T = 1, the paper's logit bias log(0.1 / 0.9) (a
prior of 0.1 per class under the sigmoid), float32, the fused layer with the
backend's contraction, no remat. The choices of the string fields (`NORMS`,
`DTYPES`, `IMPLS`, `CONTRACTIONS`) are declared here too, and `model_problems`
checks a model's fields once, for the config (`config_lib.validate`) and the
module (`models.CoDANet`) alike.
"""

import math
import numbers

LAYER_FIELDS = ("out_channels", "ranks", "kernel_sizes", "strides", "paddings")
# The DAU's norm n(w): (1 + |w|^2) / |w| ("squash") or |w| ("l2"); see codajax.dau.
NORMS = ("squash", "l2")
# The dtype of the convolutions (parameters, norms, pooling and logits stay float32).
DTYPES = ("float32", "bfloat16")
# "fused" never forms the per-position weights w (see `codajax.dau_fused`);
# "materialized" forms w at every position like the PyTorch code (`codajax.dau`).
# The fused layer's linear part is a convolution ("conv") or patches times a
# matrix ("dot", `LAYER_CONTRACTIONS`); "auto" picks per backend. All share one
# parameter tree.
IMPLS = ("fused", "materialized")
LAYER_CONTRACTIONS = ("conv", "dot")
CONTRACTIONS = ("auto",) + LAYER_CONTRACTIONS

LOGIT_BIAS = math.log(0.1 / 0.9)

MODEL_DEFAULTS = dict(norm="squash", temperature=1.0, logit_bias=LOGIT_BIAS,
                      dtype="float32", impl="fused", contraction="auto", remat=False)


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def model_problems(m, last_from_data: bool = False) -> list[tuple[str, str]]:
  """(field, rule) for every field of the model fields `m` (a mapping of
  `LAYER_FIELDS` and `MODEL_DEFAULTS`, dtype by name) that breaks its rule.

  The one check of a model's fields: `config_lib.validate` reports each pair
  as a config problem, `models.CoDANet` raises them. `last_from_data`: the
  last entry of out_channels may be -1 (a config's "from the data").
  """
  problems = []

  def need(ok, field, rule):
    if not ok:
      problems.append((field, rule))

  for field, choices in (("dtype", DTYPES), ("impl", IMPLS), ("contraction", CONTRACTIONS),
                         ("norm", NORMS)):
    need(m[field] in choices, field, f"use one of {choices}.")
  need(_is_number(m["temperature"]) and m["temperature"] > 0, "temperature",
       "must be a finite number > 0.")
  need(_is_number(m["logit_bias"]), "logit_bias", "must be a finite number.")
  ok = []
  for f in LAYER_FIELDS:
    seq = m[f]
    ok.append(isinstance(seq, (tuple, list)) and len(seq) > 0 and all(map(_is_int, seq)))
    need(ok[-1], f, "must be a sequence of integers, one per layer, e.g. (1, 2, 3).")
  if not all(ok):
    return problems
  n = len(m["out_channels"])
  for f in LAYER_FIELDS[1:]:
    need(len(m[f]) == n, f, f"has {len(m[f])} entries but out_channels has {n}; give one "
         "per layer.")
  out = list(m["out_channels"])
  last = " (the last may be -1: from the data)" if last_from_data else ""
  need(all(c >= 1 for c in out[:-1]) and (out[-1] >= 1 or (last_from_data and out[-1] == -1)),
       "out_channels", f"entries must be >= 1{last}.")
  for f in ("ranks", "kernel_sizes", "strides"):
    need(all(v >= 1 for v in m[f]), f, "entries must be >= 1.")
  need(all(0 <= p < k for p, k in zip(m["paddings"], m["kernel_sizes"])), "paddings",
       "entries must satisfy 0 <= padding < kernel size.")
  return problems


def layers(out_channels, ranks, kernel_sizes, strides, paddings) -> dict:
  """The five per-layer sequences as a dict of int tuples."""
  return dict(zip(LAYER_FIELDS, (tuple(int(v) for v in seq) for seq in (
      out_channels, ranks, kernel_sizes, strides, paddings))))


def cifar10_9l_s(ranks=(32, 32) + (64,) * 7) -> dict:
  """The paper's 9L-S CoDA-Net for CIFAR-10 (7,782,816 parameters at the default ranks)."""
  return layers(out_channels=(16, 16, 32, 32, 32, 64, 64, 64, 10), ranks=ranks,
                kernel_sizes=(3,) * 8 + (1,), strides=(1, 1, 2, 1, 1, 2, 1, 1, 1),
                paddings=(1,) * 8 + (0,))


def imagenet100_9l_l() -> dict:
  """The paper's 9L-L CoDA-Net for ImageNet-100 (47,517,408 parameters)."""
  return layers(out_channels=(16, 32, 32, 64, 64, 64, 64, 64, 100),
                ranks=(64,) * 3 + (128,) * 3 + (256,) * 3,
                kernel_sizes=(7,) + (3,) * 8, strides=(3, 1, 1, 2, 1, 1, 2, 1, 1),
                paddings=(3,) + (1,) * 8)


def tiny(num_classes: int = 10) -> dict:
  """A 3-layer net for tests, laptops and the configs' `tiny` variants.

  num_classes=-1 leaves the last layer to be set from the data (image folders).
  """
  return layers(out_channels=(8, 8, num_classes), ranks=(4, 4, 4), kernel_sizes=(3, 3, 1),
                strides=(1, 2, 1), paddings=(1, 1, 0))
