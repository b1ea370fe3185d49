#!/usr/bin/env bash
# Throughput behind a real Postfix: Postfix alone vs Postfix + MailGuard after-queue
# (content_filter), before-queue (smtpd_proxy_filter) and as a gateway in front of Postfix,
# measured in the same run, interleaved round by round.
#
#   sudo bench/postfix.sh [--rounds 3] [--sizes "5120 1048576"] [--conc 20]
#                         [--count-small 1000] [--count-large 200] [--warmup 20]
#                         [--scan-maxproc 20] [--workers 1] [--set NAME=VALUE]...
#                         [--policies "observe default"] [--onepass "bq0 bq gw"] [--settle 180]
#
# Private Postfix instances (../shared/bench/postfix-harness.sh, never the system one), all
# final delivery to the smtp-sink that ../shared/bench/relay-bench.sh starts per cell:
#   alone:    smtp-source -> Postfix :12525 (relayhost) -> sink :12526
#   observe:  smtp-source -> Postfix :12527 -> scan -> MailGuard :10025 -> Postfix :10026 -> sink
#             (bench/policies/observe.toml: every check runs, no rule acts: all mail passes)
#   default:  same on :12528 / :10027 / :10028 with policies/default.toml, example.net (the
#             recipient domain smtp-source uses) added to trusted_domains: otherwise it is a
#             look-alike of example.co.jp and every message would wait for confirmation.
#   bq0:      smtp-source -> Postfix :12529 (smtpd_proxy_filter) -> Postfix smtpd :10030 -> sink
#             (before-queue with a zero-cost filter: the proxy talks straight to the reinjection
#             smtpd; the ceiling of any before-queue filter)
#   bq:       smtp-source -> Postfix :12530 (smtpd_proxy_filter) -> MailGuard :10031 (observe)
#             -> Postfix smtpd :10032 -> sink (deploy/postfix/before-queue settings)
#   gw:       smtp-source -> MailGuard :10033 (observe) -> Postfix smtpd :10034 -> sink
#             (the gateway: MailGuard in front of the outbound Postfix)
#   ml:       smtp-source -> Postfix :12532 (smtpd_milters = inet:127.0.0.1:10035, settings of
#             deploy/postfix/milter) -> queue -> sink; `mailguard serve --milter 127.0.0.1:10035`
#             (observe) decides. Not in the default --onepass: add it, e.g. --onepass "bq0 bq ml0 ml"
#   ml0:      same on :12533 / :10036 with bench/null_milter.py (MailGuard's milter front
#             answering CONTINUE without the pipeline): the ceiling of the milter path
# all_ms/msg: CPU of the whole path per message (the path's Postfix master and every process
# under it, exited ones included, plus its MailGuard or milter; smtp-source and the sink not
# counted), warm-up messages included: less moved by other load on the box than the rates.
# Rates count messages until the sink has all of them (relay-bench --settle), one connection
# per message, c20. Each round measures every path once per size; the ratio is taken within a
# round (same machine load), and the table shows medians over the rounds.
# --set passes a main.cf parameter to every instance (e.g. --set smtp_connection_cache_on_demand=no).
# Needs root (Postfix's master) and Debian's postfix package (smtp-source, smtp-sink).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
shared=${MAILGUARD_SHARED_BENCH:-$repo/../shared/bench}
harness=$shared/postfix-harness.sh
bench=$shared/relay-bench.sh
rounds=3 sizes="5120 1048576" conc=20 count_small=1000 count_large=200 warmup=20
scan_maxproc=20 workers=1 policies="observe default" onepass="bq0 bq gw" settle=180 sets=()
sink_port=12526
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2;;
    --sizes) sizes=$2; shift 2;;
    --conc) conc=$2; shift 2;;
    --count-small) count_small=$2; shift 2;;
    --count-large) count_large=$2; shift 2;;
    --warmup) warmup=$2; shift 2;;
    --scan-maxproc) scan_maxproc=$2; shift 2;;
    --workers) workers=$2; shift 2;;
    --set) sets+=(--set "$2"); shift 2;;
    --policies) policies=$2; shift 2;;
    --onepass) onepass=$2; shift 2;;
    --settle) settle=$2; shift 2;;
    -h|--help) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "postfix.sh: run as root (Postfix's master runs as root)" >&2; exit 2; }
