# Sourced by the GPU scripts (decode_e2e_80gb.sh, decode_roofline.sh, tensor_parallel_65b.sh, decode_step_ab.sh): one
# timed step, its log under $out.
step() {  # step NAME SECONDS CMD...: CMD with a time limit, log to OUT/NAME/log
    local name=$1 limit=$2
    shift 2
    mkdir -p "$out/$name"
    local start=$SECONDS
    # At the limit: SIGUSR1 first, on which the Python tools (tools.cli.run_cli) print every thread's stack into the
    # log, so a step that did not finish says where it waited; killed 15 s later.
    timeout --signal=USR1 --kill-after=15 "$limit" "$@" >"$out/$name/log" 2>&1
    echo "=== $name: rc=$? in $((SECONDS - start)) s: $*"
    grep -v -E "it/s\]|s/it\]" "$out/$name/log" | tail -n 6
}
