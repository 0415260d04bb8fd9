#!/bin/sh
# Guest side of the end-to-end test of the `kmod` source kind, run as /guest-test
# by scripts/kmod-vm with /bin/drmesh (DRMESH_KMOD_VM_FILES).
#
# Two drmesh nodes run in the guest on loopback: "src" is the source of volume
# "data" (kind kmod: /dev/vda, the mounted ext4 disk, COW store /dev/vdb) and of
# volume "data-file" (kind file, the same disk, for the bytes-read comparison);
# "tgt" keeps the recovery points. A writer rewrites files in place while
# cycles run. Checks:
# - the first cycle after attach reads everything, later ones only changed blocks;
# - every RP restores (Merkle root checked by restore), e2fsck accepts it, and
#   its files are a consistent cut of the writer's sequence (the snapshot
#   instant: each file holds the tag of its last write before the instant);
# - after the writer stopped and the disk was unmounted, the last RP equals the
#   disk byte for byte (no changed block was missed along the incremental chain);
# - a cycle that fails (the target stopped mid-cycle) loses nothing: its
#   changes stay pending and the next cycle sends them;
# - `drmesh ctl agent-status` shows the attached device.
# Prints "bench:" lines with bytes read by kmod cycles and by a file full scan.
set -eu
trap 'rc=$?; [ $rc -eq 0 ] || { echo "GUEST FAIL: a command failed (exit $rc)"; tail -n 30 /t/src.log /t/tgt.log 2>/dev/null; }' EXIT
step() { echo "== $*"; }
fail() {
    echo "GUEST FAIL: $*"
    exit 1
}
[ -x /bin/drmesh ] || fail "no /bin/drmesh"
export TZ=UTC RUST_LOG=info

# Files the writer rewrites, 64 KiB each, each with a single write(2) of one tag.
F=40

step "setup: module, loopback, tmpfs, mounted ext4 on vda"
insmod /lib/modules/drmesh_trk.ko
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
mkdir -p /t /mnt/src /r
mount -t tmpfs -o size=300m tmpfs /t
mount -t ext4 /dev/vda /mnt/src
mkdir -p /mnt/src/w

# tag_file K: 64 KiB of the 16-byte line "%015d\n" of K, in /t/tag
tag_file() { yes "$(printf '%015d' "$1")" | head -c 65536 >/t/tag; }
# write_tag K: rewrites file K % F in place with one 64 KiB write of tag K
write_tag() {
    tag_file "$1"
    dd if=/t/tag of=/mnt/src/w/f$(($1 % F)) bs=65536 count=1 conv=notrunc 2>/dev/null
}
k=0
while [ $k -lt $F ]; do
    write_tag $k
    k=$((k + 1))
done
sync

step "two nodes on loopback"
node_id() { drmesh init --state-dir "/t/$1" --name "$1" | sed -n 's/^node id: //p'; }
src_id=$(node_id src)
tgt_id=$(node_id tgt)
cat >/t/topology.toml <<EOF
[mesh]
name = "guest"
version = 1

[[node]]
name = "src"
id = "$src_id"
addresses = ["127.0.0.1:7401"]
site = "lab"

[[node]]
name = "tgt"
id = "$tgt_id"
addresses = ["127.0.0.1:7402"]
site = "lab"

[[volume]]
name = "data"
source = "src"
kind = "kmod"
device = "/dev/vda"
cow_store = "/dev/vdb"
targets = ["tgt"]
policy = "p"

[[volume]]
name = "data-file"
source = "src"
kind = "file"
path = "/dev/vda"
targets = ["tgt"]
policy = "p"

[policy.p]
rpo = "24h"
block_size = "64KiB"
EOF
drmesh topology check /t/topology.toml
start_node() {
    drmesh run --state-dir "/t/$1" --topology /t/topology.toml >>"/t/$1.log" 2>&1 &
    eval "pid_$1=$!"
    n=0
    until [ -S "/t/$1/admin.sock" ]; do
        n=$((n + 1))
        [ $n -lt 600 ] || fail "node $1 did not start"
        sleep 0.1
    done
}
start_node tgt
start_node src

