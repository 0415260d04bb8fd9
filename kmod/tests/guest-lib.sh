# What every guest script starts with; scripts/kmod-vm puts this file at
# /guest-lib.sh and the scripts source it (`. /guest-lib.sh`).
set -eu
# A failure prints the marker the host looks for, and the tail of each file
# named in $guest_logs (node logs, set by the script).
guest_logs=
trap 'rc=$?; [ $rc -eq 0 ] || { echo "GUEST FAIL: a command failed (exit $rc)"; [ -z "$guest_logs" ] || tail -n 30 $guest_logs 2>/dev/null; }' EXIT
ctl=drmesh-kmodctl

# now: seconds since boot, in hundredths (busybox's date has no %N)
now() { cut -d' ' -f1 /proc/uptime; }
# elapsed START: seconds since START (a now value), with two decimals
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
# step TEXT: a progress line, stamped with the guest's uptime
step() { echo "== [$(now) s] $*"; }
# fail TEXT: the failure marker with a reason, and exit
fail() {
    echo "GUEST FAIL: $*"
    exit 1
}
# val KEY TEXT: the value of KEY in "key=value ..." output
val() { echo "$2" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
# num KEY FILE, str KEY FILE: a field of a pretty-printed `drmesh ctl ... --json`
# answer (one key a line), a number or a string
num() { sed -n "s/.*\"$1\": \([0-9][0-9.]*\).*/\1/p" "$2" | head -n 1; }
str() { sed -n "s/.*\"$1\": \"\(.*\)\",*$/\1/p" "$2" | head -n 1; }
