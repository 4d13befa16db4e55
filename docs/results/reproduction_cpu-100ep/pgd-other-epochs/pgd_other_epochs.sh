#!/usr/bin/env bash
# Does ANN-R-AWN's PGD-7 lead over ANN-R-WS at epoch 100 hold at other checkpoints (99, 74)?
cd /work/main
for epoch in 99 74; do for run in adder-awn adder-ws; do
  out=~/awn-runs/cpu-100ep/adjacent/$run-$epoch
  [[ -f $out/robustness.json ]] && continue
  echo "== $run $epoch $(date)"
  nice -n 10 python evaluate.py --workdir ~/awn-runs/cpu-100ep/$run --epoch $epoch --attack pgd \
    --bn_mode running-mean --num_examples 2000 --batch_size 500 --data_dir ~/awn-data/cifar10 \
    --output_dir $out
done; done
echo "== done $(date)"
