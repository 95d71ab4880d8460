#!/usr/bin/env bash
# The Fashion-MNIST reproduction of README.md, from scratch or resumed: trains the
# 6-layer CoDA-Net at T = 10, 100, 1000, 10000 (configs/fashion_mnist.py:6L-T<T>,
# the same seed and schedule), evaluates them, and writes the README's table and
# docs/fashion_mnist/ (python -m codajax.reproduce). Rerun it to resume: training
# resumes from its last checkpoint and --mode evaluate skips the results it has.
# Needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist).
# Usage: bash launch/reproduce_fashion_mnist.sh [RUNS_DIR]   (default workdirs/fmnist)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-workdirs/fmnist}"
data="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ ! -d "$data" ]; then
  echo "reproduce: no Fashion-MNIST in $data: apt-get install dataset-fashion-mnist" \
       "(or set FASHION_MNIST_DIR to a folder of its IDX files)." >&2
  exit 1
fi
bash launch/setup.sh test
py=.venv/bin/python
top=1000  # The temperature of the paper's method comparison.
echo "reproduce: expected time on 2 idle cores: training 2811 steps per T at about 1 step/s" \
     "(measured), about 50 min per T, 3 h 20 min for the four; evaluation about 3 h" \
     "(estimated). Everything done is kept, so it can run in pieces."
phase=0
phases=12
step() { phase=$((phase + 1)); echo "reproduce: [$phase/$phases] $* ($(date +%H:%M:%S))"; }
main() {  # codajax.main on one T's workdir, quietly: its log goes to <workdir>.log.
  local t=$1; shift
  mkdir -p "$runs"
  $py -m codajax.main --config "configs/fashion_mnist.py:6L-T$t" --workdir "$runs/6L-T$t" \
    --config.data_dir="$data" "$@" >> "$runs/6L-T$t.log" 2>&1
}
evaluate() {  # --mode evaluate on $2 grids and 500 images; fewer grids when the model has too few confident images.
  local t=$1 grids=$2; shift 2
  if ! main "$t" --mode evaluate --config.evaluation.num_grids="$grids" \
         --config.evaluation.num_images=500 "$@"; then
    local fit
    fit=$(tail -n 1 "$runs/6L-T$t.log" | grep -o "make only [0-9]* grids" | grep -o "[0-9]*") || {
      tail -n 1 "$runs/6L-T$t.log" >&2; exit 1; }
    echo "reproduce: T = $t has confident images for only $fit grids of 3x3, not $grids; using $fit."
    main "$t" --mode evaluate --config.evaluation.num_grids="$fit" \
      --config.evaluation.num_images=500 "$@"
  fi
}
localisation() { local t=$1 methods=$2; evaluate "$t" 100 --config.evaluation.metrics="('localisation',)" \
  --config.evaluation.methods="$methods"; }
removal() { local t=$1 methods=$2; evaluate "$t" 100 --config.evaluation.metrics="('pixel_removal',)" \
  --config.evaluation.methods="$methods"; }

# The phases run in the order that decides the paper's claims soonest, so a run
# cut short still answers them: T = 1000 (the method comparison) and its cheap
# methods first, then T = 100 (the rise with T), Occ9 (two orderings), T = 10,
# then the slow parts (pixel removal, IntGrad); T = 10000, the extra, last.
step "train T = $top ($runs/6L-T$top; log in $runs/6L-T$top.log)"
main "$top"
step "evaluate T = $top: localisation of Ours, GradCAM, IxG, DeepLIFT, Grad on 100 grids"
localisation "$top" "('ours','gradcam','ixg','deeplift','grad')"
for t in 100 10; do
  step "train T = $t ($runs/6L-T$t; log in $runs/6L-T$t.log)"
  main "$t"
  step "evaluate T = $t: localisation of Ours and GradCAM on 100 grids"
  localisation "$t" "('ours','gradcam')"
  if [ "$t" = 100 ]; then  # Before T = 10's hour of training: two orderings rest on it.
    step "evaluate T = $top: localisation of Occ9 on the first 50 grids (the paired Ours - Occ9 CI)"
    evaluate "$top" 50 --config.evaluation.metrics="('localisation',)" \
      --config.evaluation.methods="('occ9',)"
  fi
done
step "evaluate T = 10, 100, $top: pixel removal of Ours and GradCAM on 500 images"
for t in 10 100 "$top"; do removal "$t" "('ours','gradcam')"; done
step "evaluate T = $top: localisation of IntGrad; pixel removal of IxG, DeepLIFT, Grad, IntGrad"
localisation "$top" "('intgrad',)"
removal "$top" "('ixg','deeplift','grad','intgrad')"
step "train T = 10000 ($runs/6L-T10000; log in $runs/6L-T10000.log)"
main 10000
step "evaluate T = 10000: Ours and GradCAM on 100 grids and 500 images"
evaluate 10000 100 --config.evaluation.methods="('ours','gradcam')"
step "report: README.md's table and docs/fashion_mnist/"
$py -m codajax.reproduce --runs "$runs" --out docs/fashion_mnist --readme README.md
