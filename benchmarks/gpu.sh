#!/usr/bin/env bash
# The benchmarks on one GPU, through benchmarks.run: CIFAR 9L-S at batch 256
# and ImageNet-100 9L-L at batch 32 (240x240), fused, float32 and bfloat16,
# with the FLOP/s fraction of the ceiling; the two contractions (dot, conv)
# of the CIFAR step; inference and contributions; and a per-kernel profile
# of the CIFAR step; the interpretability evaluation's methods on 3x3 grids
# of CIFAR images (96x96) at their default settings. Needs codajax's dependencies with jax's CUDA plugin
# (the training step is codajax.steps').
#
#   bash benchmarks/gpu.sh [OUT_DIR [STAGE ...]]    # JSON lines in OUT_DIR/STAGE.jsonl
#
# Stages, in order (default: all): cifar_train profile cifar_infer
# imagenet_train imagenet_infer evaluation. On an H200 each process spends 25-95 s
# compiling, so all of them take about 15 minutes: run them in pieces where
# a call is limited to less. Each measurement is killed after 360 s. Every
# stage runs even if an earlier one failed; the exit status is non-zero if
# any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmark_results}}"
shift $(( $# > 0 ? 1 : 0 ))
all=(cifar_train profile cifar_infer imagenet_train imagenet_infer evaluation)
stages=("${@:-${all[@]}}")
for s in "${stages[@]}"; do
  [[ " ${all[*]} " == *" $s "* ]] || { echo "gpu.sh: unknown stage '$s'; stages: ${all[*]}" >&2; exit 2; }
done
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
wanted() { [[ " ${stages[*]} " == *" $1 "* ]]; }
run() {   # run NAME ARGS...: one benchmarks.run invocation, logged, if NAME is wanted.
  local name="$1"; shift
  wanted "$name" || return 0
  echo "=== $name: benchmarks.run $*" >&2
  "$py" -m benchmarks.run "$@" --timeout-s 360 >"$out/$name.jsonl" || status=1
}
"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null

# CIFAR 9L-S, batch 256: both contractions, both dtypes.
run cifar_train --parts train_step --train-batch 256 --impl fused --contraction dot conv \
  --dtype float32 bfloat16 --reps 20 --budget-s 20
# Where the CIFAR step's time goes (kernels by name; the traces go to a temporary folder).
run profile --parts profile --train-batch 256 --impl fused --dtype float32 bfloat16 \
  --profile-steps 3
run cifar_infer --parts inference contributions --infer-batch 256 --explain-batch 64 \
  --impl fused --dtype float32 bfloat16 --reps 20 --budget-s 20
# ImageNet-100 9L-L, batch 32 at 240x240.
run imagenet_train --model imagenet100_9l_l --parts train_step --train-batch 32 --impl fused \
  --dtype float32 bfloat16 --reps 10 --budget-s 20
run imagenet_infer --model imagenet100_9l_l --parts inference contributions --infer-batch 32 \
  --explain-batch 8 --impl fused --dtype float32 --reps 10 --budget-s 20
# The attribution methods on 3x3 grids of CIFAR images (96x96, random init), one
# process per method, at their defaults (2304 occlusion masks, 6000 RISE masks,
# 256 LIME samples if lime is installed, 20 intgrad steps), one grid per call.
run evaluation --parts evaluation --impl fused --dtype float32 --eval-masks 0 --eval-steps 0 \
  --reps 10 --budget-s 20
# One table of every record, last (the end of the output is what a remote run returns).
"$py" - "$out"/*.jsonl <<'EOF'
import json, sys
for path in sys.argv[1:]:
  for line in open(path):
    if not line.startswith("{"):
      continue
    r = json.loads(line)
    if r["bench"] == "summary":
      continue
    impl = r["impl"] if r["contraction"] is None else f"{r['impl']}/{r['contraction']}"
    print(r["bench"][:16].ljust(17), r["model"][:16].ljust(17), impl.ljust(12),
          r["dtype"].ljust(9), str(r["batch"]).rjust(4), end=" ")
    if r["bench"] == "evaluation":
      if r.get("skipped"):
        print(f"{r['method']} skipped: {r['skipped']}")
        continue
      print(f"{r['method']}: {r['grids_per_s']:.3f} grids/s ({r['grid_s'] * 1e3:.1f} ms/grid, "
            f"median of {r['reps']}, x{r['scale']:g}), 500 grids ~ {r['est_500_grids_s']:.0f} s", end="")
      if r["method"] == "ours":
        print(f", forward {r['forward_median_s'] * 1e3:.2f} ms, ratio {r['ratio']:.2f}", end="")
      if r["method"] == "occ5":
        print(f", {r['masked_forwards_per_s']:.0f} masked fwd/s vs inference "
              f"{r['inference_img_per_s']:.0f} img/s (batch {r['inference_batch']}), "
              f"ratio {r['ratio']:.2f}", end="")
      print()
    elif r["bench"] == "profile":
      share = "n/a" if r["matmul_share"] is None else f"{r['matmul_share']:.0%}"
      print(f"busy {r['busy_ms_per_step']:.2f} ms/step, matmul/conv {share}; top: "
            + ", ".join(f"{t['op'][:40]} {t['ms_per_step']:.2f}" for t in r["top_ops"][:5]))
    elif r["bench"] == "flops_vs_ceiling":
      train = "n/a" if r["train_flop_per_s"] is None else f"{r['train_flop_per_s'] / 1e12:.1f}"
      frac = "n/a" if r["fraction"] is None else f"{r['fraction']:.3f}"
      print(f"train {train} TF/s, ceiling {r['ceiling_flop_per_s'] / 1e12:.1f} "
            f"({r['ceiling_kind']}; conv {r['conv_flop_per_s'] / 1e12:.1f}, gemm {r['gemm_flop_per_s'] / 1e12:.1f}) "
            f"fraction {frac}")
    elif r["bench"] == "contributions":
      print(f"contrib {r['contributions_median_s'] * 1e3:.2f} ms / forward {r['forward_median_s'] * 1e3:.2f} ms "
            f"= {r['ratio']:.2f}x, {r['num_classes']} classes, peak {r['peak_bytes'] / 2**30:.2f} GiB")
    else:
      print(f"{r['median_s'] * 1e3:.2f} ms, {r['img_per_s']:.0f} img/s, peak {r['peak_bytes'] / 2**30:.2f} GiB "
            f"({r['peak_source']}), compile {r.get('compile_s')} s")
EOF
exit $status
