#!/usr/bin/env bash
# CPU time the relay process spends per message (utime+stime from /proc, so other load on the
# machine barely matters): bench/cpu_per_msg.sh [SIZE] [COUNT] [CONC] [POLICY]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
size=${1:-5120}; count=${2:-2000}; conc=${3:-20}; policy=${4:-$repo/bench/policies/observe.toml}
port=${PORT:-10525}; sink=${SINK_PORT:-12826}
tmp=$(mktemp -d); chmod 755 "$tmp"
smtp-sink -u nobody "127.0.0.1:$sink" 1000 >/dev/null 2>&1 & spid=$!
mailguard=${MAILGUARD:-$repo/.venv/bin/mailguard}
"$mailguard" serve --listen "127.0.0.1:$port" --upstream "127.0.0.1:$sink" --no-web \
  --store "$tmp/mg.db" --policy "$policy" --log-level warning >"$tmp/log" 2>&1 & pid=$!
trap 'kill $pid $spid 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
smtp-source -s "$conc" -l "$size" -m 200 -f a@example.co.jp -t b@partner.co.jp "127.0.0.1:$port"
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat"); t0=$((u0 + s0)); w0=$(date +%s.%N)
smtp-source -s "$conc" -l "$size" -m "$count" -f a@example.co.jp -t b@partner.co.jp "127.0.0.1:$port"
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat"); t1=$((u1 + s1)); w1=$(date +%s.%N)
echo "user=$(( (u1 - u0) * 1000 / $(getconf CLK_TCK) ))ms sys=$(( (s1 - s0) * 1000 / $(getconf CLK_TCK) ))ms"
hz=$(getconf CLK_TCK)
awk -v t="$((t1 - t0))" -v hz="$hz" -v n="$count" -v w="$(echo "$w1 - $w0" | bc)" -v s="$size" -v c="$conc" \
  'BEGIN { cpu = t / hz; printf "size=%d conc=%d count=%d relay_cpu=%.2fs cpu_per_msg=%.3fms cpu_bound_rate=%.0f msg/s wall_rate=%.0f msg/s\n", s, c, n, cpu, cpu * 1000 / n, n / cpu, n / w }'
