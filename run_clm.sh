#!/usr/bin/env bash
# The paper's wikitext-103 pre-training recipe for a tiny LCKV model, through run_clm.py and the HF Trainer.
#
#   bash run_clm.sh                                  # defaults below, one GPU
#   NUM_GPUS=4 CONFIG=configs/llama_tiny.json OUTPUT_DIR=outputs/llama bash run_clm.sh
#   NUM_GPUS=2 ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml bash run_clm.sh   # FSDP2 (default: ddp.yaml)
#   bash run_clm.sh --max_steps 100 --eval_sequential  # extra args go to run_clm.py (and win: last flag counts)
#
# Every default is an env var. Offline (no hub)? Point it at local data and a local tokenizer:
#   DATA_ARGS="--train_file train.txt --validation_file valid.txt" TOKENIZER=path/to/tokenizer bash run_clm.sh
# or use the embedded corpus and its tokenizer: DATA_ARGS=--use_embedded_corpus TOKENIZER= bash run_clm.sh
set -euo pipefail
cd "$(dirname "$0")"

CONFIG=${CONFIG-configs/llama_tiny_opt.json}
TOKENIZER=${TOKENIZER-TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T}
DATA_ARGS=${DATA_ARGS-"--dataset_name wikitext --dataset_config_name wikitext-103-raw-v1"}
OUTPUT_DIR=${OUTPUT_DIR-outputs/$(basename "$CONFIG" .json)-wikitext103}
BLOCK_SIZE=${BLOCK_SIZE-1024}
BATCH_SIZE=${BATCH_SIZE-32}            # per device
GRAD_ACCUM=${GRAD_ACCUM-1}
LR=${LR-3e-4}
SCHEDULER=${SCHEDULER-cosine}
WARMUP_RATIO=${WARMUP_RATIO-0.015}     # a float < 1 is a ratio of total steps (warmup_steps in transformers v5)
WEIGHT_DECAY=${WEIGHT_DECAY-0.1}
EPOCHS=${EPOCHS-3}
EVAL_STEPS=${EVAL_STEPS-500}
SAVE_STEPS=${SAVE_STEPS-500}
PRECISION=${PRECISION-bf16}            # bf16 | fp16 | fp32
NUM_WORKERS=${NUM_WORKERS-8}           # tokenization processes
NUM_GPUS=${NUM_GPUS-1}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG-configs/accelerate/ddp.yaml}  # for NUM_GPUS>1; see docs/multi_gpu.md
REPORT_TO=${REPORT_TO-none}

# Kernel flags (each falls back to pure PyTorch, with a one-line warning, where its kernel can't run).
export LCKV_FLASH_ATTN=${LCKV_FLASH_ATTN-1}
export LCKV_FUSED_RMSNORM=${LCKV_FUSED_RMSNORM-1}
export LCKV_FUSED_ROTARY=${LCKV_FUSED_ROTARY-1}
export LCKV_FUSED_SWIGLU=${LCKV_FUSED_SWIGLU-1}
export LCKV_FUSED_CROSSENTROPY=${LCKV_FUSED_CROSSENTROPY-1}

args=(--config_name "$CONFIG" $DATA_ARGS --output_dir "$OUTPUT_DIR"
  --block_size "$BLOCK_SIZE" --per_device_train_batch_size "$BATCH_SIZE" --per_device_eval_batch_size "$BATCH_SIZE"
  --gradient_accumulation_steps "$GRAD_ACCUM" --learning_rate "$LR" --lr_scheduler_type "$SCHEDULER"
  --warmup_steps "$WARMUP_RATIO" --weight_decay "$WEIGHT_DECAY" --num_train_epochs "$EPOCHS"
  --eval_strategy steps --eval_steps "$EVAL_STEPS" --save_strategy steps --save_steps "$SAVE_STEPS"
  --logging_steps 10 --preprocessing_num_workers "$NUM_WORKERS" --report_to "$REPORT_TO"
  --do_train --do_eval)
[ -n "$TOKENIZER" ] && args+=(--tokenizer_name "$TOKENIZER")
[ "$PRECISION" != fp32 ] && args+=(--"$PRECISION")

if [ "$NUM_GPUS" -gt 1 ]; then
  # Every parameter gets a gradient (tests/test_distributed.py): skip DDP's unused-parameter search.
  exec accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" \
    --mixed_precision "${PRECISION/fp32/no}" run_clm.py "${args[@]}" --ddp_find_unused_parameters false "$@"
else
  exec python run_clm.py "${args[@]}" "$@"
fi
