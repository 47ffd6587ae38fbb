#!/usr/bin/env bash
# The captured decode step of this checkout against an earlier revision's model code (an A/B), in one device call:
# `bench.measure_generate_overhead --fast_loop_only` at batch 1 with every decode-kernel option, Llama + LCKV config
# pairs (a pair's second model starts warm; single LCKV configs did not finish within 100-220 s on an H200, a pair's
# LCKV half takes about 30 s), each pair run for both arms back to back, the order swapped between pairs.
#
#   bash bench/decode_step_ab.sh prepare BASE_REV   # here: BASE_REV's models/ beside this checkout's bench/, tools/ and
#                                                   # configs/ in ab_base/ (git-ignored: carry it to the device)
#   bash bench/decode_step_ab.sh run OUT            # GPU: Llama-2-7B and TinyLlama pairs, new and base (about 5 min)
#   bash bench/decode_step_ab.sh smoke OUT          # CPU: the same steps on the tiny configs
#
# Each arm writes OUT/<pair>_<arm>/{log,generate_overhead_*.json}; the run ends with one line per config: the medians
# of the captured step (ms) of both arms and new / base. Compare arms within a call: machines differ by about 1%.
set -uo pipefail
part=${1:?prepare, run or smoke}
root=$(cd "$(dirname "$0")/.." && pwd)
base=$root/ab_base

if [ "$part" = prepare ]; then
    rev=${2:?prepare BASE_REV}
    grep -qx "/ab_base/" "$root/.git/info/exclude" 2>/dev/null || echo "/ab_base/" >>"$root/.git/info/exclude"
    rm -rf "$base" && mkdir -p "$base" || exit 1
    git -C "$root" archive "$rev" models | tar -x -C "$base" || exit 1
    cp -r "$root/bench" "$root/tools" "$root/configs" "$base/" && rm -rf "$base/bench/results"
    echo "ab_base/: models/ of $(git -C "$root" rev-parse --short "$rev"), bench/ tools/ configs/ of this checkout"
    exit 0
fi

out=${2:?$part OUT}
mkdir -p "$out" && out=$(cd "$out" && pwd)
[ -d "$base/models" ] || { echo "no $base/models: run 'bash $0 prepare BASE_REV' first" >&2; exit 2; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
if [ "$part" = smoke ]; then
    pairs=("configs/llama_tiny.json configs/llama_tiny_opt.json")
    # The kernel options that run on the CPU (the others need a CUDA GPU)
    names=(tiny) limit=300 options=(--smoke --fused_projections)
else
    pairs=("configs/llama2_7b.json configs/llama2_7b_opt.json" "configs/tinyllama.json configs/tinyllama_opt.json")
    names=(llama2_7b tinyllama) limit=200
    options=(--fused_projections --small_batch_gemv --dependent_launch --persistent_reductions --gemv_fusion)
fi
options+=(--batches 1 --fast_loop_only)

. "$root/bench/step.sh"

arm() {  # arm PAIR_INDEX new|base: one pair's measurement with that arm's model code
    local name=${names[$1]}_$2 tree=$root
    [ "$2" = base ] && tree=$base
    # shellcheck disable=SC2086  # a pair is two config paths
    (cd "$tree" && step "$name" "$limit" "$py" -m bench.measure_generate_overhead --configs ${pairs[$1]} \
        "${options[@]}" --output_dir "$out/$name")
}

for i in "${!pairs[@]}"; do
    if ((i % 2 == 0)); then arm "$i" new && arm "$i" base; else arm "$i" base && arm "$i" new; fi
done

"$py" - "$out" "${names[@]}" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def medians(folder: Path) -> dict[str, float]:
    """Config path -> median captured step (ms) of the arm's JSON ({} where the arm did not finish)."""
    runs = [run for path in folder.glob("generate_overhead_*.json") for run in json.loads(path.read_text())["runs"]]
    return {run["config"]: run["fast"]["captured_step_ms_spread"]["median"] for run in runs}


for name in sys.argv[2:]:
    new, base = medians(out / f"{name}_new"), medians(out / f"{name}_base")
    if not new and not base:
        print(f"{name}: neither arm finished (logs under {out})")
    for config in sorted(new.keys() | base.keys()):
        a, b = new.get(config), base.get(config)
        ratio = f"{a / b:.4f}" if a and b else "n/a"
        print(f"{config}: new {a} ms, base {b} ms, new / base {ratio}")
EOF
