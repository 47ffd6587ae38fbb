#!/usr/bin/env bash
# Decode at the memory-bandwidth roofline: the sdpa_split_kv kernel against the sdpa_packed_gqa baseline.
# Six parts, each under 9 minutes on one H100/H200 (GPU 0); run them in order, results under OUT_DIR/<step>/.
#
#   bash bench/decode_roofline.sh part1 OUT_DIR   # kernel GPU tests (bf16 + fp32) and the batch-1 profile, both backends
#   bash bench/decode_roofline.sh part2 OUT_DIR   # test_latency --compile, P2048 + G2048, batch 1/128/512: sdpa_split_kv
#   bash bench/decode_roofline.sh part3 OUT_DIR   # the same with the sdpa_packed_gqa baseline
#   bash bench/decode_roofline.sh part4 OUT_DIR   # tinyllama_opt_w4 decode-heavy (prompt 128) up to its KV bound, both backends
#   bash bench/decode_roofline.sh part5 OUT_DIR   # the largest batches at P2048 + G2048: sdpa_split_kv
#   bash bench/decode_roofline.sh part6 OUT_DIR   # the same with the sdpa_packed_gqa baseline
#   bash bench/decode_roofline.sh smoke OUT_DIR   # CPU: every step's code path on tiny configs, in seconds
#
# LCKV_FLASH_ATTN=1 in every latency run shortens LCKV's prefill (strict mask as a shifted causal attention); the
# decode step is unaffected: sdpa_split_kv decodes with its kernel, sdpa_packed_gqa with its packed SDPA.
set -uo pipefail
part=${1:?part1 to part6, or smoke}
out=${2:-bench/results/decode_roofline}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$part" = smoke ]; then
    gpu_name=cpu hbm=3.35TB mem_gb=80
    llama=configs/llama_tiny.json opt=configs/test_tiny_opt.json w4=configs/test_tiny_opt.json
    len=(--prompt_len 16 --gen_len 8 --steps 4) heavy=(--prompt_len 8 --gen_len 8 --steps 4) device=(--device cpu)
    batches=1,2 big=3 w4_batches=1,2 tests=(tests/test_decode_attention.py)
    profile_len=(--prompt_len 16 --gen_len 8 --steps 3 --attention_batches 1,2)
else
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    mem_gb=$(($(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1) / 1000))
    case "$gpu_name" in *H200*) hbm=4.8TB ;; *) hbm=3.35TB ;; esac
    llama=configs/tinyllama.json opt=configs/tinyllama_opt.json w4=configs/tinyllama_opt_w4.json
    len=(--prompt_len 2048 --gen_len 2048 --steps 64) heavy=(--prompt_len 128 --gen_len 2048 --steps 64) device=()
    batches=1,128,512 tests=(tests/test_decode_attention_gpu.py tests/test_decode_attention.py tests/test_static_cache.py)
    profile_len=(--prompt_len 2048 --gen_len 2048 --steps 16)
    # Largest batches: 0.9 of the KV bound at 4096 tokens (test_latency --plan: 843 on 80 GB for tinyllama); LCKV's
    # bound (6,186 on 80 GB) needs a prefill far beyond one call (9 iterations): it runs at 2x Llama's, at most 1024.
    big=$((mem_gb * 843 * 9 / 800))
    # w4 decode-heavy (prompt 128, cache 2176): KV bound = (memory - 2.2 GB weights) / (9,216 B x 2176) per sequence.
    w4_bound=$(((mem_gb - 3) * 1000000000 / (9216 * 2176)))
    w4_batches=1,1024,$((w4_bound * 9 / 10))
fi
echo "device: $gpu_name (${mem_gb} GB), roofline bandwidth $hbm"

. "$(dirname "$0")/step.sh"

# LCKV runs pass --prefill auto, the prefill their recorded results ran (test_latency.py's default is each config's own,
# iterative for these configs).
latency() {  # latency NAME SECONDS ATTN ARGS...: compiled decode, test_latency JSON into OUT/NAME
    local name=$1 limit=$2 attn=$3
    shift 3
    LCKV_FLASH_ATTN=1 step "$name" "$limit" python test_latency.py --compile --attn_implementation "$attn" \
        --hbm_bandwidth "$hbm" "${device[@]}" --output_dir "$out/$name" "$@"
}

case "$part" in
part1)
    step gpu_tests 200 python -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
    for attn in sdpa_split_kv sdpa_packed_gqa; do
        step "profile_$attn" 150 python -m bench.profile_decode --configs "$llama" "$opt" --attn_implementation "$attn" \
            "${profile_len[@]}" "${device[@]}" --output_dir "$out/profile_$attn"
    done
    ;;
part2 | part3)
    attn=$([ "$part" = part2 ] && echo sdpa_split_kv || echo sdpa_packed_gqa)
    latency "latency_$attn" 520 "$attn" --configs "$llama" "$opt" "${len[@]}" --prefill auto --prefill_chunk 64 \
        --batches "$batches"
    ;;
part4)
    for attn in sdpa_split_kv sdpa_packed_gqa; do
        latency "latency_w4_$attn" 250 "$attn" --configs "$w4" "${heavy[@]}" --prefill auto --prefill_chunk 256 \
            --batches "$w4_batches"
    done
    ;;
part5 | part6)
    attn=$([ "$part" = part5 ] && echo sdpa_split_kv || echo sdpa_packed_gqa)
    latency "latency_big_llama_$attn" 150 "$attn" --configs "$llama" "${len[@]}" --prefill_chunk 64 --batches "$big"
    latency "latency_big_opt_$attn" 300 "$attn" --configs "$opt" "${len[@]}" --prefill auto --prefill_chunk 64 \
        --batches $((big * 2 < 1024 ? big * 2 : 1024))
    ;;
smoke)  # CPU: the commands above on tiny configs (triton's interpreter runs the kernel in the tests)
    step cpu_tests 300 python -m pytest -q -p no:cacheprovider "${tests[@]}"
    step profile 200 python -m bench.profile_decode --configs "$llama" "$opt" "${profile_len[@]}" "${device[@]}" \
        --output_dir "$out/profile"
    latency latency 200 sdpa_split_kv --configs "$llama" "$opt" "${len[@]}" --prefill auto --prefill_chunk 2 \
        --batches "$batches"
    latency latency_w4 200 sdpa_packed_gqa --configs "$w4" "${heavy[@]}" --prefill auto --batches "$w4_batches,$big"
    ;;
*)
    echo "part: $part; allowed values are part1 to part6, smoke" >&2
    exit 2
    ;;
esac
tar -czf "$out/results.tgz" -C "$out" --exclude results.tgz .
