#!/usr/bin/env bash
# LLaMA-65B shape (80 layers, hidden 8192, 64 heads, MHA), Llama vs LCKV, tensor parallel over TWO GPUs
# (torchrun --nproc_per_node 2, NCCL; bf16 weights ~130 GB, 65 GB per GPU, so two 141 GB H200s), each model near
# its largest batch: test_latency.py end to end (max batch, decode step vs roofline, e2e tok/s, ratio) with the
# --plan prediction beside it. Weights are random, each process builds its own shard on its own GPU. One call per
# part, each under 9 minutes (every step has its own time limit):
#
#   bash bench/tensor_parallel_65b.sh plan  OUT   # no GPU: --plan for both settings (max batch, roofline), seconds
#   bash bench/tensor_parallel_65b.sh p256  OUT   # P256 + G768: Llama (~4-5 min), then LCKV (~5.5 min)
#   bash bench/tensor_parallel_65b.sh p2k   OUT   # P2048 + G2048: Llama (~4-5 min), then LCKV (~5.5 min)
#   bash bench/tensor_parallel_65b.sh profile OUT # where a decode step's time goes (bench/profile_decode.py): Llama
#                                                 # batch 12 at P2048 + G2048, LCKV batch 768 at P256 + G768
#   bash bench/tensor_parallel_65b.sh smoke OUT   # CPU, 2 gloo processes: every step on tiny configs (same code paths)
#
# A third argument, llama or lckv, runs only that model's step of p256 / p2k / profile (default: both); the ratios
# JSON then pairs it with the other model's latency.json already in OUT.
#
# Each step writes OUT/<step>/{log,latency.json,...}; setting.tp_size is 2 and every figure is per GPU (weights, KV
# bytes, roofline); OUT/llama65b_<part>.json holds both models and their ratios. Decode steps are timed on --steps tokens at the start and at the end of the context and
# extrapolated over gen_len; the LCKV sequential prefill is timed on --prefill_sample tokens at each end of the prompt.
# Batches, largest first: a batch that does not fit is recorded as {"oom": true} and the next one in the list runs, and
# the first that fits ends the list (--first_fit). Under tensor parallelism this recovers only from running out in the
# cache's allocation, where both processes fail at the same point: one that runs out inside a forward leaves the other
# waiting in a collective until the step's time limit. LCKV's lists start at its --plan bound (1,709 / 427 per GPU at
# 141 GB), which fits whole. The Llama's start at its largest batch measured to fit (52 / 12): its plan bound (56 / 14)
# counts the cache and the weights only, and 56 ran out in the decode step's sampling, 14 and 13 in the prefill, even
# prefilling 4 sequences at a time (logs in bench/results/tensor_parallel_65b/llama_batch_probe_chunk4/).
# Measured on two H200s: loading and compiling take ~2 min (Llama) and ~4 min (LCKV) of each step.
set -uo pipefail
part=${1:?plan, p256, p2k, profile or smoke}
out=${2:-bench/results/tensor_parallel_65b}
models=${3:-both}
case "$models" in both | llama | lckv) ;; *) echo "models: $models; allowed values are both, llama, lckv" >&2; exit 2 ;; esac
want() { [ "$models" = both ] || [ "$models" = "$1" ]; }  # want MODEL: this call runs MODEL's step
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
nproc=2

if [ "$part" = smoke ]; then
    for call in plan p256 p2k profile; do SMOKE=1 bash "$0" "$call" "$out"; done
    exit 0
fi
if [ "${SMOKE:-0}" = 1 ]; then
    $py -m bench.smoke_llama_config "$out"
    L65=$out/smoke_llama.json L65O=configs/test_tiny_opt.json
    P256=(--prompt_len 10 --gen_len 6) P2K=(--prompt_len 12 --gen_len 8) STEPS=(--steps 2) SAMPLE=(--prefill_sample 2)
    B256L=2,1 B256O=3,2 B2KL=2,1 B2KO=3,2
    PROFILE=(--device cpu --steps 3 --attention_batches 1) PROFILE_LLAMA=2 PROFILE_LCKV=3
    common=(--device cpu)
    plan_memory=1GB
    export OMP_NUM_THREADS=1