[ -x "$harness" ] && [ -x "$bench" ] || { echo "postfix.sh: $harness / $bench missing" >&2; exit 2; }
# append, never prepend: /usr/bin first could hide the venv's python (harness README pitfalls)
PATH=$PATH:/usr/sbin:/usr/bin:/sbin:/bin
mailguard=${MAILGUARD:-$(command -v mailguard || echo "$repo/.venv/bin/mailguard")}
[ -x "$mailguard" ] || { echo "postfix.sh: mailguard not found (set MAILGUARD)" >&2; exit 2; }

tmp=$(mktemp -d /tmp/mg-pfbench.XXXXXX); chmod 755 "$tmp"
pids=() dirs=()
cleanup() {
  local p d
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  for d in "${dirs[@]}"; do "$harness" stop --dir "$d" >/dev/null 2>&1 || true; done
  rm -rf -- "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# --- Postfix alone --------------------------------------------------------------------------
declare -A listen=([alone]=12525 [observe]=12527 [default]=12528 [bq0]=12529 [bq]=12530 [gw]=10033 [ml]=12532 [ml0]=12533)
declare -A filter=([observe]=10025 [default]=10027)
declare -A mgpid=()
"$harness" start --mode plain --listen "127.0.0.1:${listen[alone]}" --sink "127.0.0.1:$sink_port" \
  --dir "$tmp/alone" --no-install "${sets[@]}" >"$tmp/alone.start" 2>&1 \
  || { cat "$tmp/alone.start" >&2; exit 1; }
dirs+=("$tmp/alone")

# --- Postfix + MailGuard, one instance per policy -------------------------------------------
for pol in $policies; do
  f=${filter[$pol]:?unknown policy variant $pol (observe, default)}
  r=$((f + 1))
  case "$pol" in
    observe) policy=$repo/bench/policies/observe.toml ;;
    default)
      policy=$tmp/default.toml
      sed 's/^trusted_domains = \[\(.*\)\]$/trusted_domains = [\1, "example.net"]/' \
        "$repo/policies/default.toml" >"$policy"
      grep -q '"example.net"' "$policy" || { echo "postfix.sh: could not add example.net to $policy" >&2; exit 1; } ;;
  esac
  "$mailguard" policy check "$policy" >/dev/null
  "$harness" start --mode filter --listen "127.0.0.1:${listen[$pol]}" --filter "127.0.0.1:$f" \
    --reinject "127.0.0.1:$r" --sink "127.0.0.1:$sink_port" --scan-maxproc "$scan_maxproc" \
    --dir "$tmp/$pol" --no-install "${sets[@]}" >"$tmp/$pol.start" 2>&1 \
    || { cat "$tmp/$pol.start" >&2; exit 1; }
  dirs+=("$tmp/$pol")
  printf '[smtp]\nhostname = "mailguard-bench.localhost"\n' >"$tmp/$pol.mg.toml"
  "$mailguard" serve -c "$tmp/$pol.mg.toml" --listen "127.0.0.1:$f" --upstream "127.0.0.1:$r" \
    --policy "$policy" --store "$tmp/$pol.db" --no-web --workers "$workers" \
    --log-level warning >"$tmp/$pol.serve.log" 2>&1 &
  mgpid[$pol]=$!; pids+=("$!")
  wait_port "$f" || { cat "$tmp/$pol.serve.log" >&2; exit 1; }
done

