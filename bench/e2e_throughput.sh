#!/usr/bin/env bash
# End-to-end throughput with the exact sequential prefill (config.prefill), on ONE 80 GB H100 (or an H200 capped at
# 79 GiB, set here), in parts that each fit a 9-minute call. Every step has its own timeout and writes OUT_DIR/<step>/{log,latency.json,throughput.png}.
#
#   bash bench/e2e_throughput.sh partA1 OUT   # tinyllama: stock dynamic-cache Llama generate (batch search), compiled Llama at max batch
#                                             # (partA1a / partA1b: each half alone)
#   bash bench/e2e_throughput.sh partA2 OUT   # tinyllama pair at batch 512: Llama, LCKV iterative and sequential prefill
#   bash bench/e2e_throughput.sh partA3 OUT   # tinyllama LCKV at its largest batches, sequential prefill (sampled)
#   bash bench/e2e_throughput.sh partB1 OUT   # LLaMA-33B shape, Llama at its max batch: P256+G768 and P2048+G2048
#                                             # (partB1a / partB1b: each half alone)
#   bash bench/e2e_throughput.sh partB2 OUT   # LLaMA-33B LCKV, P256+G768 at max batch: sequential prefill
#   bash bench/e2e_throughput.sh partB3 OUT   # LLaMA-33B LCKV, P256+G768 at max batch: iterative prefill (the old path)
#   bash bench/e2e_throughput.sh partB4 OUT   # LLaMA-33B LCKV, P2048+G2048 at max batch: sequential prefill (sampled)
#   bash bench/e2e_throughput.sh partC1 OUT   # Llama-2-7B pair, P256+G768, each at its max batch
#   bash bench/e2e_throughput.sh partC2 OUT   # Llama-2-7B pair, P2048+G2048, each at its max batch
#   bash bench/e2e_throughput.sh partW1 OUT   # whole runs, P2048+G2048, every token timed: tinyllama Llama at batch 640
#   bash bench/e2e_throughput.sh partW2 OUT   # ... tinyllama LCKV at batch 4096 (sequential prefill)
#   bash bench/e2e_throughput.sh partW3 OUT   # ... LLaMA-33B Llama at batch 2
#   bash bench/e2e_throughput.sh partW4 OUT   # ... LLaMA-33B LCKV at batch 64 (sequential prefill)
#   bash bench/e2e_throughput.sh smoke OUT    # CPU: every step above with tiny configs and lengths (same code path)
#
# In partA1..partC2 decode steps are timed on --steps tokens at the start and at the end of the context and
# extrapolated over gen_len; at the largest batches the sequential prefill is timed on --prefill_sample tokens at each
# end of the prompt (both documented in each latency.json, setting.extrapolation). The whole runs (partW*) time every
# token: a GPU at its power limit runs minutes of full load below the clock of short bursts, which extrapolation from
# bursts does not see (docs/performance.md, "Whole runs and the power limit"); test_latency.py records the GPU's
# clock and power-cap share over each run (gpu_clocks). They are the figures the e2e targets are judged by. The largest batches come from
# `python test_latency.py --plan --gpu_memory 80GB` (KV-bound) times ~0.9; a batch that does not fit is recorded
# as {"oom": true} and the next smaller one in --batches still runs.
# EXTRA_FLAGS adds test_latency.py flags to every step, e.g. EXTRA_FLAGS="--fused_projections --small_batch_gemv"
# (the GEMV needs CUDA); each latency.json records them in its setting.
set -uo pipefail
part=${1:?part: partA1..partC2 or smoke}
out=${2:-bench/results/e2e_throughput}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$part" = smoke ]; then  # tiny shapes on the CPU: the same steps, flags and JSON, in seconds
    python -m bench.smoke_llama_config "$out"
    TL=$out/smoke_llama.json TLO=configs/test_tiny_opt.json
    L33=$TL L33O=$TLO L7=$TL L7O=$TLO
    P2K="--prompt_len 12 --gen_len 8" P256="--prompt_len 10 --gen_len 6"
    STEPS="--steps 2" SAMPLE="--prefill_sample 2" CHUNK="--prefill_chunk 1"
    SEARCH="--start_batch 2 --max_batch 4 --resolution 0.5"
    b() { echo 2; }  # every batch list becomes batch 2
    common=(--device cpu)
