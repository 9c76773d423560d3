#!/usr/bin/env bash
# Sessions: datagrams per second through the counter example (one session
# per peer) built from two revisions, with 1 peer and with 10 000 peers, in
# the same run on loopback. Runs are interleaved so drift hits both alike;
# each figure is the median of RUNS runs.
#
#   bench/sessions.sh OLD_COUNTER_BINARY [RUNS] [SECONDS]
#
# OLD_COUNTER_BINARY is `examples/counter` built (`cargo build --release
# --example counter`) from the revision before the change; the new one is
# built here. Servers unpinned (both cores: the table is shared by the
# listeners), the load generator on CLIENT_CPU (default 0). Needs taskset
# and ss.
set -euo pipefail
cd "$(dirname "$0")/.."

old=$1
runs=${2:-5}
seconds=${3:-5}
client_cpu=${CLIENT_CPU:-0}

cargo build --release --quiet --example counter --example loadgen
bin=target/release/examples

. bench/lib.sh

# 10 000 client sockets.
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 10100 ] || ulimit -n 10100

# Sessions idle out 2 s after a run, so that each run starts with an empty
# table (each run's peers are new sockets). The new build gets, for the one
# address the load generator sends from, the share it had before the
# per-source bound.
start 4301 "$old" --bind 127.0.0.1:4301 --idle-secs 2
start 4302 "$bin/counter" --bind 127.0.0.1:4302 --idle-secs 2 --max-sessions-per-source 16384
declare -A names=([4301]="before" [4302]="after")
declare -A results
load() { # port, extra loadgen flags...
    local port=$1; shift
    taskset -c "$client_cpu" "$bin/loadgen" --target "127.0.0.1:$port" --any-reply \
        --duration "$seconds" --warmup 1 --json "$@"
}

ports=(4301 4302)
for run in $(seq "$runs"); do
    for peers in 1 10000; do
        if [ "$peers" = 1 ]; then flags=(--sockets 1 --window 64); else flags=(--sockets 10000 --window 1); fi
        for port in "${ports[@]}"; do
            out=$(load "$port" "${flags[@]}")
            results[$peers,$port]+="$(echo "$out" | field replies_per_second) "
            echo "run $run $peers peers ${names[$port]}: $out" >&2
            sleep 3 # the run's sessions idle out
        done
    done
done

echo
echo "Counter example (one session per peer), median of $runs x ${seconds}s"
echo
echo "| peers | before, replies/s | after, replies/s | after to before |"
echo "| ---: | ---: | ---: | ---: |"
for peers in 1 10000; do
    b=$(echo "${results[$peers,4301]}" | median)
    a=$(echo "${results[$peers,4302]}" | median)
    echo "| $peers | $b | $a | $(ratio "$a" "$b") |"
done
