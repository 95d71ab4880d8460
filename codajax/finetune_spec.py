"""The config fields of fine-tuning and of class subsets, and their checks.

`config_lib.base_config` declares `FIELDS` and `config_lib.validate` reports
`problems`; `codajax.finetune` (which imports jax) does the restoring and
`codajax.local_data.subset` the class subset. Like `codajax.config_lib`, this
module imports no jax, so configs can be read and written anywhere.

  init_from      "" (train from scratch), a workdir (its latest checkpoint's
                 parameters, not its optimizer state or step), or
                 "pretrained:<NAME>", a net of `codajax.pretrained.MODELS`.
                 Read only while the run has no checkpoint of its own: a
                 resumed run ignores it (one log line says so).
  init_head      the last layer (out_channels = num_classes): "auto" takes a
                 new one (the model's own initialisation) when the class count
                 differs from the source's and keeps the source's when it is
                 the same; "new" always takes a new one (other classes, same
                 count, e.g. digits 0-4 -> 5-9); "keep" never does.
  freeze_layers  the first K layers get no updates (0: none).
  classes        the local data sets ("digits", "idx", "image_folder"): keep
                 only these labels, relabelled 0..k-1 in the order given,
                 e.g. "0-4", "5-9" or "0,3,7" ("" keeps all). The labels are
                 the data set's class indices (an image folder's: its sorted
                 class folders). For tfds data, config.class_subset.
"""

import re

PRETRAINED = "pretrained:"
INIT_HEADS = ("auto", "new", "keep")
FIELDS = dict(init_from="", init_head="auto", freeze_layers=0, classes="")
LOCAL = ("digits", "idx", "image_folder")  # config_lib.LOCAL_DATASETS.


def parse_classes(spec: str) -> tuple:
  """"0-4" -> (0, 1, 2, 3, 4); "5,0,3" -> (5, 0, 3); "1-3+7" -> (1, 2, 3, 7).

  Raises:
    ValueError: a rule naming what is wrong (empty, not a label, a range
      that runs backwards, a label given twice).
  """
  items = [p.strip() for p in re.split(r"[,+]", spec or "")]
  if not spec or not all(items):
    raise ValueError("must list class labels, e.g. '0-4' or '0,3,7'.")
  labels = []
  for item in items:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if not m:
      raise ValueError(f"{item!r} is not a label (an integer >= 0) or a range 'a-b'.")
    lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
    if hi < lo:
      raise ValueError(f"the range {item!r} runs backwards; write '{hi}-{lo}'.")
    labels += range(lo, hi + 1)
  twice = sorted({l for l in labels if labels.count(l) > 1})
  if twice:
    raise ValueError(f"lists label {twice[0]} more than once; give each class once.")
  return tuple(labels)


def problems(config) -> list:
  """(field, rule) for each of FIELDS that cannot work (config_lib.validate's
  `need` lines); syntax only: the source itself is read at the run's start."""
  out = []
  if not isinstance(config.init_from, str):
    out.append(("init_from", "must be '' (none), a workdir or 'pretrained:<NAME>'."))
  elif config.init_from.strip() in (PRETRAINED, PRETRAINED.rstrip(":")):
    out.append(("init_from", "names no model: write 'pretrained:<NAME>', e.g. "
                "'pretrained:9L-S-CoDA-SQ-1000' (python -m codajax.pretrained --help)."))
  if config.init_head not in INIT_HEADS:
    out.append(("init_head", f"use one of {INIT_HEADS}."))
  k, n = config.freeze_layers, len(config.model.out_channels)
  if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n):
    out.append(("freeze_layers", f"must be an integer in [0, {n}) (the model has {n} "
                "layers; at least the last one must train)."))
  if config.classes:
    if config.dataset not in LOCAL:
      out.append(("classes", f"applies to the local data sets {LOCAL}; for tfds data "
                  "use config.class_subset (labels 0..class_subset - 1)."))
    try:
      parse_classes(config.classes if isinstance(config.classes, str) else "")
    except ValueError as e:
      out.append(("classes", str(e)))
  return out
