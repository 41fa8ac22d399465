#!/usr/bin/env bash
# The GPU check, on any CUDA machine in about five minutes: the CUDA-only tests (xformers when it is
# installed), the bf16 speed table against PEFT LoRA and LyCORIS, and a short bf16 DreamBooth run on the
# toy base with its training speed. Results land in $RESULTS_DIR (default benchmarks/results).
#
#   benchmarks/gpu_check.sh                      # PYTHON=... to pick the interpreter
#   GPU_CHECK_COMPILED=1 benchmarks/gpu_check.sh # also the speed table with torch.compile (minutes more)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
RUN_DIR=${RUN_DIR:-runs/gpu_check}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh needs a CUDA device'; \
print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

echo "== CUDA-only tests"
"$PYTHON" -m pytest -q -p no:logging tests/test_cuda.py tests/test_models.py -k "cuda or xformers"

echo "== bf16 training step, peak memory and inference: SD 1.5-config UNet, attn+conv, rank 8, batch 4, 64x64"
# Each contender runs in a fresh process (imports and a built UNet: about 30 s each on an H200).
"$PYTHON" benchmarks/speed.py --device cuda --batch 4 --mixed_precision bf16 --warmup 2 --steps 6 \
  --infer-steps 4 --load-repeats 1 --no-plot --output-dir "$RESULTS_DIR" --name speed_cuda_bf16 \
  --contenders peft-lora lycoris-locon-tucker lora flora liera-tucker-exp liera-lowrank-exp

if [ "${GPU_CHECK_COMPILED:-0}" = 1 ]; then  # opt-in: compiling each contender adds minutes
  echo "== the same, torch.compile'd (inductor), PEFT LoRA and ours"
  "$PYTHON" benchmarks/speed.py --device cuda --batch 4 --mixed_precision bf16 --compile --warmup 3 --steps 6 \
    --infer-steps 4 --load-repeats 1 --no-plot --output-dir "$RESULTS_DIR" --name speed_cuda_bf16_compiled \
    --contenders peft-lora lora flora liera-tucker-exp
fi

echo "== bf16 DreamBooth on the toy base, batch 4, script defaults otherwise: eager, then compiled (inductor)"
for backend in no inductor; do
  "$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend "$backend" train_scripts/train_dreambooth_liera.py --output_dir "$RUN_DIR/dreambooth-$backend" \
    --overwrite_output_dir --mixed_precision bf16 --max_train_steps 300 --num_class_images 16 \
    --validation_steps 1000 --checkpointing_steps 1000
done
"$PYTHON" - "$RUN_DIR" <<'PY'
import json
import sys

for backend in ["no", "inductor"]:
    metrics = json.load(open(f"{sys.argv[1]}/dreambooth-{backend}/metrics.json"))
    rate = metrics["steps"] / metrics["train_loop_time_s"]
    print(f"toy DreamBooth, bf16, batch 4, dynamo backend {backend}: {metrics['steps']} steps in "
          f"{metrics['train_loop_time_s']} s = {rate:.1f} it/s overall, {metrics['steady_steps_per_s']} it/s "
          f"after the first 10 (goal: at least 40); held-out loss x{metrics['heldout_loss_ratio']:.3f}")
PY
