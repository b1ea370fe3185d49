#!/usr/bin/env bash
# Hold-path throughput of `mailguard serve` on each store (issue 14 item 7), against the direct
# smtp-source -> smtp-sink path measured in the same run (../shared/bench/relay-bench.sh).
#
#   bench/store.sh [--rounds 1] [--runs 3] [--count 2000] [--conc 20] [--size 5120]
#                  [--warmup 50] [--settle 300] [--cases "sqlite pg pg2 pass-sqlite pass-pg"]
#
# Cases (each on a fresh store; every guard runs bench/policies/hold-all.toml unless "pass"):
#   sqlite       one guard, the embedded SQLite store (the default)
#   pg           one guard, PostgreSQL
#   pg2          two guards on one PostgreSQL database; the load is split across them: two
#                smtp-source processes in parallel, COUNT/2 messages at CONC/2 each, total msg/s
#   pass-sqlite, pass-pg   bench/policies/observe.toml (every check runs, all mail relayed
#                in-transaction): the pass path on the same store, for reference
# The direct path (smtp-source -> smtp-sink) is measured at the start and the end of every
# round; ratios are taken against the mean of the two.
#
# What "hold path" means here: smtp-source sends from@example.com -> to@example.net; hold-all.toml
# owns example.com, so each message is held for a day and stored with its link token and the
# sender's "held" notice in ONE transaction committed before the 250 (SQLite: WAL + fsync;
# PostgreSQL: synchronous_commit = on, fsync = on, the server defaults). Every scheduler then
# sends the notices through the upstream, i.e. to the sink: one per message, so the sink's
# counter verifies the run (relay-bench's check) and no held message itself leaves.
# Figures per case:
#   accepted msg/s   COUNT / smtp-source's own wall time: 250s (durable commits) per second;
#                    median of the runs. This is the hold-path throughput.
#   ratio            accepted / direct msg/s of the same round
#   +notices msg/s   COUNT / time until the sink had every notice (relay-bench's "rate")
#   guard ms/msg     CPU of the guard process(es) per message, whole case (warm-up and notices
#                    included), from /proc/PID/stat
#   pg ms/msg        CPU of the PostgreSQL server processes per message, the same way
# After each hold case the store must hold exactly WARMUP + RUNS*COUNT messages in state held.
#
# PostgreSQL: a private cluster under the script's temp dir (initdb + pg_ctl from Debian's
# postgresql package, on a free loopback port, trust auth, run as user postgres or nobody when
# the script runs as root), stopped and removed on exit with everything else (trap).
# Needs: smtp-source/smtp-sink (Debian's postfix package), python3, the mailguard command
# ($MAILGUARD, else `mailguard` on PATH), for the pg cases initdb/pg_ctl/psql.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
harness=${RELAY_BENCH:-$repo/../shared/bench/relay-bench.sh}
rounds=1 runs=3 count=2000 conc=20 size=5120 warmup=50 settle=300
cases="sqlite pg pg2 pass-sqlite pass-pg"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2;;
    --runs) runs=$2; shift 2;;
    --count) count=$2; shift 2;;
    --conc) conc=$2; shift 2;;
    --size) size=$2; shift 2;;
    --warmup) warmup=$2; shift 2;;
    --settle) settle=$2; shift 2;;
    --cases) cases=$2; shift 2;;
    -h|--help) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "store.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
for v in rounds runs count conc size warmup settle; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "store.sh: --$v must be a non-negative integer" >&2; exit 2; }
done
[ "$conc" -ge 2 ] || { echo "store.sh: --conc must be at least 2 (pg2 splits it)" >&2; exit 2; }
[ -x "$harness" ] || { echo "store.sh: relay-bench.sh not found at $harness (set RELAY_BENCH)" >&2; exit 2; }
PATH=$PATH:/usr/sbin:/usr/lib/postfix/sbin
command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null \
  || { echo "store.sh: smtp-source/smtp-sink missing (Debian's postfix package)" >&2; exit 2; }
