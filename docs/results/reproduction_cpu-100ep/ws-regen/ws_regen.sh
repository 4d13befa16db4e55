#!/usr/bin/env bash
# Regenerate ANN-WS epochs 3-42 in ~/awn-runs/ws-regen (stop once 42 is saved); resumes.
# Set up once: mkdir -p ~/awn-runs/ws-regen/checkpoints; copy the run's checkpoints/2,
# config.json and dataset_info.json there, and the first 2 lines of its metrics.jsonl.
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../../.."  # the repository root
nice -n 8 python "$here/ws_regen.py" >> ~/awn-runs/ws-regen.log 2>&1 &
pid=$!
while [[ ! -f ~/awn-runs/ws-regen/checkpoints/42/commit_success.txt ]] && kill -0 $pid 2>/dev/null; do
  sleep 60
done
kill $pid 2>/dev/null
