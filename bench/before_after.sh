#!/usr/bin/env bash
# Measures one change: the echo example built from two revisions, with every
# layer on and with none, against the plain tokio loop, in the same run on
# loopback. Runs of the contenders are interleaved so drift hits all alike;
# each figure is the median of RUNS runs.
#
#   bench/before_after.sh OLD_ECHO_BINARY [RUNS] [SECONDS]
#
# OLD_ECHO_BINARY is `examples/echo` built (`cargo build --release
# --example echo`) from the revision before the change; the new one is
# built here. Servers on SERVER_CPU (default 1), the load generator on
# CLIENT_CPU (default 0). Needs taskset and ss.
set -euo pipefail
cd "$(dirname "$0")/.."

old=$1
runs=${2:-5}
seconds=${3:-5}
server_cpu=${SERVER_CPU:-1}
client_cpu=${CLIENT_CPU:-0}

cargo build --release --quiet --example echo --example baseline_echo --example loadgen
bin=target/release/examples

. bench/lib.sh

# --concurrency-limit: the option's former name, which both builds take.
full=(--trace --max-packet-size 8192 --rate-limit 1000000000 --timeout-ms 5000 --concurrency-limit 16384)
start 4200 taskset -c "$server_cpu" "$bin/baseline_echo" --bind 127.0.0.1:4200
start 4201 taskset -c "$server_cpu" "$old" --port 4201 --listeners 1 --no-layers
start 4202 taskset -c "$server_cpu" "$bin/echo" --port 4202 --listeners 1 --no-layers
start 4203 taskset -c "$server_cpu" "$old" --port 4203 --listeners 1 "${full[@]}"
start 4204 taskset -c "$server_cpu" "$bin/echo" --port 4204 --listeners 1 "${full[@]}"

declare -A names=([4200]="baseline: tokio recv_from/send_to loop"
    [4201]="before, no layers" [4202]="after, no layers"
    [4203]="before, full default stack" [4204]="after, full default stack")
declare -A results
load() { # port, extra loadgen flags...
    local port=$1; shift
    taskset -c "$client_cpu" "$bin/loadgen" --target "127.0.0.1:$port" --duration "$seconds" --warmup 1 --json "$@"
}

ports=(4200 4201 4202 4203 4204)
for run in $(seq "$runs"); do
    for load in plain gso; do
        flags=(--sockets 8 --window 16)
        [ "$load" = gso ] && flags+=(--gso)
        for port in "${ports[@]}"; do
            out=$(load "$port" "${flags[@]}")
            results[$load,$port]+="$(echo "$out" | field replies_per_second) "
            echo "run $run $load ${names[$port]}: $out" >&2
        done
    done
done

for load in plain gso; do
    echo
    if [ "$load" = plain ]; then
        echo "Load A: 8 sockets x 16 in flight, 64-byte datagrams, sendmmsg refills (median of $runs x ${seconds}s)"
    else
        echo "Load B: the same, each refill one GSO super-datagram (median of $runs x ${seconds}s)"
    fi
    echo
    base=$(echo "${results[$load,4200]}" | median)
    echo "| server | replies/s | to baseline | after to before |"
    echo "| --- | ---: | ---: | ---: |"
    for port in "${ports[@]}"; do
        m=$(echo "${results[$load,$port]}" | median)
        vs=""
        case $port in
            4202) vs=$(ratio "$m" "$(echo "${results[$load,4201]}" | median)") ;;
            4204) vs=$(ratio "$m" "$(echo "${results[$load,4203]}" | median)") ;;
        esac
        echo "| ${names[$port]} | $m | $(ratio "$m" "$base") | $vs |"
    done
done