# JSON fields of a `ctl ... --json` answer (pretty-printed, one key a line)
num() { sed -n "s/.*\"$1\": \([0-9][0-9]*\).*/\1/p" "$2" | head -n 1; }
str() { sed -n "s/.*\"$1\": \"\(.*\)\",*$/\1/p" "$2" | head -n 1; }

step "the first cycle after attach reads everything"
# The scheduler starts each volume's first cycle on its own shortly after start.
n=0
until drmesh ctl --state-dir /t/src volumes --json >/t/vol.json 2>/dev/null &&
    grep -q '"read_plan": "everything (kmod): first cycle after attach"' /t/vol.json &&
    [ "$(grep -c '"read_plan"' /t/vol.json)" -ge 2 ]; do
    n=$((n + 1))
    [ $n -lt 400 ] || fail "no first cycle of both volumes: $(cat /t/vol.json)"
    kill -0 $pid_src && kill -0 $pid_tgt || fail "a node stopped"
    if [ $((n % 20)) -eq 0 ]; then
        drmesh ctl --state-dir /t/src volumes || true
        tail -n 3 /t/src.log
    fi
    sleep 1
done
grep '"read_plan"' /t/vol.json
first_read=$(sed -n '/"read_plan": "everything (kmod)/{n;p}' /t/vol.json | sed -n 's/.*"scanned_bytes": \([0-9]*\).*/\1/p')
echo "cycle data (first): read $first_read bytes; everything (kmod): first cycle after attach"
[ "$first_read" -gt 0 ] || fail "the first cycle read nothing"
drmesh ctl --state-dir /t/src agent-status
drmesh ctl --state-dir /t/src agent-status --json >/t/agent.json
grep -q '"attached": true' /t/agent.json || fail "agent-status does not show vda attached: $(cat /t/agent.json)"
[ "$(num bitmap_bytes /t/agent.json)" -gt 0 ] || fail "agent-status shows no bitmap size"

# sync NAME: a cycle of volume NAME now; its answer in /t/sync.json, its seq in $seq
sync_now() {
    drmesh ctl --state-dir /t/src sync-now "$1" --json >/t/sync.json || {
        cat /t/sync.json
        fail "sync-now $1 failed"
    }
    seq=$(num seq /t/sync.json)
    read_bytes=$(num scanned_bytes /t/sync.json)
    plan=$(str read_plan /t/sync.json)
    volume_bytes=$(num volume_bytes /t/sync.json)
    echo "cycle $1@$seq: read $read_bytes of $volume_bytes bytes; $plan"
}

step "cycles under write load"
writer() {
    k=$F
    while [ ! -e /t/stop ]; do
        write_tag $k
        k=$((k + 1))
    done
    echo $k >/t/writes
}
writer &
wpid=$!
cycle=0
while [ $cycle -lt 4 ]; do
    sleep 2
    sync_now data
    case "$plan" in
    "changed blocks (kmod):"*) ;;
    *) fail "an incremental cycle read: $plan" ;;
    esac
    [ "$read_bytes" -lt $((volume_bytes / 8)) ] || fail "an incremental cycle read $read_bytes of $volume_bytes bytes"
    kmod_read=$read_bytes
    kmod_plan=$plan
    cycle=$((cycle + 1))
done
sync_now data-file
file_read=$read_bytes
echo "bench: kmod incremental cycle read $kmod_read bytes ($kmod_plan); file full scan read $file_read bytes of the same $volume_bytes-byte disk; ratio $((file_read / (kmod_read + 1)))x"

