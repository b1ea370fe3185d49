#!/usr/bin/env bash
# check_deploy.sh - check every file in deploy/ with the real tool it configures.
#
# Usage: scripts/check_deploy.sh [PIECE...]      (no PIECE = all)
#   rules         promtool check rules alerts.yml, promtool check config prometheus.yml
#   rules-test    promtool test rules alerts_test.yml
#   systemd       systemd-analyze verify mailguard.service (a temp copy whose ExecStart is
#                 this checkout's mailguard; the shipped /opt path need not exist here)
#   (metric names in the dashboard and alerts: tests/test_metrics_exported.py scrapes a
#   running server for them)
#   postfix       the Postfix snippets (and the compose demo's config) pass postconf with no
#                 warning, and carry the settings the filter set-up depends on
#
# Exit: 0 all checked pieces passed; 1 a piece failed; 77 a piece was skipped because its
# tool is missing (only when it was the sole piece asked for). With MAILGUARD_REQUIRE_TOOLS
# set (CI), a missing tool is a failure. Tools: promtool (Debian: prometheus), systemd-analyze
# (systemd), postconf (postfix), python with mailguard installed (PYTHON, default: the repo
# .venv, else python3).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEPLOY=$ROOT/deploy
PATH=$PATH:/usr/sbin:/usr/bin:/sbin:/bin
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/check_deploy.XXXXXX") || exit 1
trap 'rm -rf -- "$TMP"' EXIT

say() { echo "check_deploy: $*" >&2; }
need() {  # need TOOL: 0 if present; else 77 (skip) or 1 (MAILGUARD_REQUIRE_TOOLS set)
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ -n "${MAILGUARD_REQUIRE_TOOLS:-}" ]; then say "$1 not found (MAILGUARD_REQUIRE_TOOLS is set)"; return 1; fi
  say "$1 not found: skipped"; return 77
}
quiet() {  # run CMD; fail on non-zero exit OR any output on stderr (warnings count)
  local err=$TMP/stderr rc
  "$@" >"$TMP/stdout" 2>"$err"; rc=$?
  if [ $rc -ne 0 ] || [ -s "$err" ]; then
    say "FAILED ($rc): $*"; cat "$TMP/stdout" "$err" >&2; return 1
  fi
}

check_rules() {
  need promtool || return
  (cd "$DEPLOY/prometheus" && promtool check rules alerts.yml && promtool check config prometheus.yml) \
    >"$TMP/out" 2>&1 || { cat "$TMP/out" >&2; return 1; }
}

check_rules_test() {
  need promtool || return
  (cd "$DEPLOY/prometheus" && promtool test rules alerts_test.yml) >"$TMP/out" 2>&1 \
    || { cat "$TMP/out" >&2; return 1; }
}

check_systemd() {
  need systemd-analyze || return
  local bin=${MAILGUARD_BIN:-}
  [ -n "$bin" ] || bin=$(dirname "$PYTHON")/mailguard
  [ -x "$bin" ] || bin=$(command -v mailguard 2>/dev/null) || true
  [ -n "$bin" ] && [ -x "$bin" ] || { say "no mailguard executable (set MAILGUARD_BIN)"; return 1; }
  local unit=$TMP/systemd/mailguard.service
  mkdir -p "$TMP/systemd"
  sed "s|^ExecStart=/opt/mailguard/venv/bin/mailguard |ExecStart=$bin |" \
    "$DEPLOY/systemd/mailguard.service" >"$unit"
  grep -q "^ExecStart=$bin " "$unit" || { say "ExecStart line not found in the unit"; return 1; }
  # verify returns 0 on unknown keys and bad values ("ignoring"): any message is a failure.
  quiet systemd-analyze verify "$unit"
}

postconf_clean() {  # postconf_clean DIR: -n, -M and -P without a single warning
  quiet postconf -c "$1" -n && quiet postconf -c "$1" -M && quiet postconf -c "$1" -P
}

check_postfix() {
  need postconf || return
  local dist=/usr/share/postfix/master.cf.dist d=$TMP/postfix
  [ -r "$dist" ] || { say "$dist missing (Debian postfix package)"; return 1; }
  mkdir -p "$d"
  { echo "compatibility_level = 3.6"; cat "$DEPLOY/postfix/main.cf.snippet"; } >"$d/main.cf"
  { cat "$dist"; cat "$DEPLOY/postfix/master.cf.snippet"; } >"$d/master.cf"
  postconf_clean "$d" || return 1
  postconf -c "$d" -P >"$TMP/P" 2>&1
  postconf -c "$d" -n >"$TMP/N" 2>&1
  local want ok=0
  for want in \
    'submission/inet/content_filter = scan:[127.0.0.1]:10025' \
    'scan/unix/smtp_send_xforward_command = yes' \
    'scan/unix/disable_mime_output_conversion = yes' \
    'scan/unix/smtp_connection_cache_on_demand = yes' \
    '127.0.0.1:10026/inet/content_filter =' \
    '127.0.0.1:10026/inet/receive_override_options = no_unknown_recipient_checks,no_header_body_checks,no_milters,no_address_mappings' \
    '127.0.0.1:10026/inet/smtpd_authorized_xforward_hosts = 127.0.0.0/8' \
    '127.0.0.1:10026/inet/mynetworks = 127.0.0.0/8'; do
    grep -qxF -- "$want" "$TMP/P" || { say "master.cf.snippet: missing '$want'"; ok=1; }
  done
  for want in 'scan_destination_recipient_limit = 1000' 'scan_destination_concurrency_limit = 20'; do
    grep -qxF -- "$want" "$TMP/N" || { say "main.cf.snippet: missing '$want'"; ok=1; }
  done
  # Outbound only: the snippets must never set a global content_filter, nor filter port 25.
  if grep -q '^content_filter' "$TMP/N"; then say "main.cf.snippet sets content_filter globally"; ok=1; fi
  if grep -q '^smtp/inet/content_filter' "$TMP/P"; then say "port 25 (smtp inet) is filtered"; ok=1; fi
  # maxproc of scan = the destination concurrency limit in main.cf
  local maxproc
  maxproc=$(postconf -c "$d" -M scan/unix 2>/dev/null | awk '{print $7}')
  [ "$maxproc" = 20 ] || { say "scan maxproc is '$maxproc', main.cf says 20"; ok=1; }
  [ $ok = 0 ] || return 1
  # The compose demo's Postfix is generated from the same snippets: it must be clean too.
  mkdir -p "$TMP/demo"
  quiet sh "$DEPLOY/container/postfix/configure.sh" "$TMP/demo" "$DEPLOY/postfix" || return 1
  postconf_clean "$TMP/demo"
}

run_piece() {
  case "$1" in
    rules) check_rules ;;
    rules-test) check_rules_test ;;
    systemd) check_systemd ;;
    postfix) check_postfix ;;
    *) say "unknown piece: $1 (rules, rules-test, systemd, postfix)"; return 2 ;;
  esac
}

PIECES=("$@")
[ ${#PIECES[@]} -gt 0 ] || PIECES=(rules rules-test systemd postfix)
status=0 skipped=0
for p in "${PIECES[@]}"; do
  run_piece "$p"; rc=$?
  case $rc in
    0) say "$p: ok" ;;
    77) say "$p: skipped"; skipped=$((skipped + 1)) ;;
    2) exit 2 ;;
    *) say "$p: FAILED"; status=1 ;;
  esac
done
if [ $status = 0 ] && [ $skipped = ${#PIECES[@]} ]; then exit 77; fi
exit $status