# --- one pass: before-queue (zero-cost and MailGuard) and gateway ------------------------------
# Built from the harness's filter mode (its :reinject smtpd), then switched to the settings of
# deploy/postfix/before-queue: no content_filter, smtpd_proxy_* on the submission smtpd (maxproc
# 20), the reinjection smtpd doing the single cleanup pass (only no_unknown_recipient_checks).
start_onepass() {  # $1 path, $2 submission, $3 proxy target port ("" = none), $4 reinject port
  local d=$tmp/$1 conf
  "$harness" start --mode filter --listen "127.0.0.1:$2" --filter "127.0.0.1:${3:-$2}" \
    --reinject "127.0.0.1:$4" --sink "127.0.0.1:$sink_port" --smtpd-maxproc 20 \
    --dir "$d" --no-install "${sets[@]}" >"$d.start" 2>&1 || { cat "$d.start" >&2; exit 1; }
  dirs+=("$d")
  conf=$d/etc
  postconf -c "$conf" -e content_filter= \
    && postconf -c "$conf" -P "127.0.0.1:$4/inet/receive_override_options=no_unknown_recipient_checks"
  if [ -n "$3" ]; then
    postconf -c "$conf" -P "127.0.0.1:$2/inet/smtpd_proxy_filter=127.0.0.1:$3" \
      "127.0.0.1:$2/inet/smtpd_proxy_options=speed_adjust" "127.0.0.1:$2/inet/smtpd_proxy_timeout=300s"
  fi
  postfix -c "$conf" reload >/dev/null 2>&1
  wait_port "$4" || { echo "postfix.sh: $1 reinjection :$4 not up" >&2; exit 1; }
}
start_mailguard() {  # $1 path, $2 listen port, $3 upstream port
  printf '[smtp]\nhostname = "mailguard-bench.localhost"\n' >"$tmp/$1.mg.toml"
  "$mailguard" serve -c "$tmp/$1.mg.toml" --listen "127.0.0.1:$2" --upstream "127.0.0.1:$3" \
    --policy "$repo/bench/policies/observe.toml" --store "$tmp/$1.db" --no-web \
    --workers "$workers" --log-level warning >"$tmp/$1.serve.log" 2>&1 &
  mgpid[$1]=$!; pids+=("$!")
  wait_port "$2" || { cat "$tmp/$1.serve.log" >&2; exit 1; }
}
start_milter() {  # $1 path, $2 submission, $3 milter port: Postfix + smtpd_milters
  local d=$tmp/$1 py
  "$harness" start --mode plain --listen "127.0.0.1:$2" --sink "127.0.0.1:$sink_port" \
    --smtpd-maxproc 20 --dir "$d" --no-install "${sets[@]}" >"$d.start" 2>&1 \
    || { cat "$d.start" >&2; exit 1; }
  dirs+=("$d")
  postconf -c "$d/etc" -P "127.0.0.1:$2/inet/smtpd_milters=inet:127.0.0.1:$3"
  postconf -c "$d/etc" -e milter_default_action=tempfail milter_protocol=6
  postfix -c "$d/etc" reload >/dev/null 2>&1
  if [ "$1" = ml0 ]; then
    py=$(dirname "$mailguard")/python
    "$py" "$repo/bench/null_milter.py" --listen "127.0.0.1:$3" >"$tmp/$1.serve.log" 2>&1 &
  else
    printf '[smtp]\nhostname = "mailguard-bench.localhost"\n' >"$tmp/$1.mg.toml"
    "$mailguard" serve -c "$tmp/$1.mg.toml" --listen "127.0.0.1:$((${3} + 100))" \
      --milter "127.0.0.1:$3" --upstream "127.0.0.1:$sink_port" \
      --policy "$repo/bench/policies/observe.toml" --store "$tmp/$1.db" --no-web \
      --workers "$workers" --log-level warning >"$tmp/$1.serve.log" 2>&1 &
  fi
  mgpid[$1]=$!; pids+=("$!")
  wait_port "$3" || { cat "$tmp/$1.serve.log" >&2; exit 1; }
}
for path in $onepass; do
  case "$path" in
    ml) start_milter ml 12532 10035 ;;
    ml0) start_milter ml0 12533 10036 ;;
    bq0) start_onepass bq0 12529 10030 10030 ;;
    bq) start_onepass bq 12530 10031 10032; start_mailguard bq 10031 10032 ;;
    gw) start_onepass gw 12531 "" 10034; start_mailguard gw 10033 10034 ;;
    *) echo "postfix.sh: unknown --onepass path $path (bq0, bq, gw, ml, ml0)" >&2; exit 2 ;;
  esac