step "a cycle whose target stops mid-cycle loses nothing"
# Rewrite a fresh region, then stop the target while the cycle runs; the
# next cycle must still carry those writes (checked by the final comparison).
kill -STOP $wpid
dd if=/dev/urandom of=/mnt/src/w/big bs=65536 count=64 2>/dev/null
sync
kill -CONT $wpid
drmesh ctl --state-dir /t/src sync-now data --json >/t/fail.json 2>&1 &
cpid=$!
sleep 0.5
kill $pid_tgt
wait $pid_tgt 2>/dev/null || true
wait $cpid 2>/dev/null || true
if grep -q '"ok": true' /t/fail.json; then
    echo "the cycle committed before the target stopped; the pending path is exercised by later cycles only"
else
    echo "cycle failed as expected: $(sed -n 's/.*"error": "\(.*\)".*/\1/p' /t/fail.json | head -c 200)"
fi
drmesh ctl --state-dir /t/src agent-status
start_node tgt

step "writer stops, the disk is unmounted, a last cycle"
touch /t/stop
wait $wpid
echo "writer did $(($(cat /t/writes) - F)) rewrites"
umount /mnt/src
# The restarted target may still be connecting: a few tries.
tries=0
until drmesh ctl --state-dir /t/src peers --json 2>/dev/null | grep -q '"state": "connected"'; do
    tries=$((tries + 1))
    [ $tries -lt 120 ] || fail "the restarted target did not reconnect"
    sleep 1
done
sync_now data
case "$plan" in
"changed blocks (kmod):"* | "everything (kmod):"*) ;;
*) fail "the last cycle read: $plan" ;;
esac
last=$seq

step "every RP restores, passes e2fsck and is a consistent cut of the writer"
# Every RP the target holds: the scheduler's own cycles (the first, retries) too.
drmesh ctl --state-dir /t/tgt rps data --json >/t/rps.json
seqs=$(sed -n 's/.*"seq": \([0-9][0-9]*\).*/\1/p' /t/rps.json | sort -n -u)
echo "RPs of data: $(echo $seqs)"
[ "$(echo $seqs | wc -w)" -ge 6 ] || fail "expected at least 6 RPs of data"
for s in $seqs; do
    rm -f /t/r.img
    drmesh restore "data@$s" --to /t/r.img --state-dir /t/tgt >/t/restore.log 2>&1 || {
        cat /t/restore.log
        fail "restore data@$s failed"
    }
    e2fsck -n -f /t/r.img >/t/fsck.log 2>&1 || {
        cat /t/fsck.log
        fail "e2fsck rejects data@$s"
    }
    mount -t ext4 -o ro,noload,loop /t/r.img /r
    # The newest tag K: every file f must hold K - ((K - f) mod F).
    K=0
    f=0
    while [ $f -lt $F ]; do
        lines=$(sort -u /r/w/f$f | wc -l)
        [ "$lines" -eq 1 ] || fail "data@$s: file f$f mixes $lines tags (torn write)"
        t=$(head -n 1 /r/w/f$f)
        t=$((1$t - 1000000000000000))
        eval "tag_$f=$t"
        [ $t -gt $K ] && K=$t
        f=$((f + 1))
    done
    f=0
    while [ $f -lt $F ]; do
        eval "t=\$tag_$f"
        want=$((K - (K - f) % F))
        [ "$t" -eq "$want" ] || fail "data@$s: file f$f holds write $t, but the instant of write $K implies $want"
        f=$((f + 1))
    done
    umount /r
    echo "data@$s: e2fsck clean, files are the cut after write $K"
    if [ "$s" -eq "$last" ]; then
        cmp /t/r.img /dev/vda || fail "the last RP data@$last differs from the quiet disk"
        echo "data@$last equals /dev/vda byte for byte"
        compared=yes
    fi
done
[ "${compared:-}" = yes ] || fail "the target does not list the last RP data@$last"

step "stop"
drmesh ctl --state-dir /t/src agent-status
kill $pid_src $pid_tgt
wait $pid_src 2>/dev/null || true
wait $pid_tgt 2>/dev/null || true
echo "replicate: PASS"
