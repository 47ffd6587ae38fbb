#!/usr/bin/env bash
# Stream far past the position limit with attention sinks + a recent window: long-text perplexity on the embedded
# corpus's test split (JSON under outputs/), then a long generation.
#
#   bash run_streaming.sh                                    # defaults below
#   MODEL=outputs/llama_tiny-wikitext103 WINDOW=508 bash run_streaming.sh
#
# Extra args go to both calls (--device, --dtype, --attn_implementation ...); GEN_ARGS holds args of the generation
# alone (sampling, --prefill sequential, --sequential_forward), PPL_ARGS of the perplexity alone: each mode refuses
# the other's flags (python run_streaming.py --help lists them all). Words split on spaces.
#   GEN_ARGS="--prefill sequential" bash run_streaming.sh --dtype float32
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL-outputs/llama_tiny_opt-wikitext103}
WINDOW=${WINDOW-252}                  # recent tokens per KV layer
SINKS=${SINKS-4}                      # attention-sink tokens
NUM_TOKENS=${NUM_TOKENS-20480}        # perplexity: tokens to stream (20x a 1024 position limit)
NEW_TOKENS=${NEW_TOKENS-4096}         # generation: tokens to generate
PROMPT=${PROMPT-"ROMEO:"}
OUTPUT_JSON=${OUTPUT_JSON-outputs/streaming_ppl_$(basename "$MODEL")_w${WINDOW}.json}

read -ra ppl_args <<<"${PPL_ARGS:-}"  # read splits on spaces without expanding globs
read -ra gen_args <<<"${GEN_ARGS:-}"
common=(--model_name_or_path "$MODEL" --window_size "$WINDOW" --num_sink_tokens "$SINKS" "$@")
python run_streaming.py "${common[@]}" --mode perplexity --use_embedded_corpus --num_tokens "$NUM_TOKENS" \
  --output_json "$OUTPUT_JSON" ${ppl_args[@]+"${ppl_args[@]}"}
python run_streaming.py "${common[@]}" --mode generate --prompt "$PROMPT" --max_new_tokens "$NEW_TOKENS" \
  --do_sample --top_p 0.9 ${gen_args[@]+"${gen_args[@]}"}
