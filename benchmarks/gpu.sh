#!/usr/bin/env bash
# Every GPU figure of the issues in a few calls on a lent GPU machine (see docs/scaling.md). A session is lent
# ~15 minutes of device time, start included: about one 10-minute call. What is left, one call each, most wanted
# first: `next`; `study` with JOBS="maskrcnn:1 maskrcnn:2"; `study-fp32`; then `extra` and `bench`.
#   bash benchmarks/gpu.sh next OUT         what is most wanted, in one call (~7-9 min): Mask R-CNN vs torchvision
#                                           with RoIAlign's new backward pass (issue 7) and its trace; the bf16
#                                           gradient checks and the U-Net step vs PyTorch after the bf16 fix (issue 10)
#   bash benchmarks/gpu.sh bench OUT        U-Net train step vs PyTorch (bf16) with a jax.profiler trace, tiled
#                                           prediction, the input pipeline against the step on DSB2018 (~7 min)
#   bash benchmarks/gpu.sh maskrcnn OUT     Mask R-CNN vs torchvision with a jax.profiler trace of the JAX step
#                                           (summary in OUT), and the JAX step with 40 mask-head slots (~6 min)
#   bash benchmarks/gpu.sh extra OUT        bf16 gradient checks (precision_check.py), the float32 U-Net step,
#                                           the input pipeline on synthetic images and without the decoded-example
#                                           cache (~6 min)
#   bash benchmarks/gpu.sh study OUT [S]    the `gpu` study budget, three seeds side by side, stopped (SIGTERM)
#                                           after S seconds; VARIANTS=a,b limits it to some variants, or
#                                           JOBS="unet_3class:0 maskrcnn:0" runs one process per variant:seed
#   bash benchmarks/gpu.sh study-fp32 OUT [S]  unet_boundary x 3 seeds of the same budget in float32 (does bf16
#                                           change the results beyond seed noise?), in runs/gpu-fp32; then
#                                           python -m experiments.compare runs/gpu/results/gpu.jsonl \
#                                             runs/gpu-fp32/results/gpu.jsonl --method unet_boundary
# A study goes on across sessions: copy OUT's results/ back to runs/gpu/results (runs/gpu-fp32/results) and carry
# that path in the next session; runs whose rows are there are skipped (checkpoints do not travel: a run stopped
# half-way starts again). Each stage fits one 10-minute call. Run from the repository root. Missing Python packages
# travel as wheels in .whl/ (installed to /tmp/site), the prepared DSB2018 (holdout_fraction=0.1, 46 MiB) in
# .gpudata/: `bash benchmarks/gpu_pack.sh` makes both here (57 MiB). Results go to OUT (default $OUT).
set -u
stage=${1:?usage: gpu.sh next|bench|maskrcnn|extra|study|study-fp32 OUT [seconds]}
out=${2:-${OUT:?give OUT}}
limit=${3:-420}
mkdir -p "$out"
if [ -d .whl ] && [ ! -d /tmp/site/grain ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export NUCJAX_DATA_DIR=${NUCJAX_DATA_DIR:-$PWD/.gpudata}

# The commands that several stages share; the first argument of each is its time limit in seconds.
machine_info() {
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    python3 -c "import jax, flax, optax, orbax.checkpoint as ocp, grain, torch, torchvision; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
  } 2>&1 | tee "$out/machine.txt"
}
unet_step_bf16() {  # the base-32 U-Net step, bf16, batch 128, against PyTorch eager and torch.compile
  # H100 SXM dense peaks: 989 TFLOP/s bf16, 495 TF32 (XLA and PyTorch use TF32 for float32 convolutions by default)
  # upsample=transpose was measured on 2026-11-25 (2,344 images/s, 0.78x dense) and is left out to save time.
  timeout "$1" python3 benchmarks/bench_train.py --device gpu --precision bfloat16 --batch 128 --upsample dense \
    --torch channels_last --compile --peak-tflops 989 "${@:2}" 2>&1 | tee "$out/bench_train_bf16.txt"
}
maskrcnn_vs_torchvision() {  # ResNet-50-FPN, 256², batch 8, bf16, 128 mask-head slots, with a trace of the JAX step
  timeout "$1" python3 benchmarks/bench_maskrcnn.py --depth 50 --size 256 --batch 8 --instances 32 --steps 10 \
    --precision bfloat16 --profile /tmp/nucjax-maskrcnn-trace 2>&1 | grep -v cuda_timer | tee "$out/bench_maskrcnn.txt"
  timeout 60 python3 benchmarks/trace_summary.py /tmp/nucjax-maskrcnn-trace --top 80 \
    > "$out/bench_maskrcnn_trace_top80.txt"
}
precision_checks() {  # does this backend sum bf16 gradients in bf16? and the bf16 gradient error on DSB2018 batches
  { timeout 60 python3 benchmarks/precision_check.py --sum-check
    timeout "$1" python3 benchmarks/precision_check.py --config configs/unet_boundary.py --override \
      model.base_width=32 precision=bfloat16 data.builder_kwargs.holdout_fraction=0.1 data.num_workers=0 \
      --batches 2 --layers 5
  } 2>&1 | grep -v WARNING | tee "$out/precision_check.txt"
}

