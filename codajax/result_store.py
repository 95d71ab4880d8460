"""--mode evaluate's results on disk: what each depends on, and the resume cache.

A result of (metric, method) is stored under <workdir>/evaluation/<metric>/
as <method>.npy (scores), for localisation <method>_maps.npy, and last
<method>.json: one JSON line with its summary, what it depends on
(`result_record`: the checkpoint's step and params digest, the model config,
the data and its image order, the metric's settings and the method's
options) and the count and sha256 of each .npy file (`write`). It is done,
and not computed again (`cached`), only when its line records the same
dependencies and its files agree with the counts and digests the line
records (`stored_result`); otherwise one line says what changed or which
file is missing or damaged. `codajax.evaluation` computes the results;
`codajax.reproduce` reads them back, and `codajax.evaluation_done` before
start-up: so this module imports no jax (nor TensorFlow).
"""

import hashlib
import json
import logging
import os
from typing import NamedTuple, Optional

import numpy as np

from codajax import config_lib
from codajax import workdir as workdir_lib


# ------------------------------------------------ what a stored result is


def data_record(config) -> dict:
  """The test images a result is computed on, from the config alone."""
  order = config_lib.image_order(config)
  return {"dataset": config.dataset,
          "data_dir": os.path.abspath(config.data_dir) if config.data_dir else None,
          "test_split": config.test_split, "image_size": config.image_size,
          "class_subset": config.class_subset,
          # The eval preprocessing reads resize_size only for augment="imagenet".
          "resize_size": config.resize_size if config.augment == "imagenet" else None,
          "image_order": order,
          "image_seed": config.evaluation.seed if order == "shuffled" else None,
          # The local data sets' class subset; recorded only when set, so that
          # the records of every run without one stay as they were.
          **({"classes": config.classes} if config.get("classes") else {})}


def params_digest(meta: Optional[dict], params=None) -> str:
  """The checkpoint's params digest: from its meta item (`codajax.checkpoint`),
  or computed from `params` for a checkpoint that records none."""
  digest = ((meta or {}).get("digest") or {}).get("params")
  if digest:
    return digest
  from codajax import checkpoint  # pylint: disable=g-import-not-at-top  # jax: only here.
  return checkpoint.digest_of(params)


def result_record(config, metric: str, method: str, step: int, digest: str) -> dict:
  """What a stored result of (metric, method) depends on, as its JSON line
  stores it: the checkpoint, the model config, the data, and the metric's
  settings and the method's options."""
  e = config.evaluation
  keys = (("grid_size", "num_grids", "conf_thresh", "skip_bug", "smooth", "seed")
          if metric == "localisation" else ("num_images", "fraction", "points", "order", "fill"))
  record = {"checkpoint": {"step": int(step), "params": digest},
            "model": config.model.to_dict(), "data": data_record(config),
            "settings": {"metric": {k: e[k] for k in keys},
                         "options": e.options[method].to_dict()}}
  return json.loads(json.dumps(record))  # Tuples as lists: as read back.


# ------------------------------------------ the resume cache: done results


class Stored(NamedTuple):
  """A done result, read back: its JSON line, scores and (localisation) maps."""
  line: dict
  scores: np.ndarray
  maps: Optional[np.ndarray]


def _files(metric: str, method: str) -> tuple:
  return (f"{method}.npy",) + ((f"{method}_maps.npy",) if metric == "localisation" else ())


def stored_result(out_dir: str, metric: str, method: str,
                  record: Optional[dict]) -> tuple[Optional[Stored], Optional[str]]:
  """(the stored result, None) if it is done for `record`, else (None, why
  not: a line naming what changed or the damaged file; None if nothing is stored).
  record=None: any intact result, whatever it was computed for (a report)."""
  path = os.path.join(out_dir, metric, f"{method}.json")
  try:
    with open(path) as f:
      line = json.loads(f.readline())
    if not isinstance(line, dict):
      raise ValueError("not a JSON object")
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError) as error:
    return None, f"{path} is damaged ({_brief(error)}); recomputing it."
  changed = _changes(line, record) if record is not None else ""
  if changed:
    return None, f"{metric} of {method}: stored result is stale ({changed}); recomputing."
  arrays, files = [], line.get("files") if isinstance(line.get("files"), dict) else {}
  for name in _files(metric, method):
    array, why = _load(os.path.join(out_dir, metric, name), files.get(name))
    if why:
      return None, f"{os.path.join(out_dir, metric, name)} {why}; recomputing it."
    arrays.append(array)
  return Stored(line, arrays[0], arrays[1] if len(arrays) > 1 else None), None


