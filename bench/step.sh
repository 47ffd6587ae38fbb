# Sourced by the GPU scripts (decode_e2e_80gb.sh, tensor_parallel_65b.sh): one timed step, its log under $out.
step() {  # step NAME SECONDS CMD...: CMD with a time limit, log to OUT/NAME/log
    local name=$1 limit=$2
    shift 2
    mkdir -p "$out/$name"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name/log" 2>&1
    echo "=== $name: rc=$? in $((SECONDS - start)) s"
    grep -v -E "it/s\]|s/it\]" "$out/$name/log" | tail -n 4
}
