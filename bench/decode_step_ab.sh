#!/usr/bin/env bash
# The captured decode step of this checkout against earlier revisions' model code (an A/B), in one device call:
# `bench.measure_generate_overhead --fast_loop_only` at batch 1 with every decode-kernel option, Llama + LCKV config
# pairs (a pair's second model starts warm; single LCKV configs did not finish within 100-220 s on an H200, a pair's
# LCKV half takes about 30 s), every arm of a pair back to back, their order rotated from one pair to the next.
#
#   bash bench/decode_step_ab.sh prepare REV...     # here: per REV, ab/<REV>/ holds its models/ beside this checkout's
#                                                   # bench/, tools/ and configs/ (git-ignored: carry ab to the device)
#   bash bench/decode_step_ab.sh run OUT [PAIR...]  # GPU: Llama-2-7B and TinyLlama pairs (PAIR: llama2_7b, tinyllama;
#                                                   # default both), this checkout and each REV (about 2.5 min per arm
#                                                   # for both pairs on an H200: with 3 or more arms, one pair per call)
#   bash bench/decode_step_ab.sh smoke OUT          # CPU: the same steps on the tiny configs
#
# Each arm writes OUT/<pair>_<arm>/{log,generate_overhead_*.json} (arm: new, or the REV); the run ends with one line
# per config: the median captured step (ms) of each arm and new / REV. Compare arms within a call: machines differ by
# about 1%.
set -uo pipefail
part=${1:?prepare, run or smoke}
root=$(cd "$(dirname "$0")/.." && pwd)
arms_dir=$root/ab

if [ "$part" = prepare ]; then
    shift
    [ $# -gt 0 ] || { echo "prepare REV...: name at least one revision" >&2; exit 2; }
    grep -qx "/ab/" "$root/.git/info/exclude" 2>/dev/null || echo "/ab/" >>"$root/.git/info/exclude"
    rm -rf "$arms_dir"
    for rev in "$@"; do
        tree=$arms_dir/$rev
        mkdir -p "$tree" && git -C "$root" archive "$rev" models | tar -x -C "$tree" || exit 1
        tar -C "$root" --exclude=bench/results -cf - bench tools configs | tar -x -C "$tree" || exit 1
        echo "ab/$rev/: models/ of $(git -C "$root" rev-parse --short "$rev"), bench/ tools/ configs/ of this checkout"
    done
    exit 0
fi

out=${2:?$part OUT}
mkdir -p "$out" && out=$(cd "$out" && pwd)
bases=()
for tree in "$arms_dir"/*/; do [ -d "$tree/models" ] && bases+=("$(basename "$tree")"); done
[ ${#bases[@]} -gt 0 ] || { echo "nothing in $arms_dir: run 'bash $0 prepare REV...' first" >&2; exit 2; }
arms=(new "${bases[@]}")
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
if [ $# -gt 2 ]; then  # only the pairs named
    chosen=() chosen_names=()
    for name in "${@:3}"; do
        found=0
        for i in "${!names[@]}"; do
            [ "${names[$i]}" = "$name" ] && chosen+=("${pairs[$i]}") chosen_names+=("$name") found=1
        done
        [ $found = 1 ] || { echo "PAIR: '$name'; allowed: ${names[*]}" >&2; exit 2; }
    done
    pairs=("${chosen[@]}") names=("${chosen_names[@]}")
fi

. "$root/bench/step.sh"

arm() {  # arm PAIR_INDEX ARM: one pair's measurement with that arm's model code (new: this checkout's)
    local name=${names[$1]}_$2 tree=$root
    [ "$2" = new ] || tree=$arms_dir/$2
    # shellcheck disable=SC2086  # a pair is two config paths
    (cd "$tree" && step "$name" "$limit" "$py" -m bench.measure_generate_overhead --configs ${pairs[$1]} \
        "${options[@]}" --output_dir "$out/$name")
}

for i in "${!pairs[@]}"; do
    for j in "${!arms[@]}"; do arm "$i" "${arms[$(((i + j) % ${#arms[@]}))]}"; done
done

"$py" - "$out" "${names[*]}" "${arms[@]}" <<'EOF'
import json
import sys
from pathlib import Path

out, names, arms = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]


def medians(folder: Path) -> dict[str, float]:
    """Config path -> median captured step (ms) of the arm's JSON ({} where the arm did not finish)."""
    runs = [run for path in folder.glob("generate_overhead_*.json") for run in json.loads(path.read_text())["runs"]]
    return {run["config"]: run["fast"]["captured_step_ms_spread"]["median"] for run in runs}


for name in names:
    steps = {arm: medians(out / f"{name}_{arm}") for arm in arms}
    configs = sorted(set().union(*steps.values()))
    if not configs:
        print(f"{name}: no arm finished (logs under {out})")
    for config in configs:
        new = steps["new"].get(config)
        cells = [f"new {new} ms"]
        for arm in arms[1:]:
            base = steps[arm].get(config)
            cells.append(f"{arm} {base} ms, new / {arm} {new / base:.4f}" if new and base else f"{arm} {base} ms")
        print(f"{config}: " + "; ".join(cells))
EOF