def cached(out_dir: str, metric: str, method: str, record: dict) -> Optional[Stored]:
  """The stored result of (metric, method) if it is done for `record`
  (`stored_result`), logged as skipped; else None, after a warning that says
  why it is recomputed when something was stored."""
  stored, why = stored_result(out_dir, metric, method, record)
  if why:
    logging.warning("evaluate: %s", why)
  if stored is not None:
    logging.info("evaluate: %s of %s is done (%s); skipped.", metric, method,
                 os.path.join(out_dir, metric, f"{method}.json"))
  return stored


def _load(path: str, want: Optional[dict]) -> tuple[Optional[np.ndarray], Optional[str]]:
  """(the array, None) if `path` holds the array of count and sha256 `want`,
  else (None, what is wrong with it)."""
  if not os.path.exists(path):
    return None, "is missing"
  try:
    array = np.load(path, allow_pickle=False)
  except Exception as error:  # pylint: disable=broad-except  # Any damage numpy meets.
    return None, f"is damaged ({_brief(error)})"
  got = _file_record(array)
  if not isinstance(want, dict):
    return None, "is not recorded in its summary line"
  if got["count"] != want.get("count"):
    return None, f"is damaged ({got['count']} values, its summary says {want.get('count')})"
  if got["sha256"] != want.get("sha256"):
    return None, "is damaged (its sha256 differs from its summary's)"
  return array, None


def _file_record(array: np.ndarray) -> dict:
  return {"count": int(array.size), "sha256": array_digest(array)}


def array_digest(array: np.ndarray) -> str:
  """`checkpoint.digest_of(array)` of one array, without jax: sha256 over its
  (empty) tree path, dtype, shape and bytes."""
  a = np.ascontiguousarray(array)
  h = hashlib.sha256(f"|{a.dtype}|{a.shape}|".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def _brief(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"


def _changes(line: dict, record: dict, limit: int = 3) -> str:
  """'' if `line` records `record`, else its differences, e.g.
  'model.temperature 1000.0 -> 5.0'."""
  missing = [k for k in record if k not in line]
  if missing:
    return f"it records no {', '.join(missing)}: written by an older codajax"
  old, new = _flat({k: line[k] for k in record}), _flat(record)
  keys = [k for k in new if k not in old or old[k] != new[k]] + [k for k in old if k not in new]
  shown = [f"{k} {_short(old.get(k, '(none)'))} -> {_short(new.get(k, '(none)'))}"
           for k in keys[:limit]]
  return ", ".join(shown) + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


def _flat(tree: dict, prefix: str = "") -> dict:
  """{"model": {"temperature": 5.0}} -> {"model.temperature": 5.0}."""
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
  return out


def _short(value) -> str:
  return f"{value[:12]}..." if isinstance(value, str) and len(value) > 16 else str(value)


def write_atomically(path: str, write_to) -> None:
  """write_to(f) into a binary file that becomes `path` only once complete."""
  with workdir_lib.atomic_path(path) as tmp, open(tmp, "wb") as f:
    write_to(f)


def write(out_dir: str, metric: str, method: str, result: Stored) -> None:
  """The .npy files, then the JSON line with their counts and digests (last:
  a run killed in between leaves no line, so the result is not done)."""
  arrays = [a for a in (result.scores, result.maps) if a is not None]
  folder = os.path.join(out_dir, metric)
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{method}.json")
  if os.path.exists(path):
    os.remove(path)  # The old line must not vouch for the new files.
  for name, array in zip(_files(metric, method), arrays):
    write_atomically(os.path.join(folder, name), lambda f, a=array: np.save(f, a))
  files = {name: _file_record(a) for name, a in zip(_files(metric, method), arrays)}
  line = {**result.line, "files": files}
  write_atomically(path, lambda f: f.write((json.dumps(line) + "\n").encode()))
