#!/usr/bin/env bash
# Dependency audit: pip-audit against the installed environment (the project's venv), all
# installed distributions except the project itself (installed editable: --skip-editable).
#
#   .ci/audit.sh            # exit 0 = no known vulnerability; 1 = findings; 2 = cannot audit
#
# The vulnerability data comes from PyPI's JSON API (pip-audit's default service; set
# PIP_AUDIT_SERVICE=osv for OSV). Without network access to it the audit cannot run: this script
# says so and fails (exit 2) rather than reporting a clean result it did not get.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -m pip_audit --version >/dev/null 2>&1; then
    echo "audit: pip-audit is not installed in $("$PY" -c 'import sys; print(sys.prefix)')" >&2
    echo "audit: install it with: $PY -m pip install pip-audit" >&2
    exit 2
fi
service=${PIP_AUDIT_SERVICE:-pypi}
# pip-audit asks PyPI per release (/pypi/NAME/VERSION/json; a mirror that serves only
# /pypi/NAME/json is not enough) or OSV (POST /v1/query): probe exactly that.
if ! "$PY" - "$service" <<'PYEOF' >/dev/null 2>&1
import importlib.metadata as md, sys, urllib.request
v = md.version("aiosmtpd")
if sys.argv[1] == "osv":
    q = b'{"package": {"name": "aiosmtpd", "ecosystem": "PyPI"}, "version": "%s"}' % v.encode()
    urllib.request.urlopen("https://api.osv.dev/v1/query", data=q, timeout=15)
else:
    urllib.request.urlopen(f"https://pypi.org/pypi/aiosmtpd/{v}/json", timeout=15)
PYEOF
then
    echo "audit: cannot reach the vulnerability database of '$service' (per-release data):" \
         "no network, or a mirror without it. NOT audited." >&2
    exit 2
fi
out=$("$PY" -m pip_audit --skip-editable -s "$service" --progress-spinner off --desc off 2>&1)
rc=$?
echo "$out"
if grep -q "could not be audited" <<<"$out"; then
    echo "audit: some packages could not be looked up (listed above): NOT a clean audit" >&2
    exit 2
fi
case $rc in
    0) echo "audit: clean (service: $service)";;
    1) echo "audit: known vulnerabilities above: raise the lower bounds in pyproject.toml" >&2;;
    *) echo "audit: pip-audit failed (exit $rc)" >&2; rc=2;;
esac
exit $rc