if [ "$stage" = next ]; then
  machine_info
  maskrcnn_vs_torchvision 230
  precision_checks 100
  unet_step_bf16 170 --steps 20 --rounds 2
  ls -la "$out"
elif [ "$stage" = bench ]; then
  machine_info
  unet_step_bf16 200 --steps 20 --rounds 3 --profile /tmp/nucjax-trace
  timeout 240 python3 benchmarks/bench_predict.py --config configs/unet_boundary.py \
    --override model.base_width=32 precision=bfloat16 predict.tile_size=1024 predict.tile_batch=8 --sizes 1024,4096 \
    2>&1 | tee "$out/bench_predict.txt"
  # The ratio: the pipeline's images/s over the bf16 base-32 unet_boundary step's, on DSB2018, in the steady
  # state of training: each of the 15 workers keeps its own decoded-example cache, which is ~90% full after ~10
  # batches of 128 per worker (534 training images), hence 150 warm-up batches.
  timeout 160 python3 benchmarks/bench_input.py --source dsb2018 --step configs/unet_boundary.py \
    --override model.base_width=32 precision=bfloat16 data.builder_kwargs.holdout_fraction=0.1 --batch 128 --crop 256 \
    --workers 15 --warmup 150 \
    --batches 30 2>&1 | tee "$out/bench_input_dsb.txt"
elif [ "$stage" = maskrcnn ]; then
  maskrcnn_vs_torchvision 280
  # The same JAX step with 40 mask-head slots per image (about the positives torchvision's mask head runs on here).
  timeout 150 python3 benchmarks/bench_maskrcnn.py --depth 50 --size 256 --batch 8 --instances 32 --steps 10 \
    --precision bfloat16 --no-torch --model roi_positive_fraction=0.078125 2>&1 | grep -v cuda_timer \
    | tee -a "$out/bench_maskrcnn.txt"
elif [ "$stage" = extra ]; then
  precision_checks 120
  timeout 130 python3 benchmarks/bench_train.py --device gpu --precision float32 --batch 128 --steps 10 --rounds 2 \
    --upsample dense --torch channels_last --peak-tflops 495 2>&1 | tee "$out/bench_train_fp32.txt"
  timeout 80 python3 benchmarks/bench_input.py --source synthetic --size 256 320 --images 96 --batch 128 --crop 256 \
    --workers 0,15 --sets boundary,3-class --batches 6 2>&1 | tee "$out/bench_input.txt"
  timeout 80 python3 benchmarks/bench_input.py --source dsb2018 --override data.builder_kwargs.holdout_fraction=0.1 \
    --batch 128 --crop 256 --workers 0,15 \
    --sets boundary --compact --warmup 20 --batches 10 --cache-mb 0 2>&1 | tee -a "$out/bench_input_dsb.txt"
elif [ "$stage" = study ]; then
  # One run is input-bound (augmentation on the CPU), so three seeds share the GPU, each with its own input workers
  # and a quarter of the GPU's memory; a fourth process adds the classical rows. All share one results file.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.18}  # up to 5 processes
  common=(--budget gpu --workdir runs/gpu --results-dir runs/gpu/results --figures-dir runs/gpu/figures)
  only=(${VARIANTS:+--variants "$VARIANTS"})
  timeout -s TERM "$limit" python3 -m experiments.study "${common[@]}" --gather > "$out/classical.log" 2>&1 &
  if [ -n "${JOBS:-}" ]; then  # JOBS="unet_3class:0 maskrcnn:0": one process per variant:seed
    for job in $JOBS; do
      timeout -s TERM "$limit" python3 -m experiments.study "${common[@]}" --variants "${job%:*}" --seeds "${job#*:}" \
        --no-classical > "$out/${job%:*}-s${job#*:}.log" 2>&1 &
    done
  else
    for s in 0 1 2; do
      timeout -s TERM "$limit" python3 -m experiments.study "${common[@]}" "${only[@]}" --seeds $s --no-classical \
        > "$out/seed$s.log" 2>&1 &
    done
  fi
  wait
  tail -n 5 "$out"/*.log
  timeout 100 python3 -m experiments.study "${common[@]}" --gather 2>&1 | tail -n 5
  cp -r runs/gpu/results "$out/results"
  tar czf "$out/study.tgz" runs/gpu/results runs/gpu/figures runs/gpu/*/metrics.jsonl runs/gpu/*/config.json \
    runs/gpu/*/study.json 2>/dev/null
  ls -la "$out"
elif [ "$stage" = study-fp32 ]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
  common=(--budget gpu --workdir runs/gpu-fp32 --results-dir runs/gpu-fp32/results --figures-dir runs/gpu-fp32/figures
          --variants unet_boundary --no-classical --override precision=float32)
  for s in 0 1 2; do
    timeout -s TERM "$limit" python3 -m experiments.study "${common[@]}" --seeds $s > "$out/fp32-seed$s.log" 2>&1 &
  done
  wait
  tail -n 5 "$out"/fp32-seed*.log
  cp -r runs/gpu-fp32/results "$out/results"
  tar czf "$out/study-fp32.tgz" runs/gpu-fp32/results runs/gpu-fp32/*/metrics.jsonl runs/gpu-fp32/*/study.json \
    2>/dev/null
else
  echo "unknown stage $stage (next, bench, maskrcnn, extra, study or study-fp32)" >&2
  exit 2
fi
