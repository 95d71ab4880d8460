r"""The reproduction report: the paper's claims decided by confidence intervals.

  python -m codajax.reproduce --runs workdirs/fmnist --out docs/fashion_mnist \
      [--readme README.md]

reads the workdirs `<runs>/6L-T<T>` (trained and evaluated by
launch/reproduce_fashion_mnist.sh) and writes under `--out`:

  results.md        the table: test top-1 and its plateau per T; localisation
                    mean [95% CI] per method at the largest T; Ours and
                    GradCAM across T; pixel removal at 25% [CI]; and each of
                    the paper's orderings with its word (`bootstrap.verdict`)
                    and the interval of the difference behind it;
  accuracy.png      test top-1 against the step, one curve per T;
  localisation.png, pixel_removal.png   the methods at the largest T.

With --readme, the text between the README's markers
`<!-- reproduce:begin -->` and `<!-- reproduce:end -->` becomes results.md.

Methods on the same model are compared on the same grids (images), paired:
grids and images are drawn in a fixed sequence, so a method run on fewer
grids is paired with the first ones of the other. Ours across T compares
different models, whose grids differ: unpaired. Nothing is recomputed here;
every result is read back with its files checked (`result_store.stored_result`).
"""

import glob
import json
import os
import re
import sys

import numpy as np

from codajax import bootstrap
from codajax import metrics
from codajax import plotting
from codajax import result_store
from codajax import workdir

TOP = 1000  # The paper's temperature for the method comparison.
PLATEAU_POINTS = 0.5  # Top-1 points the last 20% of training may gain at a plateau.
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
# The paper's CIFAR-10 figures (9L-S, T = 1000 unless named), shown beside ours.
PAPER = {"ours": 0.912, "occ9": 0.842, "gradcam": 0.726, "occ5": 0.564, "intgrad": 0.154,
         "ixg": 0.144, "grad": 0.144, "T10": 0.314, "T100": 0.637, "T1000": 0.912}
# The orderings of the paper, as (a, b): "a localises better than b" at the largest T.
CLAIMS = (("ours", "occ9"), ("ours", "gradcam"), ("occ9", "gradcam"), ("gradcam", "grad"),
          ("gradcam", "ixg"), ("gradcam", "intgrad"))


class ReportError(RuntimeError):
  """Runs that cannot be reported, with what to do about it."""


def runs(root: str) -> dict:
  """{T: workdir} of the `6L-T<T>` folders under root, by T."""
  found = {}
  for path in glob.glob(os.path.join(root, "6L-T*")):
    match = re.fullmatch(r"6L-T(\d+)", os.path.basename(path))
    if match:
      found[int(match.group(1))] = path
  if not found:
    raise ReportError(f"No 6L-T<T> workdirs under {root}; run "
                      "launch/reproduce_fashion_mnist.sh first.")
  return dict(sorted(found.items()))


def accuracy_curve(workdir: str) -> list[tuple[int, float]]:
  """[(step, test top-1)] of a training run, from its metrics.jsonl."""
  curve, path = {}, os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):  # Not started yet.
    return []
  with open(path) as f:
    for line in f:
      entry = json.loads(line)
      if "eval/top1" in entry:
        curve[entry["step"]] = entry["eval/top1"]
  return sorted(curve.items())


def plateau_gain(curve) -> float:
  """Top-1 points gained over the last 20% of the steps (the evaluation at or
  before 80% of the last step, to the last)."""
  last_step, last = curve[-1]
  before = [top1 for step, top1 in curve if step <= 0.8 * last_step]
  return 100 * (last - (before[-1] if before else curve[0][1]))


def results(workdir: str, metric: str) -> dict:
  """{method: one value per unit} of every intact stored result of `metric`."""
  out_dir = os.path.join(workdir, "evaluation")
  found = {}
  for path in sorted(glob.glob(os.path.join(out_dir, metric, "*.json"))):
    method = os.path.basename(path)[:-len(".json")]
    stored, why = result_store.stored_result(out_dir, metric, method, None)
    if stored is None:
      raise ReportError(f"{why or path + ' has no result'} Rerun "
                        "launch/reproduce_fashion_mnist.sh to recompute it.")
    found[method] = stored
  return found


def paired(units: dict, a: str, b: str, **opts):
  """(a - b on their first common units, share a > b, number of units) or None."""
  if a not in units or b not in units:
    return None
  k = min(len(units[a]), len(units[b]))
  diff, share = bootstrap.paired_difference(units[a][:k], units[b][:k], **opts)
  return diff, share, k


def _ci(i: bootstrap.Interval) -> str:
  return f"{i.mean:.3f} [{i.low:.3f}, {i.high:.3f}]"


def _diff(i: bootstrap.Interval) -> str:
  return f"{i.mean:+.3f} [{i.low:+.3f}, {i.high:+.3f}]"


