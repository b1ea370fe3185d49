#!/usr/bin/env bash
# Instructions the relay process executes per message, counted by callgrind (valgrind): unlike
# CPU seconds it does not move with the machine's load, so two versions compare exactly.
#
#   bench/instr_per_msg.sh [SIZE|FILE] [N1] [N2] [POLICY]
#
# Runs `mailguard serve` under callgrind twice, for N1 and N2 messages (smtp-source, 5 sessions
# at a time), and prints (instr(N2) - instr(N1)) / (N2 - N1): start-up and shutdown cancel out.
# SIZE is smtp-source's -l (what bench/postfix.sh sends: headers and lines of X); a FILE instead
# is sent as it is, one connection per message, 5 at a time (bench/make_message.py writes the
# 1 MB message with a base64 zip attachment: `bench/make_message.py att1m.eml`).
# MAILGUARD=/path/to/mailguard compares another install. Needs valgrind, smtp-source, smtp-sink.
# Takes about 2-4 minutes (Python runs ~50x slower under callgrind); at 1 MB use N1/N2 ≈ 20/80.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size=${1:-5120}; n1=${2:-100}; n2=${3:-600}; policy=${4:-$repo/bench/policies/observe.toml}
mailguard=${MAILGUARD:-$repo/.venv/bin/mailguard}
python=${PYTHON:-$(dirname "$mailguard")/python}
port=${PORT:-10725}; sink=${SINK_PORT:-12996}
tmp=$(mktemp -d); chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT

count() {  # $1 = messages → total instructions of the serve process (all threads)
  rm -rf "$tmp/run"; mkdir -p "$tmp/run"
  smtp-sink -u nobody "127.0.0.1:$sink" 1000 >/dev/null 2>&1 & local spid=$!
  valgrind --tool=callgrind --callgrind-out-file="$tmp/run/out.%p" "$mailguard" serve \
    --listen "127.0.0.1:$port" --upstream "127.0.0.1:$sink" --no-web --store "$tmp/run/mg.db" \
    --policy "$policy" --log-level warning >"$tmp/run/log" 2>&1 & local pid=$!
  for _ in $(seq 1500); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
  if [ -f "$size" ]; then
    "$python" "$repo/bench/make_message.py" --send "127.0.0.1:$port" --count "$1" "$size"
  else
    smtp-source -s 5 -l "$size" -m "$1" -f a@example.co.jp -t b@partner.co.jp "127.0.0.1:$port"
  fi
  kill -TERM "$pid"; wait "$pid" || true; kill "$spid" 2>/dev/null || true
  grep -h "^summary\|^totals" "$tmp"/run/out.* | awk '{s += $2} END {printf "%.0f\n", s}'
}
a=$(count "$n1"); b=$(count "$n2")
awk -v a="$a" -v b="$b" -v n1="$n1" -v n2="$n2" -v s="$size" -v m="$mailguard" 'BEGIN {
  printf "size=%s instr(%d)=%.3e instr(%d)=%.3e instr_per_msg=%.2fM (%s, %s)\n",
         s, n1, a, n2, b, (b - a) / (n2 - n1) / 1e6, m, strftime("%Y-%m-%d") }'