done
sleep 1  # reloaded masters settle

# CPU ticks (utime+stime+cutime+cstime) of these processes and all their descendants: a
# path's Postfix master (its exited children are in its cutime) plus its MailGuard / milter
tree_ticks() {
  local todo=("$@") all=() p
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}; todo=("${todo[@]:1}"); all+=("$p")
    for c in $(pgrep -P "$p" || true); do todo+=("$c"); done
  done
  for p in "${all[@]}"; do sed 's/.*) //' "/proc/$p/stat" 2>/dev/null || true; done \
    | awk '{ s += $12 + $13 + $14 + $15 } END { print s + 0 }'
}
master_of() { tr -dc '0-9' <"$tmp/$1/spool/pid/master.pid"; }
# a field of the timed run's line (-r 1: one run; the median line repeats only the rate)
field() { awk -v k="$1" '/ OK / && !/median/ { for (i=1;i<=NF;i++) if (index($i, k"=")==1) { sub(k"=","",$i); v=$i } } END { print v }'; }
median() {  # $1 = printf format of the result
  sort -n | awk -v f="${1:-%.0f}" '{a[NR]=$1} END { if (!NR) { print "-"; exit }
    m = (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2; printf f "\n", m }'
}
: >"$tmp/results"   # round size path rate mg_cpu
for round in $(seq "$rounds"); do
  for size in $sizes; do
    count=$count_small; [ "$size" -ge 100000 ] && count=$count_large
    for path in alone $policies $onepass; do
      watch=()
      if [ -n "${mgpid[$path]:-}" ]; then
        watch=(-w "${mgpid[$path]}")
        for c in $(pgrep -P "${mgpid[$path]}" || true); do watch+=(-w "$c"); done
      fi
      tree=($(master_of "$path") ${mgpid[$path]:-})
      t0=$(tree_ticks "${tree[@]}")
      out=$("$bench" --target "127.0.0.1:${listen[$path]}" -p "$sink_port" -l "$size" -m "$count" \
            -s "$conc" -r 1 -W "$warmup" -S "$settle" "${watch[@]}" --label "r$round $path " 2>&1) \
        || { echo "$out" >&2; tail -n 5 "$tmp"/*.serve.log >&2 || true
             echo "postfix.sh: run failed (round $round, $path, $size)" >&2; exit 1; }
      echo "$out" | grep -v median >&2
      t1=$(tree_ticks "${tree[@]}")
      rate=$(echo "$out" | field rate); cpu=$(echo "$out" | field watch)
      allms=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n=$((count + warmup)) \
        'BEGIN { printf "%.2f", d * 1000 / hz / n }')
      echo "$round $size $path $rate ${cpu:--} $allms" >>"$tmp/results"
    done
  done
done

echo
echo "Postfix $(postconf -d -h mail_version 2>/dev/null) alone vs + MailGuard (workers=$workers," \
     "scan maxproc=$scan_maxproc${sets[*]:+, ${sets[*]}}), c$conc, one connection per message," \
     "$rounds round(s), $(nproc) cores, $(date -u +%F)"
printf "%-8s %-8s %9s %9s %7s %8s %10s %10s   %s\n" size path "alone" "with_mg" ratio "mg_cpu%" \
  "mg_ms/msg" "all_ms/msg" "ratios per round"
for size in $sizes; do
  printf "%-8s %-8s %9s %9s %7s %8s %10s %10s\n" "$size" alone \
    "$(awk -v s="$size" '$2==s && $3=="alone" {print $4}' "$tmp/results" | median)" - - - - \
    "$(awk -v s="$size" '$2==s && $3=="alone" {print $6}' "$tmp/results" | median %.2f)"
  for pol in $policies $onepass; do
    alone=$(awk -v s="$size" '$2==s && $3=="alone" {print $4}' "$tmp/results" | median)
    with=$(awk -v s="$size" -v p="$pol" '$2==s && $3==p {print $4}' "$tmp/results" | median)
    cpu=$(awk -v s="$size" -v p="$pol" '$2==s && $3==p && $5!="-" {print $5}' "$tmp/results" | median)
    ratios=$(awk -v s="$size" -v p="$pol" '
      $2==s && $3=="alone" {a[$1]=$4} $2==s && $3==p {m[$1]=$4}
      END { for (r in m) if (a[r] > 0) printf "%.2f\n", m[r]/a[r] }' "$tmp/results" | sort -n)
    ratio=$(echo "$ratios" | median %.2f)
    all_ms=$(awk -v s="$size" -v p="$pol" '$2==s && $3==p {print $6}' "$tmp/results" | median %.2f)
    msg_ms=$(awk -v c="$cpu" -v r="$with" 'BEGIN { if (r > 0 && c != "-") printf "%.1f", c * 10 / r; else print "-" }')
    printf "%-8s %-8s %9s %9s %7s %8s %10s %10s   %s\n" "$size" "$pol" "$alone" "$with" "$ratio" "$cpu" \
      "$msg_ms" "$all_ms" \
      "$(echo "$ratios" | tr '\n' ' ')"
  done
done
# item 4 of issue 15: MailGuard before-queue against the zero-cost filter in the same place
if [[ " $onepass " == *" bq0 "* && " $onepass " == *" bq "* ]]; then
  echo
  echo "before-queue: MailGuard / zero-cost filter (median of per-round ratios)"
  for size in $sizes; do
    ratios=$(awk -v s="$size" '$2==s && $3=="bq0" {a[$1]=$4} $2==s && $3=="bq" {m[$1]=$4}
      END { for (r in m) if (a[r] > 0) printf "%.2f\n", m[r]/a[r] }' "$tmp/results" | sort -n)
    printf "%-8s bq/bq0 %s   %s\n" "$size" "$(echo "$ratios" | median %.2f)" "$(echo "$ratios" | tr '\n' ' ')"
  done
fi
# issue 15 item 5: the milter prototype against MailGuard as the before-queue proxy
if [[ " $onepass " == *" ml "* ]]; then
  for ref in bq bq0 ml0; do
    [[ " $onepass " == *" $ref "* ]] || continue
    echo
    echo "milter: ml / $ref (median of per-round ratios)"
    for size in $sizes; do
      ratios=$(awk -v s="$size" -v r="$ref" '$2==s && $3==r {a[$1]=$4} $2==s && $3=="ml" {m[$1]=$4}
        END { for (k in m) if (a[k] > 0) printf "%.2f\n", m[k]/a[k] }' "$tmp/results" | sort -n)
      printf "%-8s ml/%-4s %s   %s\n" "$size" "$ref" "$(echo "$ratios" | median %.2f)" "$(echo "$ratios" | tr '\n' ' ')"
    done
  done
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
for pol in $policies $onepass; do
  [ -e "$tmp/$pol.serve.log" ] || continue
  if grep -q Traceback "$tmp/$pol.serve.log"; then
    echo "mailguard ($pol) logged tracebacks:" >&2; cat "$tmp/$pol.serve.log" >&2; exit 1
  fi
done