def report(root: str, out: str, **opts) -> str:
  """Writes results.md and the figures under `out`; returns the markdown."""
  found = runs(root)
  top = TOP if TOP in found else max(found)
  curves = {t: accuracy_curve(w) for t, w in found.items()}
  curves = {t: c for t, c in curves.items() if c}  # A run not yet evaluated once: left out.
  loc = {t: results(w, "localisation") for t, w in found.items()}
  removal = results(found[top], "pixel_removal")
  units = {t: {m: metrics.unit_values("localisation", r.scores) for m, r in v.items()}
           for t, v in loc.items()}
  lines = ["| T | test top-1 | gain in the last 20% of steps | steps | plateau |",
           "|---|---|---|---|---|"]
  total = max((c[-1][0] for c in curves.values()), default=0)  # One schedule for every T.
  for t, curve in curves.items():
    gain = plateau_gain(curve)
    done = "yes" if gain < PLATEAU_POINTS else "no"
    if curve[-1][0] < total:  # Still training (or stopped): no plateau to judge yet.
      done = f"training: step {curve[-1][0]} of {total}"
    lines.append(f"| {t} | {100 * curve[-1][1]:.1f}% | {gain:+.2f} points | {curve[-1][0]} | "
                 f"{done} |")
  lines += ["", f"Localisation at T = {top} (3×3 grids; mean [95% CI] over grids):", "",
            "| method | grids | mean [95% CI] | Ours − method, paired [95% CI] | Ours higher "
            "| paper (CIFAR-10) |", "|---|---|---|---|---|---|"]
  u = units[top]
  for m in sorted(u, key=lambda m: -u[m].mean()):
    p = paired(u, "ours", m, **opts) if m != "ours" else None
    cells = [_diff(p[0]), f"{100 * p[1]:.0f}% of {p[2]}"] if p else ["", ""]
    lines.append(f"| {plotting.METHOD_LABELS.get(m, m)} | {len(u[m])} | "
                 f"{_ci(bootstrap.mean_interval(u[m], **opts))} | {' | '.join(cells)} | "
                 f"{PAPER.get(m, '')} |")
  lines += ["", "Across T (unpaired: each T's model picks its own grids):", "",
            "| T | grids | Ours | GradCAM | paper Ours (CIFAR-10) |", "|---|---|---|---|---|"]
  for t in found:
    row = [_ci(bootstrap.mean_interval(units[t][m], **opts)) if m in units[t] else "not run"
           for m in ("ours", "gradcam")]
    lines.append(f"| {t} | {len(units[t].get('ours', []))} | {' | '.join(row)} | "
                 f"{PAPER.get(f'T{t}', '')} |")
  r_units = {m: metrics.unit_values("pixel_removal", r.scores) for m, r in removal.items()}
  lines += ["", f"Pixel removal at T = {top}: true-class probability with 25% of the pixels "
            "removed, least important first (mean [95% CI] over images):", "",
            "| method | images | unperturbed | at 25% removed |", "|---|---|---|---|"]
  if not r_units:
    lines.append("| not run yet | | | |")
  for m in sorted(r_units, key=lambda m: -r_units[m].mean()):
    first = bootstrap.mean_interval(removal[m].scores[:, 0], **opts)
    lines.append(f"| {plotting.METHOD_LABELS.get(m, m)} | {len(r_units[m])} | {_ci(first)} | "
                 f"{_ci(bootstrap.mean_interval(r_units[m], **opts))} |")
  lines += ["", "The paper's claims, each decided by the 95% CI of the difference:", ""]
  for a, b in CLAIMS:
    p = paired(u, a, b, **opts)
    lines.append(f"- {a} > {b} (T = {top}): " + (
        f"**{bootstrap.verdict(p[0])}**: {_diff(p[0])} on {p[2]} grids" if p else "not run"))
  temps = [t for t in found if "ours" in units[t]]
  for hi, lo in zip(temps[::-1], temps[-2::-1]):
    d = bootstrap.difference(units[hi]["ours"], units[lo]["ours"], **opts)
    extra = " (beyond the paper's temperatures)" if hi > TOP else ""
    lines.append(f"- Ours(T = {hi}) > Ours(T = {lo}){extra}: **{bootstrap.verdict(d)}**: "
                 f"{_diff(d)}")
  text = "\n".join(lines) + "\n"
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  _figures(out, curves, loc[top], removal, opts)
  return text


def _figures(out: str, curves: dict, loc: dict, removal: dict, opts: dict) -> None:
  fig, ax = plotting.plt.subplots(figsize=(5.5, 3.8))
  for t, curve in curves.items():
    steps, top1 = zip(*curve)
    ax.plot(steps, 100 * np.asarray(top1), marker=".", label=f"T = {t}")
  ax.set_xlabel("training step")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title("Fashion-MNIST, 6-layer CoDA-Net: the same schedule for every T", fontsize=9)
  ax.legend(fontsize=8)
  plotting.save(fig, os.path.join(out, "accuracy.png"))
  if loc:  # Each method figure once its metric has results.
    scores = {m: r.scores for m, r in loc.items()}
    intervals = {m: bootstrap.mean_interval(metrics.unit_values("localisation", s), **opts)
                 for m, s in scores.items()}
    plotting.plot_localisation(scores, os.path.join(out, "localisation.png"),
                               n=int(np.sqrt(next(iter(scores.values())).shape[1])),
                               intervals={m: tuple(i) for m, i in intervals.items()})
  if removal:
    curves_ = {m: r.scores for m, r in removal.items()}
    plotting.plot_pixel_removal(curves_, os.path.join(out, "pixel_removal.png"),
                                fraction=float(next(iter(removal.values())).line["fraction"]),
                                bands={m: bootstrap.curve_band(c, **opts)
                                       for m, c in curves_.items()})


def update_readme(path: str, text: str) -> None:
  """Replaces what stands between the README's markers by `text`."""
  with open(path) as f:
    readme = f.read()
  if readme.count(BEGIN) != 1 or readme.count(END) != 1:
    raise ReportError(f"{path} needs one {BEGIN} line and one {END} line around the table.")
  head, rest = readme.split(BEGIN)
  with workdir.atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", required=True, help="The folder of the 6L-T<T> workdirs.")
  parser.add_argument("--out", required=True, help="Where results.md and the figures go.")
  parser.add_argument("--readme", help="A README whose marked block gets the table.")
  args = parser.parse_args(argv)
  try:
    text = report(args.runs, args.out)
    if args.readme:
      update_readme(args.readme, text)
  except (ReportError, OSError, ValueError) as e:
    sys.exit(f"codajax.reproduce: {e}")
  print(text)


if __name__ == "__main__":
  main()
