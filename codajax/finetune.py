"""Fine-tuning: a training run that starts from another net's parameters.

`start(config, state, restored)` is phase 7's last step in `codajax.train`:
when the run restored no checkpoint of its own and config.init_from names a
source (a workdir, or "pretrained:<NAME>" of `codajax.pretrained.MODELS`), it
replaces the freshly initialised parameters with the source's, layer by layer
(`transfer`). Only the parameters: the optimizer state and the step start
afresh. The fields are described in `codajax.finetune_spec`.

Restoring is strict: every layer and parameter of the model must be in the
source with the same shape, except the last layer (out_channels =
num_classes), which keeps the model's own initialisation when it is new
(config.init_head). Anything else is one CheckpointError naming the layer and
both shapes. Freezing layers (config.freeze_layers) is the optimizer's
business, `codajax.steps.make_optimizer`.
"""

import logging

import jax
import numpy as np

from codajax import checkpoint
from codajax import finetune_spec
from codajax import pretrained

FIX = ("fine-tune a model with the source's architecture (its config.json, or "
       "codajax.pretrained's config for a pretrained net); only the number of classes "
       "may differ.")


def start(config, state, restored: bool):
  """The state training starts from: `state` itself unless config.init_from
  is set and the run restored no checkpoint of its own (a resumed run ignores
  init_from, in one log line). Raises CheckpointError (see `transfer`)."""
  if not config.init_from:
    return state
  if restored:
    logging.info("config.init_from=%s is ignored: the run resumes from its own checkpoint.",
                 config.init_from)
    return state
  source, what = _source_params(config.init_from)
  params = transfer(jax.device_get(source), jax.device_get(state.params),
                    config.init_head, what)
  shardings = jax.tree.map(lambda x: x.sharding, state.params)
  return state.replace(params=jax.device_put(params, shardings))


def _source_params(init_from: str):
  """(params, what they are, for messages) of a workdir or a pretrained net."""
  what = f"config.init_from={init_from!r}"
  if init_from.startswith(finetune_spec.PRETRAINED):
    try:  # Downloads and converts into the cache at the first use.
      _, variables = pretrained.load(init_from[len(finetune_spec.PRETRAINED):].strip())
    except pretrained.PretrainedError as e:
      raise checkpoint.CheckpointError(f"{what}: {e}") from None
    logging.info("Fine-tuning from the pretrained net %s.", init_from)
    return variables["params"], what
  try:
    step, params, _ = checkpoint.load_stored_params(init_from)
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(
        f"{what}: {e} Give a workdir that holds a trained run (or "
        "'pretrained:<NAME>').") from None
  logging.info("Fine-tuning from %s, the parameters of its step %d.", init_from, step)
  return params, f"{what} (step {step})"


def num_classes(layer: dict) -> int:
  """The out_channels of a layer's parameters: A is (rank, out * d), B is
  (k, k, c_in, rank) and d = c_in * k * k."""
  k, _, c_in, _ = np.shape(layer["B"])
  return int(np.shape(layer["A"])[1] // (c_in * k * k))


def transfer(source: dict, target: dict, init_head: str, what: str = "the source") -> dict:
  """`target` (the model's initial parameters, {"layer_<i>": {...}}) with
  every array taken from `source`, except the last layer when it is new.

  init_head: "auto" (a new last layer when the class counts differ), "new"
  (always) or "keep" (never). Raises CheckpointError for any other mismatch,
  naming the layer, the parameter and both shapes.
  """
  head = f"layer_{len(target) - 1}"
  if set(source) != set(target):
    missing, extra = sorted(set(target) - set(source)), sorted(set(source) - set(target))
    raise checkpoint.CheckpointError(
        f"{what} has {len(source)} layers, this model {len(target)} (missing there: "
        f"{missing or 'none'}; not in the model: {extra or 'none'}); {FIX}")
  src_k, tgt_k = num_classes(source[head]), num_classes(target[head])
  if init_head == "keep" and src_k != tgt_k:
    raise checkpoint.CheckpointError(
        f"config.init_head='keep' but {what} has {src_k} classes and this data {tgt_k}; "
        "set --config.init_head=auto (a new last layer) or train on the same classes.")
  new_head = init_head == "new" or (init_head == "auto" and src_k != tgt_k)
  out = {}
  for layer in sorted(target, key=lambda name: int(name.split("_")[-1])):
    if layer == head and new_head:
      out[layer] = target[layer]
      logging.info("%s: the last layer (%s, %d -> %d classes) is new.", what, layer,
                   src_k, tgt_k)
      continue
    out[layer] = {}
    for name in sorted(set(target[layer]) | set(source[layer])):
      got, want = source[layer].get(name), target[layer].get(name)
      if got is None or want is None or np.shape(got) != np.shape(want):
        shape = lambda x: "missing" if x is None else np.shape(x)
        raise checkpoint.CheckpointError(
            f"{what}: {layer}/{name} is {shape(got)} there but {shape(want)} in this "
            f"model; {FIX}")
      out[layer][name] = np.asarray(got, dtype=np.asarray(want).dtype)
  return out