mailguard=${MAILGUARD:-$(command -v mailguard || echo "$repo/.venv/bin/mailguard")}
[ -x "$mailguard" ] || { echo "store.sh: mailguard not found (set MAILGUARD)" >&2; exit 2; }
hold_policy=$here/policies/hold-all.toml
pass_policy=$here/policies/observe.toml
HZ=$(getconf CLK_TCK)

tmp=$(mktemp -d /tmp/mailguard-store-bench.XXXXXX); chmod 755 "$tmp"
guards=()           # pids of the guards running now
src_pids=() sink_pid="" rb_pid="" pg_data="" pg_as=()
stop_pids() {  # TERM, wait up to 10 s, KILL: only the pids given (ours)
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 100); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.1
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
cleanup() {
  set +e
  # relay-bench first: its own trap stops the smtp-source and smtp-sink it started
  stop_pids ${rb_pid:+"$rb_pid"} ${src_pids[@]+"${src_pids[@]}"} ${sink_pid:+"$sink_pid"} \
    ${guards[@]+"${guards[@]}"}
  if [ -n "$pg_data" ] && [ -f "$pg_data/postmaster.pid" ]; then
    (cd "$tmp/pg" && "${pg_as[@]}" "$pgbin/pg_ctl" -D "$pg_data" -m immediate -w stop >/dev/null 2>&1)
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ticks_of() {  # sum of utime+stime over the pids given (gone ones count 0)
  local p s t=0
  for p in "$@"; do
    { read -r s < "/proc/$p/stat"; } 2>/dev/null || continue
    s=${s##*) }; set -- $s; t=$((t + ${12} + ${13}))
  done
  echo "$t"
}
median() { sort -n | awk '{a[NR]=$1} END{if(!NR){print "-"; exit} print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
sink_port=$(free_port)

# -- PostgreSQL ---------------------------------------------------------------------------------
pgbin="" pg_port=""
pg_start() {
  pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n | tail -1)
  [ -n "$pgbin" ] || pgbin=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
  [ -x "$pgbin/initdb" ] || { echo "store.sh: PostgreSQL (initdb, pg_ctl) not installed" >&2; exit 2; }
  mkdir "$tmp/pg"
  if [ "$(id -u)" = 0 ]; then  # PostgreSQL refuses to run as root
    local u; u=postgres; getent passwd postgres >/dev/null || u=nobody
    chown "$u" "$tmp/pg"; chmod 700 "$tmp/pg"; pg_as=(runuser -u "$u" --)
  fi
  pg_data=$tmp/pg/data pg_port=$(free_port)
  (cd "$tmp/pg" && LC_ALL=C TZ=UTC "${pg_as[@]}" "$pgbin/initdb" -D "$pg_data" -U mailguard \
     -A trust -E UTF8 --no-instructions >"$tmp/initdb.log" 2>&1) \
    || { cat "$tmp/initdb.log" >&2; exit 1; }
  # server defaults for durability (fsync, synchronous_commit, full_page_writes all on)
  (cd "$tmp/pg" && LC_ALL=C TZ=UTC "${pg_as[@]}" "$pgbin/pg_ctl" -D "$pg_data" -l "$tmp/pg/server.log" \
     -o "-c listen_addresses=127.0.0.1 -c port=$pg_port -c unix_socket_directories=$tmp/pg -c max_connections=100" \
     -w -t 60 start >/dev/null) || { cat "$tmp/pg/server.log" >&2; exit 1; }
}
psql_() { "$pgbin/psql" -X -q -t -A -v ON_ERROR_STOP=1 -d "postgresql://mailguard@127.0.0.1:$pg_port/$1" -c "$2"; }
pg_newdb() { psql_ postgres "CREATE DATABASE $1" >/dev/null; echo "postgresql://mailguard@127.0.0.1:$pg_port/$1"; }
pg_pids() {  # the postmaster and its children (backends, walwriter, checkpointer …)
  local pm; pm=$(head -1 "$pg_data/postmaster.pid" 2>/dev/null) || return 0
  echo "$pm" $(ps -o pid= --ppid "$pm")
}

# -- guards -------------------------------------------------------------------------------------
start_guard() {  # name port store policy -> appends to guards
  local name=$1 port=$2 store=$3 policy=$4
  "$mailguard" serve --listen "127.0.0.1:$port" --upstream "127.0.0.1:$sink_port" \
    --policy "$policy" --store "$store" --no-web --grace 5 --log-level error \
    >"$tmp/$name.log" 2>&1 &
  local pid=$!
  guards+=("$pid")
  for _ in $(seq 300); do port_open "$port" && return 0; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  echo "store.sh: guard $name did not start:" >&2; cat "$tmp/$name.log" >&2; exit 1
}
stop_guards() {
  stop_pids "${guards[@]}"
  local name; for name in "$@"; do
    if grep -q Traceback "$tmp/$name.log"; then echo "store.sh: $name.log has tracebacks:" >&2; cat "$tmp/$name.log" >&2; exit 1; fi
  done
  guards=()
}
held_count() {  # store -> messages in state held
  case "$1" in
    postgresql://*) psql_ "${1##*/}" "SELECT count(*) FROM held WHERE state = 'held'";;
    *) python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM held WHERE state = ?", ("held",)).fetchone()[0])' "$1";;
  esac
}

# -- one case through relay-bench.sh (one guard) -------------------------------------------------
# sets ACC (accepted msg/s, median), E2E (msg/s until the sink had all), GMS, PMS (ms CPU/msg)
harness_run() {  # relay-bench.sh ARGS… > $tmp/rb.out, in the background so a signal stops it
  "$harness" "$@" >"$tmp/rb.out" 2>&1 &
  rb_pid=$!
  local rc=0; wait "$rb_pid" || rc=$?
  rb_pid=""
  return "$rc"
}
direct_rate() {
  local out
  harness_run --direct -l "$size" -m "$count" -s "$conc" -r "$runs" -p "$sink_port" --label direct \
    || { cat "$tmp/rb.out" >&2; echo "store.sh: direct run failed" >&2; exit 1; }
  out=$(cat "$tmp/rb.out")
  echo "$out" | tee -a "$tmp/out" >&2
  echo "$out" | awk '/median/ { for (i=1;i<=NF;i++) if ($i ~ /^rate=/) { sub("rate=","",$i); print $i } }'
}
one_guard_case() {  # name store policy
  local name=$1 store=$2 policy=$3 port g0 g1 p0 p1 out
  port=$(free_port)
  start_guard "$name" "$port" "$store" "$policy"
  p0=0; [ -n "$pg_port" ] && [[ $store == postgresql://* ]] && p0=$(ticks_of $(pg_pids))
  g0=$(ticks_of "${guards[@]}")
  harness_run --target "127.0.0.1:$port" -p "$sink_port" -l "$size" -m "$count" -s "$conc" \
      -r "$runs" -W "$warmup" -S "$settle" -w "${guards[0]}" --label "$name" \
    || { cat "$tmp/rb.out" >&2; echo "store.sh: $name: relay-bench failed" >&2; exit 1; }
  out=$(cat "$tmp/rb.out")
  echo "$out" | tee -a "$tmp/out" >&2
  g1=$(ticks_of "${guards[@]}")
  p1=0; [[ $store == postgresql://* ]] && p1=$(ticks_of $(pg_pids))
  stop_guards "$name"
  local n=$((warmup + runs * count))
  ACC=$(echo "$out" | awk -v c="$count" '!/median/ && / OK / { for (i=1;i<=NF;i++) if ($i ~ /^src_wall=/) { sub("src_wall=","",$i); sub("s$","",$i); printf "%.0f\n", c/$i } }' | median)
  E2E=$(echo "$out" | awk '/median/ { for (i=1;i<=NF;i++) if ($i ~ /^rate=/) { sub("rate=","",$i); print $i } }')
  GMS=$(awk -v t=$((g1 - g0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.2f", t*1000/hz/n}')
  PMS=-; [[ $store == postgresql://* ]] && PMS=$(awk -v t=$((p1 - p0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.2f", t*1000/hz/n}')
  if [ "$policy" = "$hold_policy" ]; then
    local held; held=$(held_count "$store")
    [ "$held" = "$n" ] || { echo "store.sh: $name: $held messages held, expected $n" >&2; exit 1; }
  fi
}

# -- pg2: two guards, one database, two smtp-source in parallel ----------------------------------
sink_count() {
  local n; n=$(tail -c 200 "$tmp/sink.out" | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1)
  echo "${n#mesg=}" | awk '{print $1+0}'
}
two_sources() {  # n port1 port2 -> SRCWALL, WALL; returns 1 unless both exit 0 and the sink got n
  local n=$1 a=$2 b=$3 before t0 t1 t2 ra rb half=$(( $1 / 2 )) deadline got
  before=$(sink_count)
  t0=$(date +%s.%N)
  timeout 300 smtp-source -s $((conc / 2)) -l "$size" -f from@example.com -t to@example.net \
    -m "$half" "127.0.0.1:$a" >"$tmp/src1.out" 2>&1 & src_pids=($!)
  timeout 300 smtp-source -s $((conc - conc / 2)) -l "$size" -f from@example.com -t to@example.net \
    -m $((n - half)) "127.0.0.1:$b" >"$tmp/src2.out" 2>&1 & src_pids+=($!)
  wait "${src_pids[0]}" && ra=0 || ra=$?
  wait "${src_pids[1]}" && rb=0 || rb=$?
  src_pids=()
  t1=$(date +%s.%N) t2=$t1
  deadline=$((SECONDS + settle))
  got=$(( $(sink_count) - before ))
  while [ "$got" -lt "$n" ] && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.05; got=$(( $(sink_count) - before )); [ "$got" -ge "$n" ] && t2=$(date +%s.%N)
  done
  SRCWALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
  WALL=$(awk -v a="$t0" -v b="$t2" 'BEGIN{printf "%.3f", b-a}')
  GOT=$got
  [ "$ra" = 0 ] && [ "$rb" = 0 ] && [ "$got" = "$n" ] \
    || { echo "pg2: smtp-source rc=$ra/$rb, sink $got/$n: $(tail -1 "$tmp/src1.out") $(tail -1 "$tmp/src2.out")" >&2; return 1; }
}
two_guard_case() {  # name store
  local name=$1 store=$2 p1 p2 g0 g1 k0 k1 accs=() e2es=() i
  p1=$(free_port); p2=$(free_port)
  start_guard "${name}a" "$p1" "$store" "$hold_policy"
  start_guard "${name}b" "$p2" "$store" "$hold_policy"
  local sink_user=(); [ "$(id -u)" = 0 ] && sink_user=(-u nobody)
  smtp-sink -c "${sink_user[@]}" -m 1024 "127.0.0.1:$sink_port" 1024 >"$tmp/sink.out" 2>"$tmp/sink.err" &
  sink_pid=$!
  for _ in $(seq 50); do port_open "$sink_port" && break; sleep 0.1; done
  k0=$(ticks_of $(pg_pids)); g0=$(ticks_of "${guards[@]}")
  [ "$warmup" -gt 0 ] && { two_sources "$warmup" "$p1" "$p2" || exit 1; }
  for i in $(seq "$runs"); do
    two_sources "$count" "$p1" "$p2" || exit 1
    accs+=("$(awk -v c="$count" -v w="$SRCWALL" 'BEGIN{printf "%.0f", c/w}')")
    e2es+=("$(awk -v c="$count" -v w="$WALL" 'BEGIN{printf "%.0f", c/w}')")
    echo "$name size=$size conc=$((conc / 2))+$((conc - conc / 2)) count=$count src_wall=${SRCWALL}s accepted=${accs[-1]} msg/s wall=${WALL}s +notices=${e2es[-1]} msg/s sink=$GOT/$count OK" \
      | tee -a "$tmp/out" >&2
  done
  g1=$(ticks_of "${guards[@]}"); k1=$(ticks_of $(pg_pids))
  stop_pids "$sink_pid"; sink_pid=""
  stop_guards "${name}a" "${name}b"
  local n=$((warmup + runs * count))
  ACC=$(printf '%s\n' "${accs[@]}" | median)
  E2E=$(printf '%s\n' "${e2es[@]}" | median)
  GMS=$(awk -v t=$((g1 - g0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.2f", t*1000/hz/n}')
  PMS=$(awk -v t=$((k1 - k0)) -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.2f", t*1000/hz/n}')
  local held; held=$(held_count "$store")
  [ "$held" = "$n" ] || { echo "store.sh: $name: $held messages held, expected $n" >&2; exit 1; }
}

# -- the rounds ---------------------------------------------------------------------------------
case " $cases " in *" pg"*|*" pass-pg "*) pg_start;; esac
: >"$tmp/out"
declare -A acc_by=() ratio_by=() e2e_by=() gms_by=() pms_by=()
for r in $(seq "$rounds"); do
  d1=$(direct_rate)
  declare -A racc=()
  for c in $cases; do
    case "$c" in
      sqlite) one_guard_case "$c" "$tmp/r$r-$c.db" "$hold_policy";;
      pg) one_guard_case "$c" "$(pg_newdb "r${r}_${c//-/_}")" "$hold_policy";;
      pg2) two_guard_case "$c" "$(pg_newdb "r${r}_${c//-/_}")";;
      pass-sqlite) one_guard_case "$c" "$tmp/r$r-$c.db" "$pass_policy";;
      pass-pg) one_guard_case "$c" "$(pg_newdb "r${r}_${c//-/_}")" "$pass_policy";;
      *) echo "store.sh: unknown case $c" >&2; exit 2;;
    esac
    racc[$c]=$ACC
    acc_by[$c]+="$ACC " e2e_by[$c]+="$E2E " gms_by[$c]+="$GMS " pms_by[$c]+="$PMS "
  done
  d2=$(direct_rate)
  dm=$(awk -v a="$d1" -v b="$d2" 'BEGIN{printf "%.0f", (a+b)/2}')
  acc_by[direct]+="$dm "
  echo "round $r: direct $d1 / $d2 msg/s" >&2
  for c in $cases; do
    ratio_by[$c]+="$(awk -v a="${racc[$c]}" -v d="$dm" 'BEGIN{printf "%.2f", a/d}') "
  done
done

med() {  # "v1 v2 …" FORMAT -> the median, formatted; "-" when there is none
  local v; read -ra v <<<"$1"; [ ${#v[@]} -gt 0 ] || { echo -; return; }
  printf '%s\n' "${v[@]}" | median | awk -v f="$2" '{ if ($1 == "-") print "-"; else printf f "\n", $1 }'
}
echo
echo "bench/store.sh: ${size} B, c$conc, $count msgs x $runs runs (+$warmup warm-up), $rounds round(s); $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u '+%F %H:%M UTC')"
[ -n "$pg_port" ] && echo "PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}'): fsync=$(psql_ postgres 'SHOW fsync'), synchronous_commit=$(psql_ postgres 'SHOW synchronous_commit')"
printf "%-12s %10s %7s %10s %9s %9s   %s\n" case accepted ratio +notices guard_ms pg_ms "ratios per round"
printf "%-12s %10s %7s %10s %9s %9s\n" direct "$(med "${acc_by[direct]}" %.0f)" 1.00 - - -
for c in $cases; do
  printf "%-12s %10s %7s %10s %9s %9s   %s\n" "$c" "$(med "${acc_by[$c]}" %.0f)" \
    "$(med "${ratio_by[$c]}" %.2f)" "$(med "${e2e_by[$c]}" %.0f)" "$(med "${gms_by[$c]}" %.2f)" \
    "$(med "${pms_by[$c]//-/}" %.2f)" "${ratio_by[$c]}"
done