else
    L65=configs/llama65b.json L65O=configs/llama65b_opt.json
    P256=(--prompt_len 256 --gen_len 768) P2K=(--prompt_len 2048 --gen_len 2048) STEPS=(--steps 16) SAMPLE=(--prefill_sample 64)
    B256L=52,48 B256O=1664,1536,1280,1024,768 B2KL=12,10 B2KO=416,384,352,320,288,256
    # The two settings furthest above the roofline on two H200s (compiled step 2.5x and 2.2x).
    PROFILE=(--steps 8 --attention_batches 12,256,768) PROFILE_LLAMA=12 PROFILE_LCKV=768
    common=(--hbm_bandwidth 4.8TB)
    plan_memory=141GB
fi

. "$(dirname "$0")/step.sh"

tp_lat() {  # tp_lat NAME SECONDS ARGS...: test_latency.py on $nproc tensor-parallel processes, JSON under OUT/NAME
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" test_latency.py "$@" "${common[@]}" \
        --first_fit --output_dir "$out/$name"
}

tp_profile() {  # tp_profile NAME SECONDS ARGS...: bench/profile_decode.py on $nproc tensor-parallel processes, under OUT/NAME
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" env TORCH_LOGS=cudagraphs,recompiles,graph_breaks "$py" -m torch.distributed.run --standalone \
        --nproc_per_node "$nproc" -m bench.profile_decode "$@" "${PROFILE[@]}" --output_dir "$out/$name"
}

ratios() {  # ratios NAME LLAMA_STEP LCKV_STEP: both models' results in one JSON, with test_latency's ratios
    $py - "$out/$2/latency.json" "$out/$3/latency.json" "$out/$1.json" <<'PY'
import json, sys
from pathlib import Path
import test_latency
runs = [json.loads(Path(p).read_text()) for p in sys.argv[1:3] if Path(p).is_file()]
models = {name: r for run in runs for name, r in run["models"].items()}
merged = {"setting": runs[0]["setting"] if runs else None, "models": models, "ratios": test_latency.ratios(models) if len(models) > 1 else {}}
Path(sys.argv[3]).write_text(json.dumps(merged, indent=2))
print(json.dumps(merged["ratios"], indent=2))
PY
}

case "$part" in
plan)
    step plan_p256 60 "$py" test_latency.py --plan --configs "$L65" "$L65O" --tp_size "$nproc" --gpu_memory "$plan_memory" \
        --plan_lengths 1024 "${common[@]}"
    step plan_p2k 60 "$py" test_latency.py --plan --configs "$L65" "$L65O" --tp_size "$nproc" --gpu_memory "$plan_memory" \
        --plan_lengths 4096 "${common[@]}"
    ;;
p256)
    want llama && tp_lat llama65b_p256_llama 300 --configs "$L65" --compile "${P256[@]}" "${STEPS[@]}" \
        --batches "$B256L"
    want lckv && tp_lat llama65b_p256_lckv 340 --configs "$L65O" --compile --prefill sequential "${SAMPLE[@]}" "${P256[@]}" "${STEPS[@]}" \
        --batches "$B256O"
    ratios llama65b_p256 llama65b_p256_llama llama65b_p256_lckv
    ;;
p2k)
    want llama && tp_lat llama65b_p2k_llama 300 --configs "$L65" --compile "${P2K[@]}" "${STEPS[@]}" \
        --batches "$B2KL"
    want lckv && tp_lat llama65b_p2k_lckv 320 --configs "$L65O" --compile --prefill sequential "${SAMPLE[@]}" "${P2K[@]}" "${STEPS[@]}" \
        --batches "$B2KO"
    ratios llama65b_p2k llama65b_p2k_llama llama65b_p2k_lckv
    ;;
profile)
    want llama && tp_profile llama65b_profile_llama 360 --configs "$L65" --batch "$PROFILE_LLAMA" "${P2K[@]}"
    want lckv && tp_profile llama65b_profile_lckv 420 --configs "$L65O" --batch "$PROFILE_LCKV" "${P256[@]}"
    ;;
*)
    echo "part: $part; allowed values are plan, p256, p2k, profile, smoke" >&2
    exit 2
    ;;
esac
