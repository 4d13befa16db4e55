#!/usr/bin/env bash
# The checks of one short GPU session (H100/H200 lent through the workplace's device tool),
# kept so the numbers in bench/RESULTS.md and docs/ROBUSTNESS.md can be traced to a command.
#
#   PHASES="1 2 3" bash bench/gpu_checks.sh OUT_DIR DATA_DIR WORKDIR...
#   PHASES="4 2" OLD_PALLAS=old_pallas.py bash bench/gpu_checks.sh OUT_DIR -
#   PHASES="6 5" bash bench/gpu_checks.sh OUT_DIR DATA_DIR   # DATA_DIR: CIFAR-10 image folder
#
# The GPU machine has JAX with CUDA, flax, optax, orbax and chex but not ml_collections or
# tensorboardX: those travel as wheels in .whl/core (pip download --no-deps); its own
# flax/optax/orbax are used. Phases:
#   1. kernels (alone on the GPU, for clean timings): correctness of every adder
#      implementation against the float64 reference, then the ResNet-20 layer timings;
#   2. train steps (alone): images/s of CNN / ANN / ANN-WS / ANN-AWN ResNet-20 steps;
#   3. evaluation of the CPU-trained runs in WORKDIR... from the test images in DATA_DIR,
#      in parallel processes (compilation is CPU-bound, the GPU mostly idle): the Table-1
#      attacks x BN modes, the batch study and the two PGD sweeps;
#   4. a kernel change, A/B (alone on the GPU): the Pallas kernels against an earlier version
#      of adder_pallas.py ($OLD_PALLAS, e.g. `git show REV:awn_jax/ops/adder_pallas.py`), both
#      checked against the float64 reference first; tile variants ($DX_VARIANTS) timed in two
#      orders; the compiled memory of the Pallas layers.
#   5. detection (alone): images/s and compiled memory of the Faster R-CNN + FPN train step
#      at the VOC input size, CNN / ANN / ANN-AWN (bench/detection.py);
#   6. the strict study (issue 13) of the four shipped ResNet-20s at GPU budgets, one process
#      per model (compilation is CPU-bound): 2,000 test images of DATA_DIR, APGD 100
#      iterations, Square 1,000 queries, EOT 4 draws x 10 steps, harm 10 steps; each
#      process keeps its finished parts, so a rerun of the phase resumes. STRICT_ARGS
#      replaces the budgets (e.g. tiny ones for a dry run on a CPU).
# Each step has its own time limit, so a slow step loses only its own results.
set -u
out=$1 data=$2; shift 2
mkdir -p "$out/eval"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/core/*.whl
export PYTHONPATH=/tmp/site:$PWD
log() { echo "=== $(date +%T) $*"; }

log versions
nvidia-smi -L
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
phases=${PHASES:-1 2 3}
if [[ $phases == *1* ]]; then
log "phase 1: adder kernels"
timeout 150 python3 bench/adder_conv.py --batch 256 \
  --impl pallas,xla,conv-fp32,naive,pallas:pixels=128:warps=8 --repeats 3 \
  --reference-max-mb 4096 --check-batch 2 --time-budget-s 120 --output "$out/adder_conv_gpu.md"

fi
if [[ $phases == *4* ]]; then
log "phase 4: kernel change A/B, tile variants, memory"
timeout 150 python3 bench/adder_conv.py --batch 256 --repeats 5 --check-batch 2 \
  --impl "pallas,file=${OLD_PALLAS:?set OLD_PALLAS},conv-fp32" --time-budget-s 130 \
  --output "$out/adder_conv_ab.md"
# Tile variants (adder_conv.py --impl), timed twice, the second time in reverse order.
variants=${DX_VARIANTS:-pallas,pallas:dx_pixels=32:dx_channels=16,pallas:dx_accumulator=4096}
reversed=$(tr , '\n' <<< "$variants" | tac | paste -sd,)
round=0
for order in "$variants" "$reversed"; do
  timeout 130 python3 bench/adder_conv.py --batch 256 --repeats 5 --check-batch 0 \
    --impl "$order" --time-budget-s 110 --output "$out/adder_conv_tiles_$((++round)).md"
done
timeout 40 python3 bench/adder_memory.py --batch 256 --impl pallas --layers 0,4 \
  > "$out/adder_memory_gpu.md" 2>&1; cat "$out/adder_memory_gpu.md"

fi
if [[ $phases == *2* ]]; then
log "phase 2: train steps"
timeout 75 python3 bench/train_step.py --batch 128 --repeats 5 \
  --layer-types conv adder adder-awn > "$out/train_step_gpu.txt" 2>&1
cat "$out/train_step_gpu.txt"

fi
if [[ $phases == *3* ]]; then
log "phase 3: evaluation (parallel processes)"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_adder.py \
  -k pallas_compiled_gpu > "$out/eval/pytest_compiled_gpu.log" 2>&1 &
evaluate() { local name=$1; shift
  timeout 240 python3 evaluate.py --data_dir "$data" --output_dir "$out/eval/$name" "$@" \
    > "$out/eval/$name.log" 2>&1; echo "$name: exit $?"; }
runs=(); for w in "$@"; do
  runs+=(--workdir "$w"); run=$(basename "$w")
  # One process per run and study: a process that overruns loses only its own results.
  evaluate "table_$run" --workdir "$w" --study table --attack all --bn_mode all \
    --num_examples 5000 &
  evaluate "batch_$run" --workdir "$w" --study batch --bn_mode tracked,running-mean \
    --num_examples 2048 &
done
evaluate eps_sweep "${runs[@]}" --study eps-sweep --bn_mode tracked,running-mean \
  --num_examples 1000 &
evaluate steps_sweep "${runs[@]}" --study steps-sweep --bn_mode tracked,running-mean \
  --num_examples 1000 &
wait
tail -n 25 "$out"/eval/*.log
tar czf "$out/eval.tgz" -C "$out" eval && rm -rf "$out/eval"
fi
if [[ $phases == *5* ]]; then
log "phase 5: detection train steps"
timeout 300 python3 bench/detection.py --batch 4 --repeats 3 > "$out/detection_gpu.txt" 2>&1
cat "$out/detection_gpu.txt"

fi
if [[ $phases == *6* ]]; then
log "phase 6: strict study of the shipped models (parallel processes)"
python3 -c 'import tqdm, matplotlib' || echo "phase 6 needs tqdm and matplotlib: add wheels to .whl/core"
if [[ ! -d $data/test && -f gpu_payload/cifar10.jpack.npz ]]; then  # see gpu_reproduce.sh
  python3 -m awn_jax.data.jpeg_pack unpack gpu_payload/cifar10.jpack.npz "$data"
fi
strict_args=${STRICT_ARGS:---num_examples 2000 --batch_size 500 --apgd_steps 100 \
--square_queries 1000 --eot_attacked 50 --eot_draws 4 --eot_steps 10 --mate_steps 10 \
--control_batch_size 50}
for model in cifar10_r20_awn_10ep cifar10_r20_ann_10ep cifar10_r20_ws_10ep cifar10_r20_cnn_10ep; do
  # shellcheck disable=SC2086  # strict_args is a list of flags
  timeout 540 python3 evaluate.py --study strict --bn_mode all --pretrained "$model" \
    --data_dir "$data" $strict_args --output_dir "$out/strict/$model" \
    > "$out/strict_$model.log" 2>&1 &
done
wait
for model in cifar10_r20_awn_10ep cifar10_r20_ann_10ep cifar10_r20_ws_10ep cifar10_r20_cnn_10ep; do
  echo "== $model"; tail -c 2000 "$out/strict_$model.log" | tr '\r' '\n' | tail -n 25
done
fi
log done
