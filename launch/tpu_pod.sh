#!/usr/bin/env bash
# Multi-host TPU pod (TPU VM): the same command on every worker; each process
# calls jax.distributed.initialize() (CODAJAX_DISTRIBUTED=1), reads its own
# slice of the data and feeds it to the global mesh.
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/cifar10.py:9L-S-CoDA-SQ-1000 gs://BUCKET/run
# Prepare tfds data sets once beforehand (python -m codajax.prepare), into a
# shared --config.data_dir (e.g. a GCS bucket): training never downloads.
set -euo pipefail
name="$1"; zone="$2"; config="$3"; workdir="$4"; shift 4
repo="${CODAJAX_REPO:?set CODAJAX_REPO to the git URL of your codajax repository}"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  [ -d codajax ] || git clone $repo codajax
  cd codajax && bash launch/setup.sh test && .venv/bin/pip install -q 'jax[tpu]'
  CODAJAX_DISTRIBUTED=1 .venv/bin/python -m codajax.main --config $config --workdir $workdir $*
"
