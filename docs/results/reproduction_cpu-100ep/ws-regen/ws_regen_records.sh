#!/usr/bin/env bash
# Per-epoch records of the regenerated ANN-WS epochs as their checkpoints land.
cd "$(dirname "$0")/../../../.."  # the repository root
while :; do
  nice -n 10 python analyze.py --study epoch-records --workdir ~/awn-runs/ws-regen \
    --data_dir ~/awn-data/cifar10 --output_dir ~/awn-runs/ws-regen-records
  echo "$(date) $(ls ~/awn-runs/ws-regen/records 2>/dev/null | wc -l) records"
  [[ -f ~/awn-runs/ws-regen/records/epoch-42.json ]] && break
  sleep 300
done
