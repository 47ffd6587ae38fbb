#!/usr/bin/env bash
# Decode-step cost against its roofline (split-KV kernel vs packed-GQA SDPA) and end-to-end throughput (exact
# sequential vs iterative prefill) for the tinyllama, Llama-2-7B and LLaMA-33B pairs on ONE 80 GB GPU, in calls that
# each fit 10 minutes (every step has its own time limit). Its results as run on an H100 on 2026-11-26 are
# bench/results/decode_e2e_h100/ (docs/performance.md). The fuller plans are bench/decode_roofline.sh and
# bench/e2e_throughput.sh.
#
#   bash bench/decode_e2e_80gb.sh call1 OUT   # split-KV kernel GPU tests; tinyllama pair, P2048+G2048, batch 1 and 512:
#                                             # sdpa_split_kv (LCKV prefill sequential) vs sdpa_packed_gqa (LCKV iterative)
#   bash bench/decode_e2e_80gb.sh call2 OUT   # tinyllama pair at batch 512 again (after call1's fixes: one cache at a time,
#                                             # prefill masks built per 64 tokens); batch-1 decode-step profile
#   bash bench/decode_e2e_80gb.sh call3 OUT   # LLaMA-33B shape pair, P256+G768, each near its max batch (LCKV sequential
#                                             # prefill); tinyllama with transformers' stock dynamic-cache generate
#   bash bench/decode_e2e_80gb.sh call4 OUT   # LLaMA-33B LCKV at smaller batches (call3's 272 and 200 ran out of memory);
#                                             # Llama-2-7B pair, P256+G768
#   bash bench/decode_e2e_80gb.sh smoke OUT   # CPU: every step above on tiny configs (same code paths)
#
# Each step writes OUT/<step>/{log,latency.json,...}. Decode steps are timed on --steps tokens at the start and at
# the end of the context and extrapolated over gen_len (latency.json: setting.extrapolation).
set -uo pipefail
part=${1:?call1, call2, call3, call4 or smoke}
out=${2:-bench/results/decode_e2e_80gb}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}

if [ "$part" = smoke ]; then
    for call in call1 call2 call3 call4; do SMOKE=1 bash "$0" "$call" "$out"; done
    exit 0
fi
if [ "${SMOKE:-0}" = 1 ]; then
    $py -m bench.smoke_llama_config "$out"
    TL=$out/smoke_llama.json TLO=configs/test_tiny_opt.json L33=$TL L33O=$TLO L7=$TL L7O=$TLO
    P2K=(--prompt_len 12 --gen_len 8) P256=(--prompt_len 10 --gen_len 6) STEPS=(--steps 2) SAMPLE=(--prefill_sample 2)
    CHUNK=(--prefill_chunk 1) TESTS=(tests/test_decode_attention.py -k "not generation")
    B1_512=1,2 B512=2 B33L=2 B33O=3 B33S=2 B7L=2 B7O=3 BSTOCK=2
    dev=(--device cpu --attention_batches 1,2)
    common=(--device cpu)
else
    TL=configs/tinyllama.json TLO=configs/tinyllama_opt.json L33=configs/llama33b.json L33O=configs/llama33b_opt.json
    L7=configs/llama2_7b.json L7O=configs/llama2_7b_opt.json
    P2K=(--prompt_len 2048 --gen_len 2048) P256=(--prompt_len 256 --gen_len 768) STEPS=(--steps 16) SAMPLE=(--prefill_sample 64)
    CHUNK=(--prefill_chunk 64) TESTS=(tests/test_decode_attention_gpu.py)
    # Max batches from `test_latency.py --plan --gpu_memory 80GB` (KV-bound: 33B 9 / 306, 7B 123 / 1,360 at 1,024
    # tokens) less headroom for the captured step; a batch that does not fit is recorded as {"oom": true} and the next
    # one in the list runs.
    B1_512=1,512 B512=512 B33L=8,6 B33O=272,200 B33S=128,64 B7L=112,96 B7O=1024,512 BSTOCK=256
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$gpu_name" in *H200*) hbm=4.8TB ;; *) hbm=3.35TB ;; esac
    echo "device: $gpu_name, roofline bandwidth $hbm"
    dev=()
    common=(--hbm_bandwidth "$hbm")
fi

. "$(dirname "$0")/step.sh"

lat() {  # lat NAME SECONDS ARGS...: test_latency.py, JSON under OUT/NAME
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$py" test_latency.py "$@" "${common[@]}" --output_dir "$out/$name"
}

case "$part" in
call1)
    step gpu_kernel_tests 110 "$py" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
    LCKV_FLASH_ATTN=1 lat tinyllama_split_kv 280 --configs "$TL" "$TLO" --compile --attn_implementation sdpa_split_kv \
        --prefill sequential "${CHUNK[@]}" "${P2K[@]}" "${STEPS[@]}" --batches "$B1_512"
    LCKV_FLASH_ATTN=1 lat tinyllama_packed 190 --configs "$TL" "$TLO" --compile --attn_implementation sdpa_packed_gqa \
        --prefill iterative "${CHUNK[@]}" "${P2K[@]}" "${STEPS[@]}" --batches "$B1_512"
    ;;
call2)
    LCKV_FLASH_ATTN=1 lat tinyllama_b512 200 --configs "$TL" "$TLO" --compile --attn_implementation sdpa_split_kv \
        --prefill sequential "${CHUNK[@]}" "${P2K[@]}" "${STEPS[@]}" --batches "$B512"
    step profile_b1 120 "$py" -m bench.profile_decode --configs "$TL" "$TLO" --attn_implementation sdpa_split_kv \
        "${P2K[@]}" --steps 8 "${dev[@]}" --output_dir "$out/profile_b1"
    ;;
call3)
    lat llama33b_llama 170 --configs "$L33" --compile "${P256[@]}" "${STEPS[@]}" --batches "$B33L"
    lat llama33b_lckv 230 --configs "$L33O" --compile --prefill sequential "${P256[@]}" "${STEPS[@]}" --batches "$B33O"
    lat tinyllama_stock 110 --configs "$TL" --attn_implementation sdpa --cache dynamic "${P2K[@]}" "${STEPS[@]}" --batches "$BSTOCK"
    ;;
call4)
    lat llama33b_lckv_small 190 --configs "$L33O" --compile --prefill sequential "${P256[@]}" "${STEPS[@]}" --batches "$B33S"
    lat llama2_7b_llama 110 --configs "$L7" --compile "${CHUNK[@]}" "${P256[@]}" "${STEPS[@]}" --batches "$B7L"
    lat llama2_7b_lckv 190 --configs "$L7O" --compile --prefill sequential "${SAMPLE[@]}" "${P256[@]}" "${STEPS[@]}" --batches "$B7O"
    ;;
*)
    echo "part: $part; allowed values are call1, call2, call3, call4, smoke" >&2
    exit 2
    ;;
esac