else
    TL=configs/tinyllama.json TLO=configs/tinyllama_opt.json
    L33=configs/llama33b.json L33O=configs/llama33b_opt.json
    L7=configs/llama2_7b.json L7O=configs/llama2_7b_opt.json
    P2K="--prompt_len 2048 --gen_len 2048" P256="--prompt_len 256 --gen_len 768"
    STEPS="--steps 16" SAMPLE="--prefill_sample 64" CHUNK="--prefill_chunk 64"
    SEARCH="--start_batch 256 --max_batch 1024 --resolution 0.25"
    b() { echo "$1"; }
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    # On a 141 GB H200 the process is capped at what an 80 GB card gives CUDA (79 GiB), so the batches fit as there.
    case "$gpu_name" in *H200*) hbm=4.8TB cap=(--memory_cap 79GiB) ;; *) hbm=3.35TB cap=() ;; esac
    echo "device: $gpu_name, roofline bandwidth $hbm, ${cap[*]:-no memory cap}"
    common=(--hbm_bandwidth "$hbm" "${cap[@]}")
fi
# shellcheck disable=SC2206  # several flags in one variable on purpose
common+=(${EXTRA_FLAGS:-})

lat() {  # lat NAME SECONDS ARGS...: test_latency.py with a time limit, log and JSON under OUT/NAME
    local name=$1 limit=$2
    shift 2
    mkdir -p "$out/$name"
    local start=$SECONDS
    # shellcheck disable=SC2068  # the setting variables hold several words on purpose
    timeout "$limit" python test_latency.py "$@" ${common[@]} --output_dir "$out/$name" >"$out/$name/log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s"
    grep -v -E "it/s\]|s/it\]" "$out/$name/log" | tail -n 3
}

# shellcheck disable=SC2086  # $P2K, $STEPS, ... are several flags each
partA1() {  # ~8 min: stock generate search (~4 min), compiled Llama near its KV bound (843 by --plan; 640 fitted
    # under the 79 GiB cap on an H200, 768 did not)
    partA1a
    partA1b
}
# shellcheck disable=SC2086
partA1a() {  # ~4 min: the first half of partA1, stock generate
    lat tinyllama_stock 280 --configs $TL --attn_implementation sdpa --cache dynamic $P2K $STEPS $SEARCH
}
# shellcheck disable=SC2086
partA1b() {  # ~4 min: the second half of partA1, the compiled Llama at its largest batch
    lat tinyllama_llama_max 220 --configs $TL --compile $CHUNK $P2K $STEPS --batches "$(b 768),$(b 704),$(b 640)" --first_fit
}
# shellcheck disable=SC2086
partA2() {  # ~7 min: three compiles and prefills at batch 512 (LCKV iterative ~60 s, sequential ~40 s)
    lat tinyllama_b512 520 --configs $TL $TLO --compile $CHUNK --prefill iterative,sequential $P2K $STEPS --batches "$(b 512)"
}
# shellcheck disable=SC2086
partA3() {  # ~6 min: LCKV near its KV bound (6,186 by --plan), sequential prefill sampled
    lat tinyllama_opt_max 500 --configs $TLO --compile --prefill sequential $SAMPLE $P2K $STEPS --batches "$(b 4096),$(b 5632)"
}
# shellcheck disable=SC2086
partB1() {  # ~8 min: two 33B compiles; Llama fits 9 / 2 sequences by --plan
    partB1a
    partB1b
}
# shellcheck disable=SC2086
partB1a() {  # ~4 min: the first half of partB1, P256+G768
    lat llama33b_p256_llama 260 --configs $L33 --compile $P256 $STEPS --batches "$(b 4),$(b 8)"
}
# shellcheck disable=SC2086
partB1b() {  # ~4 min: the second half of partB1, P2048+G2048 (batch 1: where --small_batch_gemv applies)
    lat llama33b_p2048_llama 260 --configs $L33 --compile $P2K $STEPS --batches "$(b 1),$(b 2)"
}
# shellcheck disable=SC2086
partB2() {  # ~7 min: 33B LCKV, 306 by --plan at 1024 tokens
    lat llama33b_p256_opt_seq 520 --configs $L33O --compile --prefill sequential $P256 $STEPS --batches "$(b 272)"
}
# shellcheck disable=SC2086
partB3() {  # ~7 min: the same with the iterative prefill (about 72 s measured before at batch 300)
    lat llama33b_p256_opt_iter 520 --configs $L33O --compile $CHUNK --prefill iterative $P256 $STEPS --batches "$(b 272)"
}
# shellcheck disable=SC2086
partB4() {  # ~7 min: 33B LCKV, 76 by --plan at 4096 tokens, sequential prefill sampled
    lat llama33b_p2048_opt_seq 520 --configs $L33O --compile --prefill sequential $SAMPLE $P2K $STEPS --batches "$(b 64)"
}
# shellcheck disable=SC2086
partC1() {  # ~8 min: 7B pair at P256+G768 each at its max batch (--plan: 123 and 1,360), LCKV prefill sampled
    lat llama2_7b_p256_llama 200 --configs $L7 --compile $CHUNK $P256 $STEPS --batches "$(b 112)"
    lat llama2_7b_p256_opt 300 --configs $L7O --compile --prefill sequential $SAMPLE $P256 $STEPS --batches "$(b 1216)"
}
# shellcheck disable=SC2086
partC2() {  # ~8 min: 7B pair at P2048+G2048 (--plan: 30 and 340)
    lat llama2_7b_p2048_llama 200 --configs $L7 --compile $CHUNK $P2K $STEPS --batches "$(b 28)"
    lat llama2_7b_p2048_opt 300 --configs $L7O --compile --prefill sequential $SAMPLE $P2K $STEPS --batches "$(b 304)"
}

