#!/usr/bin/env bash
# The DNS forwarder example against dnsmasq as a pure forwarder (cache
# off), both forwarding to one NSD, dnsperf as the client, runs
# interleaved in one run; each figure is the median of RUNS runs.
#
#   bench/dns.sh [RUNS] [SECONDS]      (defaults: 4 runs of 10 s)
#
# The daemons (NSD and the forwarder under test) run on SERVER_CPU
# (default 1), dnsperf on CLIENT_CPU (default 0), 100 queries in flight.
# Then the latency at a fixed 2 000 queries/s (dnsperf -Q): p50 and p99
# from dnsperf's latency histogram. Needs nsd, dnsmasq, dnsperf, taskset
# and ss. A third contender, bench/c_relay.c, does what every forwarder
# must (recvmmsg/sendmmsg both ways and an ID swap) and checks nothing: the
# cost of the system calls on this machine and layout, for reference.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-4}
seconds=${2:-10}
server_cpu=${SERVER_CPU:-1}
client_cpu=${CLIENT_CPU:-0}

cargo build --release --quiet --example dns_forwarder
gcc -O2 -o target/release/c_relay bench/c_relay.c
bin=target/release/examples

. bench/lib.sh

dir=$(mktemp -d)
pids_dir=$dir
cleanup_dir() { rm -rf "$dir"; }
trap 'cleanup; cleanup_dir' EXIT

cat > "$dir/example.test.zone" <<'ZONE'
$ORIGIN example.test.
$TTL 300
@       IN SOA ns1 hostmaster 1 3600 600 86400 300
@       IN NS  ns1
ns1     IN A   127.0.0.1
host001 IN A   192.0.2.1
host002 IN A   192.0.2.2
ZONE
cat > "$dir/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.1@5390
  zonesdir: "$dir"
  username: ""
  chroot: ""
  pidfile: "$dir/nsd.pid"
  zonelistfile: "$dir/zone.list"
  xfrdfile: "$dir/xfrd.state"
  database: ""
  verbosity: 0
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: "example.test"
  zonefile: example.test.zone
CONF
printf 'host001.example.test A\nhost002.example.test A\n' > "$dir/queries"

start 5390 taskset -c "$server_cpu" nsd -d -c "$dir/nsd.conf"
start 5391 taskset -c "$server_cpu" dnsmasq --no-daemon --keep-in-foreground --no-resolv \
    --server=127.0.0.1#5390 --cache-size=0 --port=5391 --listen-address=127.0.0.1 \
    --bind-interfaces --no-hosts --user=root --pid-file="$dir/dnsmasq.pid"
start 5392 taskset -c "$server_cpu" "$bin/dns_forwarder" --bind 127.0.0.1:5392 --upstream 127.0.0.1:5390
start 5393 taskset -c "$server_cpu" target/release/c_relay 5393 5390

declare -A names=([5391]="dnsmasq, cache off" [5392]="Abyss forwarder" [5393]="C relay (batched system calls, checks nothing)")
declare -A qps p50 p99
perf() { # port, extra dnsperf flags...
    local port=$1; shift
    taskset -c "$client_cpu" dnsperf -s 127.0.0.1 -p "$port" -d "$dir/queries" -l "$seconds" -c 1 "$@" 2>&1
}
field_qps() { sed -nE 's/.*Queries per second: +([0-9.]+).*/\1/p'; }
for run in $(seq "$runs"); do
    for port in 5391 5392 5393; do
        out=$(perf "$port" -q 100)
        qps[$port]+="$(echo "$out" | field_qps) "
        echo "run $run ${names[$port]}: $(echo "$out" | grep -E 'Queries (completed|lost)|per second' | tr -s ' ' | tr '\n' ' ')" >&2
    done
done
for run in $(seq "$runs"); do
    for port in 5391 5392 5393; do
        out=$(perf "$port" -Q 2000 -v)
        # dnsperf -v prints one line per query: "> NOERROR host001.example.test A 0.000123"
        echo "$out" | awk '/^> NOERROR/ {print $NF}' | sort -n > "$dir/lat.$port"
        n=$(wc -l < "$dir/lat.$port")
        a=$(awk -v n="$n" 'NR == int(n * 0.50) + 1 {printf "%.1f", $1 * 1e6}' "$dir/lat.$port")
        b=$(awk -v n="$n" 'NR == int(n * 0.99) + 1 {printf "%.1f", $1 * 1e6}' "$dir/lat.$port")
        p50[$port]+="$a "
        p99[$port]+="$b "
        echo "latency run $run ${names[$port]}: p50 $a us, p99 $b us ($n answers)" >&2
    done
done
echo
echo "DNS forwarding to NSD, 100 in flight, median of $runs x ${seconds}s; latency at 2 000 q/s, median of $runs runs' percentiles"
echo
base=$(echo "${qps[5391]}" | median)
echo "| forwarder | queries/s | to dnsmasq | p50 us at 2 000 q/s | p99 us at 2 000 q/s |"
echo "| --- | ---: | ---: | ---: | ---: |"
for port in 5391 5392 5393; do
    m=$(echo "${qps[$port]}" | median)
    echo "| ${names[$port]} | $m | $(ratio "$m" "$base") | $(echo "${p50[$port]}" | median) | $(echo "${p99[$port]}" | median) |"
done
