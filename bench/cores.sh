#!/usr/bin/env bash
# Handlers that compute: one peer (1 socket, 64 requests in flight) against
# the echo with --handler-cpu-us, Abyss with every core and pinned to one,
# inline and auto, against a tokio loop that spawns a task per datagram,
# all in the same run, interleaved; each figure is the median of RUNS runs.
# Then the same with 8 peers, and the cheap echo (no handler work).
#
#   bench/cores.sh [RUNS] [SECONDS] [HANDLER_US]   (defaults: 5, 5, 50)
#
# The load generator runs on CLIENT_CPU (default 0); "pinned" servers on
# SERVER_CPU (default 1), the others on every cpu. LOADGEN_FLAGS adds
# loadgen options to every load: `--gso` makes the generator, which shares
# a cpu with the servers on every cpu, spend less of it. Needs taskset and
# ss.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
seconds=${2:-5}
cpu_us=${3:-50}
server_cpu=${SERVER_CPU:-1}
client_cpu=${CLIENT_CPU:-0}
read -r -a extra <<< "${LOADGEN_FLAGS:-}"

cargo build --release --quiet --example echo --example baseline_echo --example loadgen
bin=target/release/examples

. bench/lib.sh

heavy=(--handler-cpu-us "$cpu_us")
start 4300 "$bin/echo" --port 4300 "${heavy[@]}"
start 4301 taskset -c "$server_cpu" "$bin/echo" --port 4301 "${heavy[@]}"
start 4302 "$bin/echo" --port 4302 --dispatch inline "${heavy[@]}"
start 4303 "$bin/baseline_echo" --bind 127.0.0.1:4303 --spawn "${heavy[@]}"
start 4304 "$bin/echo" --port 4304
start 4305 "$bin/echo" --port 4305 --dispatch inline

declare -A names=([4300]="abyss, auto, every cpu" [4301]="abyss, auto, pinned to one cpu"
    [4302]="abyss, inline, every cpu" [4303]="tokio loop, task per datagram, every cpu"
    [4304]="abyss, auto, cheap echo" [4305]="abyss, inline, cheap echo")
declare -A results
load() { # port, loadgen flags...
    local port=$1; shift
    taskset -c "$client_cpu" "$bin/loadgen" --target "127.0.0.1:$port" --duration "$seconds" --warmup 1 --json "${extra[@]}" "$@"
}

for run in $(seq "$runs"); do
    for port in 4300 4301 4302 4303; do
        for peers in 1 8; do
            out=$(load "$port" --sockets "$peers" --window $((64 / peers)))
            results[$peers,$port]+="$(echo "$out" | field replies_per_second) "
            echo "run $run peers=$peers ${names[$port]}: $out" >&2
        done
    done
    for port in 4304 4305; do
        out=$(load "$port" --sockets 8 --window 16)
        results[cheap,$port]+="$(echo "$out" | field replies_per_second) "
        echo "run $run cheap ${names[$port]}: $out" >&2
    done
done

for peers in 1 8; do
    echo
    echo "$peers peer(s), 64 requests in flight in all, ${cpu_us} us of handler CPU per datagram (median of $runs x ${seconds}s)"
    echo
    pinned=$(echo "${results[$peers,4301]}" | median)
    spawn=$(echo "${results[$peers,4303]}" | median)
    echo "| server | replies/s | to pinned | to task per datagram |"
    echo "| --- | ---: | ---: | ---: |"
    for port in 4300 4301 4302 4303; do
        m=$(echo "${results[$peers,$port]}" | median)
        echo "| ${names[$port]} | $m | $(ratio "$m" "$pinned") | $(ratio "$m" "$spawn") |"
    done
done
echo
echo "Cheap echo, 8 sockets x 16 in flight (median of $runs x ${seconds}s)"
echo
inline=$(echo "${results[cheap,4305]}" | median)
echo "| server | replies/s | to inline |"
echo "| --- | ---: | ---: |"
for port in 4304 4305; do
    m=$(echo "${results[cheap,$port]}" | median)
    echo "| ${names[$port]} | $m | $(ratio "$m" "$inline") |"
done