# Whole runs: the largest batches of partA1b, partA3, partB1b and partB4 (measured to fit under the cap), no --steps and
# no --prefill_sample; each fits one 9-minute call (times from the H200 runs of 2026-12-01, which ran with
# EXTRA_FLAGS="--fused_projections --dependent_launch", and --small_batch_gemv too for partW3).
# shellcheck disable=SC2086
partW1() {  # ~2 min: compile 30 s, prefill 8 s, 2048 steps 28 s
    lat whole_tinyllama_llama 300 --configs $TL --compile $CHUNK $P2K --batches "$(b 640)"
}
# shellcheck disable=SC2086
partW2() {  # ~6 min: prefill 79 s, 2048 steps 172 s
    lat whole_tinyllama_opt 500 --configs $TLO --compile --prefill sequential $P2K --batches "$(b 4096)"
}
# shellcheck disable=SC2086
partW3() {  # ~3 min: building the 33B model, compile 50 s, prefill 1 s, 2048 steps 42 s
    lat whole_llama33b_llama 300 --configs $L33 --compile $P2K --batches "$(b 2)"
}
# shellcheck disable=SC2086
partW4() {  # ~8 min: building the 33B model, compile 104 s, prefill 84 s, 2048 steps 183 s
    lat whole_llama33b_opt 540 --configs $L33O --compile --prefill sequential $P2K --batches "$(b 64)"
}

case "$part" in
partA1 | partA1a | partA1b | partA2 | partA3 | partB1 | partB1a | partB1b | partB2 | partB3 | partB4 | partC1 | partC2) "$part" ;;
partW1 | partW2 | partW3 | partW4) "$part" ;;
smoke) for p in partA1 partA2 partA3 partB1 partB2 partB3 partB4 partC1 partC2 partW1 partW2 partW3 partW4; do "$p"; done ;;
*)
    echo "part: $part; allowed values are partA1 (partA1a, partA1b), partA2, partA3, partB1 (partB1a, partB1b), partB2, partB3, partB4, partC1, partC2, partW1, partW2, partW3, partW4, smoke" >&2
    exit 2
    ;;
esac
tar -czf "${out%/}.tgz" -C "$out" .  # next to OUT (an archive inside OUT would archive itself)
