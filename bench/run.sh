#!/usr/bin/env bash
# Reproduces the tables in BENCHMARKS.md: Abyss's echo against the plain
# tokio loop (examples/baseline_echo.rs) and a C recvmmsg/sendmmsg echo
# (bench/c_echo.c), all measured in the same run on loopback.
#
#   bench/run.sh [RUNS] [SECONDS]      (defaults: 5 runs of 5 s each)
#
# Servers are pinned to one cpu and the load generator to another with
# taskset (SERVER_CPU, CLIENT_CPU; defaults 1 and 0). Each figure is the
# median of RUNS runs; runs of different servers are interleaved so that
# drift hits them all alike. Needs gcc, taskset and ss.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
seconds=${2:-5}
server_cpu=${SERVER_CPU:-1}
client_cpu=${CLIENT_CPU:-0}

cargo build --release --quiet --example echo --example baseline_echo --example loadgen
gcc -O2 -o target/release/c_echo bench/c_echo.c
bin=target/release/examples

. bench/lib.sh

full=(--trace --max-packet-size 8192 --rate-limit 1000000000 --timeout-ms 5000 --concurrency-shed 16384)
start 4100 taskset -c "$server_cpu" "$bin/baseline_echo" --bind 127.0.0.1:4100
start 4101 taskset -c "$server_cpu" "$bin/echo" --port 4101 --listeners 1 --no-layers
start 4102 taskset -c "$server_cpu" "$bin/echo" --port 4102 --listeners 1 "${full[@]}"
start 4103 taskset -c "$server_cpu" "$bin/echo" --port 4103 --listeners 2 "${full[@]}"
start 4104 taskset -c "$server_cpu" target/release/c_echo 4104
start 4105 taskset -c "$server_cpu" "$bin/echo" --port 4105 --listeners 1 --gro "${full[@]}"

declare -A names=([4100]="baseline: tokio recv_from/send_to loop" [4101]="abyss, no layers"
    [4102]="abyss, full default stack" [4103]="abyss, full stack, 2 listeners on 1 core"
    [4104]="C recvmmsg/sendmmsg" [4105]="abyss, full stack, GRO on")
declare -A results
load() { # port, extra loadgen flags...
    local port=$1; shift
    taskset -c "$client_cpu" "$bin/loadgen" --target "127.0.0.1:$port" --duration "$seconds" --warmup 1 --json "$@"
}

plain=(4100 4101 4102 4103 4104)
gso=(4100 4101 4102 4105 4104)
pingpong=(4100 4101 4102)
for run in $(seq "$runs"); do
    for port in "${plain[@]}"; do
        out=$(load "$port" --sockets 8 --window 16)
        results[plain,$port]+="$(echo "$out" | field replies_per_second) "
        echo "run $run plain ${names[$port]}: $out" >&2
    done
    for port in "${gso[@]}"; do
        out=$(load "$port" --sockets 8 --window 16 --gso)
        results[gso,$port]+="$(echo "$out" | field replies_per_second) "
        echo "run $run gso ${names[$port]}: $out" >&2
    done
    for port in "${pingpong[@]}"; do
        out=$(load "$port" --ping-pong)
        results[p50,$port]+="$(echo "$out" | field p50_us) "
        results[p99,$port]+="$(echo "$out" | field p99_us) "
        echo "run $run ping-pong ${names[$port]}: $out" >&2
    done
done

table() { # load name, ports...
    local load=$1; shift
    local base; base=$(echo "${results[$load,4100]}" | median)
    local c; c=$(echo "${results[$load,4104]}" | median)
    echo "| server | replies/s | to baseline | to C |"
    echo "| --- | ---: | ---: | ---: |"
    for port in "$@"; do
        local m; m=$(echo "${results[$load,$port]}" | median)
        echo "| ${names[$port]} | $m | $(ratio "$m" "$base") | $(ratio "$m" "$c") |"
    done
}
echo
echo "Load A: 8 sockets x 16 in flight, 64-byte datagrams, one sendmmsg per socket refill (median of $runs x ${seconds}s)"
echo
table plain "${plain[@]}"
echo
echo "Load B: the same, each refill sent as one GSO super-datagram, so the generator spends less CPU than the server (median of $runs x ${seconds}s)"
echo
table gso "${gso[@]}"
echo
echo "Ping-pong: 1 socket, 1 in flight (median of $runs x ${seconds}s)"
echo
echo "| server | p50 us | p99 us | p99 to baseline |"
echo "| --- | ---: | ---: | ---: |"
base99=$(echo "${results[p99,4100]}" | median)
for port in "${pingpong[@]}"; do
    m50=$(echo "${results[p50,$port]}" | median)
    m99=$(echo "${results[p99,$port]}" | median)
    echo "| ${names[$port]} | $m50 | $m99 | $(ratio "$m99" "$base99") |"
done
