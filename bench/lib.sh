# Shared by the benchmark scripts: start servers and wait for their port,
# kill them on exit, read loadgen's JSON, medians and ratios.

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT

# start PORT COMMAND...: runs COMMAND in the background (its output
# discarded) and waits until something listens on PORT.
start() {
    local port=$1; shift
    "$@" >/dev/null 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        if ss -Hlun "sport = :$port" | grep -q .; then return; fi
        sleep 0.05
    done
    echo "server on port $port did not start" >&2; exit 1
}

field() { sed -E "s/.*\"$1\":([0-9.]+).*/\1/"; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
