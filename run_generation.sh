#!/usr/bin/env bash
# Generate from a trained checkpoint (opt-llama or llama), streaming tokens to the terminal, and compare the speed
# with and without the KV cache.
#
#   bash run_generation.sh                                   # defaults below
#   MODEL=outputs/llama_tiny-wikitext103 PROMPT="KING:" bash run_generation.sh --do_sample --top_p 0.9
#   echo "ROMEO:" | PROMPT= bash run_generation.sh           # empty PROMPT: read the prompt from stdin
#   bash run_generation.sh --prefill sequential --static_cache  # exact prefill: the cache run alone
#
# Extra args go to run_generation.py (python run_generation.py --help lists them all).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL-outputs/llama_tiny_opt-wikitext103}
PROMPT=${PROMPT-"ROMEO:"}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS-128}

args=(--model_name_or_path "$MODEL" --max_new_tokens "$MAX_NEW_TOKENS")
# The cache / no-cache comparison, unless an extra flag asks for one side or needs the cache (a prefill mode, offload).
# A checkpoint whose config asks for the exact prefill compares too: its no-cache forwards are exact as well.
compare=true
for arg in "$@"; do
  case $arg in --compare_cache | --no_cache | --prefill | --prefill=* | --offload) compare=false ;; esac
done
if [ "$compare" = true ]; then
  args+=(--compare_cache)
fi
if [ -n "$PROMPT" ]; then
  args+=(--prompt "$PROMPT")
fi
exec python run_generation.py "${args[@]}" "$@"
