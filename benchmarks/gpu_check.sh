#!/usr/bin/env bash
# The prepared GPU check: run in one call on the GPU machine (an H200 whose image has torch, torchvision and
# transformers, no network, no pip), from the source tree, in under 8 minutes; tables land under $OUT.
#
#   bash benchmarks/gpu_check.sh            # GPU: autobatch on emulated cards, then the profiles
#   bash benchmarks/gpu_check.sh --dry-run  # CPU, tiny models, ~30 s: everything but the GPU itself
#
# Phases, each under `timeout` so a slow one cannot take the others' time (TOTAL_S in all):
#   1. environment: GPU, driver, torch -> $OUT/env.txt; then benchmarks/cuda_checks.py (issue 10 item 10: fp16
#      optimizer state, a failed backward's release, the fake device against max_memory_allocated;
#      issue 13: Adam's moments across carry_over in the device kernels) ->
#      $OUT/cuda_checks.md
#   2. benchmarks/autobatch.py --cuda (another engineer's; emulated 16/24/40/80 GiB cards): absence or failure
#      is logged and tolerated -> $OUT/autobatch.txt
#   3. the profile of ResNet-50, ViT-B/16 and GPT-2 small (benchmarks/gpu_models.py, plain torch) at fp32 and
#      bf16 against a 24 GiB budget -> $OUT/profile/profile.md, one JSON per model, PNGs
#   4. if time is left: GPT-2 small, bf16, checkpointing off and on -> $OUT/profile-ckpt/profile.md
# Every table is rewritten after each model, so a phase cut by its timeout keeps what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Fewer fragmented segments when sizes change between probes (PyTorch's CUDA memory docs); see DESIGN.md.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export BATCHLAB_OUT="$OUT"  # for scripts that want to put their own files beside these

TOTAL_S=450         # 7.5 minutes of the 8, leaving time to copy $OUT back
AUTOBATCH_S=200     # phase 2's cap
PROFILE_S=200       # phase 3's cap; its --deadline stops starting new models 60 s before
START=$SECONDS

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((TOTAL_S - (SECONDS - START))); }
count() { local n; n=$(grep -c "$1" "$2" 2>/dev/null); echo "${n:-0}"; }  # lines matching; 0 if no file
cap() { local want=$1 rest; rest=$(left); if ((want < rest)); then echo "$want"; else echo "$rest"; fi; }

if ((DRY)); then
  DEVICE=cpu
  MODEL_ARGS=(--scale tiny --memory-budget 2GiB --max-batch-size 4 --seconds-per-point 0)
else
  DEVICE=cuda
  # 24 GiB (like the autobatch benchmark's 24 GiB card): batches in the hundreds for the CNN and ViT, tens
  # for GPT-2 at 1024 tokens, so each model profiles in well under a minute on an H200.
  MODEL_ARGS=(--scale full --memory-budget 24GiB --seconds-per-point 0.5)
fi

# ---- 1. environment ----------------------------------------------------------------------------------------
{
  date -u
  echo "dry run: $DRY, python: $PY"
  if ((DRY == 0)) && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
} >"$OUT/env.txt" 2>&1
log "environment: $(tail -n 1 "$OUT/env.txt")"
if ((DRY == 0)) && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  log "CUDA is not available: nothing to check (use --dry-run on a CPU machine)"
  exit 1
fi

# ---- 1b. correctness on the card: fp16 optimizer state, failed-backward release, fake vs allocator ----------
timeout --kill-after=10 "$(cap 120)" "$PY" benchmarks/cuda_checks.py --device "$DEVICE" --out "$OUT" \
  >"$OUT/cuda_checks.txt" 2>&1
rc=$?
log "cuda checks: exit $rc ($(count '^\*\*pass' "$OUT/cuda_checks.md") of $(count '^## ' "$OUT/cuda_checks.md") pass)"

# ---- 2. autobatch side by side (tolerated: absent, failing or cut) -----------------------------------------
if [[ ! -f benchmarks/autobatch.py ]]; then
  log "autobatch: benchmarks/autobatch.py absent, skipped"
elif ((DRY)); then
  # Only check that it starts and offers --cuda: its CPU run takes many minutes.
  if timeout 60 "$PY" benchmarks/autobatch.py --help >"$OUT/autobatch.txt" 2>&1; then
    if grep -q -- "--cuda" "$OUT/autobatch.txt"; then log "autobatch: --help ok, has --cuda"; else log "autobatch: --help ok, NO --cuda option"; fi
  else
    log "autobatch: --help failed (tolerated)"
  fi
else
  timeout --kill-after=10 "$(cap $AUTOBATCH_S)" "$PY" benchmarks/autobatch.py --cuda >"$OUT/autobatch.txt" 2>&1
  rc=$?
  if ((rc == 2)); then  # argparse's usage error: an older interface without --cuda
    log "autobatch: --cuda not accepted, trying --device cuda"
    timeout --kill-after=10 "$(cap $AUTOBATCH_S)" "$PY" benchmarks/autobatch.py --device cuda >>"$OUT/autobatch.txt" 2>&1
    rc=$?
  fi
  log "autobatch: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
  if [[ -d benchmarks/results ]]; then cp -r benchmarks/results "$OUT/autobatch-results" 2>/dev/null; fi
fi

# ---- 3. profiles: ResNet-50, ViT-B, GPT-2 small at fp32 and bf16 -------------------------------------------
budget=$(cap $PROFILE_S)
if ((budget > 30)); then
  timeout --kill-after=10 "$budget" "$PY" benchmarks/profile_builtin.py \
    --gpu-models resnet50,vit-b,gpt2-small --device "$DEVICE" --precision fp32,bf16 \
    --deadline $((budget - 60)) "${MODEL_ARGS[@]}" --out "$OUT/profile" >"$OUT/profile.txt" 2>&1
  rc=$?
  log "profile: exit $rc ($(count '^| ' "$OUT/profile/profile.md") table rows)"
else
  log "profile: skipped, only ${budget}s left"
fi

# ---- 4. what checkpointing buys on GPT-2 small, if time is left -------------------------------------------
budget=$(cap 90)
if ((budget > 45)); then
  timeout --kill-after=10 "$budget" "$PY" benchmarks/profile_builtin.py \
    --gpu-models gpt2-small --device "$DEVICE" --precision bf16 --checkpointing off,on \
    "${MODEL_ARGS[@]}" --out "$OUT/profile-ckpt" >"$OUT/profile-ckpt.txt" 2>&1
  log "profile with checkpointing: exit $?"
else
  log "profile with checkpointing: skipped, only ${budget}s left"
fi

log "done in $((SECONDS - START))s; tables under $OUT"
exit 0
