#!/usr/bin/env bash
# Reproduces the table in BENCHMARKS.md: Abyss's echo against the plain tokio
# loop (examples/baseline_echo.rs) and a C recvmmsg/sendmmsg echo, all
# measured in the same run on loopback.
#
#   bench/run.sh [RUNS] [SECONDS]      (defaults: 3 runs of 10 s each)
#
# Servers are pinned to cpu 1 and the load generator to cpu 0 with taskset;
# each figure is the median of RUNS runs, and runs of different servers are
# interleaved so drift hits them all alike. Needs gcc and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-3}
seconds=${2:-10}
server_cpu=${SERVER_CPU:-1}
client_cpu=${CLIENT_CPU:-0}

cargo build --release --quiet --example echo --example baseline_echo --example loadgen
gcc -O2 -o target/release/c_echo bench/c_echo.c
bin=target/release/examples

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
start() { # port, command...
    local port=$1; shift
    taskset -c "$server_cpu" "$@" >/dev/null 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        if ss -Hlun "sport = :$port" | grep -q .; then return; fi
        sleep 0.05
    done
    echo "server on port $port did not start" >&2; exit 1
}

start 4100 "$bin/baseline_echo" --bind 127.0.0.1:4100
start 4101 "$bin/echo" --port 4101 --listeners 1 --no-layers
start 4102 "$bin/echo" --port 4102 --listeners 1 --trace --max-packet-size 8192 \
    --rate-limit 1000000000 --timeout-ms 5000 --concurrency-limit 16384
start 4103 "$bin/echo" --port 4103 --listeners 2 --no-layers
start 4104 target/release/c_echo 4104

names=([4100]="baseline tokio loop" [4101]="abyss, no layers" [4102]="abyss, full default stack"
       [4103]="abyss, no layers, 2 listeners on 1 core" [4104]="C recvmmsg/sendmmsg")
declare -A rate p50 p99
load() { # port, extra loadgen flags...
    local port=$1; shift
    taskset -c "$client_cpu" "$bin/loadgen" --target "127.0.0.1:$port" --duration "$seconds" --warmup 1 --json "$@"
}
field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for run in $(seq "$runs"); do
    for port in 4100 4101 4102 4103 4104; do
        out=$(load "$port" --sockets 8 --window 16)
        rate[$port]+="$(echo "$out" | field replies_per_second) "
        echo "run $run ${names[$port]}: $out" >&2
    done
    for port in 4100 4102; do
        out=$(load "$port" --ping-pong)
        p50[$port]+="$(echo "$out" | field p50_us) "
        p99[$port]+="$(echo "$out" | field p99_us) "
        echo "run $run ping-pong ${names[$port]}: $out" >&2
    done
done

base=$(echo "${rate[4100]}" | tr ' ' '\n' | grep . | median)
echo
echo "| server | replies/s (median of $runs x ${seconds}s) | ratio to baseline |"
echo "| --- | ---: | ---: |"
for port in 4100 4101 4102 4103 4104; do
    m=$(echo "${rate[$port]}" | tr ' ' '\n' | grep . | median)
    echo "| ${names[$port]} | $m | $(awk -v a="$m" -v b="$base" 'BEGIN {printf "%.2f", a / b}') |"
done
echo
echo "| ping-pong (1 in flight) | p50 us | p99 us | p99 ratio to baseline |"
echo "| --- | ---: | ---: | ---: |"
base99=$(echo "${p99[4100]}" | tr ' ' '\n' | grep . | median)
for port in 4100 4102; do
    m50=$(echo "${p50[$port]}" | tr ' ' '\n' | grep . | median)
    m99=$(echo "${p99[$port]}" | tr ' ' '\n' | grep . | median)
    echo "| ${names[$port]} | $m50 | $m99 | $(awk -v a="$m99" -v b="$base99" 'BEGIN {printf "%.2f", a / b}') |"
done
