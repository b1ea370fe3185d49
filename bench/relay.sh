#!/usr/bin/env bash
# Throughput of `mailguard serve` as an in-transaction relay, against the direct
# smtp-source -> smtp-sink path measured in the same run (../shared/bench/relay-bench.sh).
#
#   bench/relay.sh [--workers N] [--policy FILE] [--sizes "5120 1048576"] [--concs "1 20 100"]
#                  [--runs 3] [--count-small 2000] [--count-large 200] [--reuse]
#                  [--port 10025] [--sink-port 12526]
#
# Prints one line per cell and a table: size, conc, direct msg/s, relay msg/s, ratio, relay CPU%.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
harness=${RELAY_BENCH:-$repo/../shared/bench/relay-bench.sh}
workers=1; policy="$repo/policies/default.toml"; sizes="5120 1048576"; concs="1 20 100"
runs=3; count_small=2000; count_large=200; reuse=""; port=10025; sink_port=12526
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2;;
    --policy) policy=$2; shift 2;;
    --sizes) sizes=$2; shift 2;;
    --concs) concs=$2; shift 2;;
    --runs) runs=$2; shift 2;;
    --count-small) count_small=$2; shift 2;;
    --count-large) count_large=$2; shift 2;;
    --reuse) reuse="--reuse"; shift;;
    --port) port=$2; shift 2;;
    --sink-port) sink_port=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
[ -x "$harness" ] || { echo "relay-bench.sh not found at $harness (set RELAY_BENCH)" >&2; exit 2; }
mailguard=${MAILGUARD:-$(command -v mailguard || echo "$repo/.venv/bin/mailguard")}
tmp=$(mktemp -d); chmod 755 "$tmp"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT INT TERM

"$mailguard" serve --listen "127.0.0.1:$port" --upstream "127.0.0.1:$sink_port" \
  --policy "$policy" --store "$tmp/mg.db" --no-web --workers "$workers" \
  --log-level warning >"$tmp/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1
done
watch=("-w" "$pid"); for c in $(pgrep -P "$pid" || true); do watch+=("-w" "$c"); done

median() { awk '/median/ { for (i=1;i<=NF;i++) if ($i ~ /^rate=/) { sub("rate=","",$i); print $i } }'; }
cpu() { awk '!/median/ { for (i=1;i<=NF;i++) if ($i ~ /^watch=/) { sub("watch=","",$i); s+=$i; n++ } }
             END { if (n) printf "%d", s/n }'; }
printf "%-8s %-5s %10s %10s %7s %9s\n" size conc direct relay ratio relay_cpu% > "$tmp/table"
for size in $sizes; do
  count=$count_small; [ "$size" -ge 100000 ] && count=$count_large
  for c in $concs; do
    d=$("$harness" --direct -l "$size" -m "$count" -s "$c" -r "$runs" -p "$sink_port" $reuse \
        --label "direct" | tee /dev/stderr | median)
    out=$("$harness" --target "127.0.0.1:$port" -p "$sink_port" -l "$size" -m "$count" -s "$c" \
        -r "$runs" -W 50 $reuse "${watch[@]}" --label "mailguard" | tee /dev/stderr)
    r=$(echo "$out" | median); w=$(echo "$out" | cpu)
    ratio=$(awk -v a="$r" -v b="$d" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    printf "%-8s %-5s %10s %10s %7s %9s\n" "$size" "$c" "$d" "$r" "$ratio" "${w:--}" >> "$tmp/table"
  done
done
echo; echo "mailguard serve --workers $workers --policy $(basename "$policy"), $(nproc) cores, $(date -u +%F)"
cat "$tmp/table"
if grep -q Traceback "$tmp/serve.log"; then echo "serve.log has tracebacks:" >&2; cat "$tmp/serve.log" >&2; exit 1; fi
