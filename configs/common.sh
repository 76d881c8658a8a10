# Shared part of the paper-setting scripts (sourced by rwkv6-*.sh; not run on its own).
# Inputs from the calling script: MODEL_NAME.  Command line: METHOD MODEL.pth DATA_PREFIX [PROJ_DIR] [extra flags...]
# Environment knobs: GPUS (8), MICRO_BSZ (4), STRATEGY (deepspeed_stage_2), DATA_TYPE (sft),
#   EPOCH_COUNT (1), EPOCH_STEPS (default: one pass over the documents at global batch 64),
#   PYTHON (python), WANDB (W&B project, empty = off).
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: bash $0 {bone|lora|pissa} MODEL.pth DATA_PREFIX [PROJ_DIR] [extra train.py flags]" >&2
    exit 2
fi
METHOD=$1; LOAD_MODEL=$2; DATA=$3; shift 3
PROJ_DIR=${1:-out/${MODEL_NAME}-${METHOD}}; [ "$#" -gt 0 ] && shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-8}
MICRO_BSZ=${MICRO_BSZ:-4}
GLOBAL_BSZ=64                                   # the paper: total batch 64, lr 2e-5 constant, one epoch
if [ $((GLOBAL_BSZ % (GPUS * MICRO_BSZ))) -ne 0 ]; then
    echo "GPUS x MICRO_BSZ = $((GPUS * MICRO_BSZ)) must divide the global batch $GLOBAL_BSZ" >&2
    exit 2
fi
ACCUM=$((GLOBAL_BSZ / (GPUS * MICRO_BSZ)))
case "$METHOD" in
    bone)  PEFT_FLAGS="--peft bone --bone_b 64 --bone_mode row" ;;
    lora)  PEFT_FLAGS="--peft lora --lora_r 32 --lora_alpha 32" ;;
    pissa) PEFT_FLAGS="--peft pissa --pissa_r 32 --svd_niter 4" ;;
    *) echo "METHOD must be bone, lora or pissa (equal trainable parameters), got '$METHOD'" >&2; exit 2 ;;
esac
DATA_TYPE=${DATA_TYPE:-sft}
if [ -z "${EPOCH_STEPS:-}" ]; then              # one full pass over the documents
    DOCS=$(cd "$ROOT" && "$PYTHON" -c "import sys; from rwkv_bone.data.binidx import MMapIndexedDataset as M; print(len(M(sys.argv[1])))" "$DATA")
    EPOCH_STEPS=$(( (DOCS + GLOBAL_BSZ - 1) / GLOBAL_BSZ ))
fi
cd "$ROOT"
set -x
exec "$PYTHON" train.py --load_model "$LOAD_MODEL" --data_file "$DATA" --data_type "$DATA_TYPE" \
    --proj_dir "$PROJ_DIR" $PEFT_FLAGS \
    --ctx_len 512 --micro_bsz "$MICRO_BSZ" --accumulate_grad_batches "$ACCUM" \
    --devices "$GPUS" --accelerator gpu --strategy "${STRATEGY:-deepspeed_stage_2}" --precision bf16 --grad_cp 1 \
    --lr_init 2e-5 --lr_final 2e-5 --lr_schedule constant --warmup_steps 0 \
    --beta1 0.9 --beta2 0.99 --adam_eps 1e-8 --weight_decay 0 --grad_clip 1.0 \
    --epoch_steps "$EPOCH_STEPS" --epoch_count "${EPOCH_COUNT:-1}" --epoch_save 1 --save_every_steps 200 \
    --wandb "${WANDB:-}" "$@"
