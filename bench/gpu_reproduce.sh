#!/usr/bin/env bash
# The reproduction campaign on a lent GPU machine (one H200 here), resumable across calls.
#
#   BUDGET=gpu TRAIN_S=420 bash bench/gpu_reproduce.sh OUT_DIR
#
# Needs, in the working tree that travels (untracked, not ignored, at most 64 MiB in all):
#   gpu_payload/cifar10.jpack.npz  the CIFAR-10 image folder packed (54 MiB):
#                                  python -m awn_jax.data.jpeg_pack pack ~/awn-data/cifar10 gpu_payload/cifar10.jpack.npz
#   gpu_payload/runs.tar.gz        (optional) what an earlier call brought back, to resume
#                                  on a fresh machine
#   .whl/core/*.whl                ml_collections, tensorboardX (the machine lacks them; see
#                                  bench/gpu_checks.sh)
# Each call: unpack the data (once per machine), restore the runs from runs.tar.gz when the
# machine has none, train the four runs at once (--parallel) for TRAIN_S seconds at most
# (each stops at an epoch end), evaluate and report once all are finished, and write
# OUT_DIR/runs.tar.gz (configs, metrics, the latest and the studies' checkpoints, the
# report) for the next call, plus the report's Markdown and JSON.
# Dry run on a CPU: BUDGET=dry EXTRA="--set num_train_examples=512" bash bench/gpu_reproduce.sh OUT
set -u
out=$1
budget=${BUDGET:-gpu} runs=${RUNS_DIR:-/tmp/awn-runs} data=${DATA_DIR:-/tmp/cifar10}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if compgen -G ".whl/core/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/core/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
log() { echo "=== $(date +%T) $*"; }
if [ ! -d "$data/train" ]; then
  log "unpack data"; python3 -m awn_jax.data.jpeg_pack unpack gpu_payload/cifar10.jpack.npz "$data" || exit 1
fi
if [ ! -d "$runs" ] && [ -f gpu_payload/runs.tar.gz ]; then
  log "restore runs"; mkdir -p "$runs" && tar -xzf gpu_payload/runs.tar.gz -C "$runs"
fi
log "campaign ($budget)"
python3 reproduce.py --budget "$budget" --runs_dir "$runs" --data_dir "$data" --parallel \
  --train_seconds "${TRAIN_S:-420}" --archive "$out/runs.tar.gz" ${EXTRA:-} 2>&1 | tee "$out/campaign.log"
cp "$runs"/"$budget"-*ep/report/report.md "$runs"/"$budget"-*ep/report/report.json "$out"/ 2>/dev/null
log "done"; ls -la "$out"
