#!/bin/sh
# Guest side of the end-to-end test of the `kmod` source kind, run as /guest-test
# by scripts/kmod-vm for kmod/tests/host-replicate.sh, with /bin/drmesh
# (DRMESH_KMOD_VM_FILES) and /data (DRMESH_KMOD_VM_DATA): the state folder of
# node "src", the topology, and the mode ("test" or "bench").
#
# Node "src" runs here, the source of volume "data" (kind kmod: /dev/vda, the
# mounted ext4 disk, COW store /dev/vdb), of volume "data-file" (kind file,
# the same disk, for the bytes-read comparison) and of volume "data-lvm" (kind
# file: a mounted ext4 logical volume on /dev/vdd, read from an LVM snapshot);
# node "tgt" runs on the host and keeps the recovery points; src dials it at
# 10.0.2.2 through qemu's NAT.
#
# test: a writer rewrites files in place while cycles run. Checks here:
# - the first cycle after attach reads everything, later ones only changed blocks;
# - a cycle that fails (the host stops the target mid-cycle, on request) loses
#   nothing: its changes stay pending and the next cycle sends them;
# - `drmesh ctl agent-status` shows the attached device;
# - the RPs' consistency labels: `fs-frozen` for snapshots of the mounted disk,
#   `crash` once it is unmounted, `inconsistent` for the live read of kind file;
# - data-lvm's cycles under a writer of their own read LVM snapshots
#   (`fs-frozen`, their ext4's free space skipped), which are gone after
#   each cycle; a snapshot a killed node
#   left is removed, a look-alike logical volume of its name is not (that
#   cycle reads live, `inconsistent`, and says why).
# After the writer stopped and the disk was unmounted, a last cycle; the guest
# reports ("HOST-CHECK:") the writer's file count, the last RP and the quiet
# disk's sha256, and the host checks every RP against them (a consistent cut
# of the writer's sequence; the last RP equal to the disk).
# Prints "bench:" lines with bytes read by kmod cycles and by a file full scan.
#
# bench: on a large vda, after the first cycles, rewrites about 1% of the disk
# spread over files, then one kmod cycle and one file full scan; prints
# "bench:" lines with bytes read and durations.
. /guest-lib.sh
guest_logs=/t/src.log
[ -x /bin/drmesh ] || fail "no /bin/drmesh"
[ -f /data/topology.toml ] && [ -d /data/src ] || fail "no /data from the host (run kmod/tests/host-replicate.sh)"
mode=$(cat /data/mode)
export TZ=UTC RUST_LOG=info

# test: files the writer rewrites, 64 KiB each, each with a single write(2) of one tag.
F=40
# bench: files rewritten between the cycles, 256 KiB each (40 MiB).
B=160

step "setup: module, tmpfs, mounted ext4 on vda ($(($(blockdev --getsize64 /dev/vda) >> 20)) MiB)"
insmod /lib/modules/drmesh_trk.ko
ip addr show eth0 | grep -q 'inet 10.0.2.15/' || fail "eth0 has no 10.0.2.15 (DRMESH_KMOD_VM_NET=user?)"
mkdir -p /t /mnt/src
mount -t tmpfs -o size=300m tmpfs /t
# noinit_itable: mkfs on the host left the inode tables to be zeroed lazily;
# that background writer would otherwise show up in the cycles' changed blocks.
mount -t ext4 -o noinit_itable /dev/vda /mnt/src
mkdir -p /mnt/src/w
# data-lvm: a logical volume on vdd, mounted. No udev here: lvm makes the
# device nodes itself; no dmeventd either.
mkdir -p /run/lock /etc/lvm /mnt/lv
printf 'activation {\n udev_sync = 0\n udev_rules = 0\n monitoring = 0\n}\n' >/etc/lvm/lvm.conf
export LVM_SUPPRESS_FD_WARNINGS=1
lvm pvcreate -q /dev/vdd && lvm vgcreate -q vgd /dev/vdd && lvm lvcreate -q -n lvd -L 64M vgd || fail "cannot make the logical volume"
mkfs.ext4 -q /dev/vgd/lvd && mount -t ext4 /dev/vgd/lvd /mnt/lv || fail "cannot make or mount ext4 on the logical volume"
mkdir -p /mnt/lv/w

# tag_file K FILE: 64 KiB of the 16-byte line "%015d\n" of K, in FILE
tag_file() { yes "$(printf '%015d' "$1")" | head -c 65536 >"$2"; }
# write_tag K [DIR]: rewrites file K % F of DIR (default /mnt/src/w) in place
# with one 64 KiB write of tag K
write_tag() {
    local dir=${2:-/mnt/src/w} tag=/t/tag${2:+-lv}
    tag_file "$1" "$tag"
    dd if="$tag" of="$dir/f$(($1 % F))" bs=65536 count=1 conv=notrunc 2>/dev/null
}
k=0
while [ $k -lt $F ]; do
    write_tag $k
    write_tag $k /mnt/lv/w
    k=$((k + 1))
done
if [ "$mode" = bench ]; then
    mkdir -p /mnt/src/b
    i=0
    while [ $i -lt $B ]; do
        dd if=/dev/urandom of=/mnt/src/b/b$i bs=65536 count=4 2>/dev/null
        i=$((i + 1))
    done
fi
sync

step "node src here, node tgt on the host (10.0.2.2)"
cp -a /data/src /t/src
cp /data/topology.toml /t/topology.toml
drmesh run --state-dir /t/src --topology /t/topology.toml >>/t/src.log 2>&1 &
pid_src=$!
n=0
until [ -S /t/src/admin.sock ]; do
    n=$((n + 1))
    [ $n -lt 600 ] || fail "node src did not start"
    sleep 0.1
done


step "the first cycle after attach reads everything"
# The scheduler starts each volume's first cycle on its own shortly after start.
# All read the whole disk: minutes for the benchmark's large one under TCG.
first_wait_secs=500
[ "$mode" = bench ] && first_wait_secs=3000
n=0
until drmesh ctl --state-dir /t/src volumes --json >/t/vol.json 2>/dev/null &&
    grep -q '"read_plan": "everything (kmod): first cycle after attach"' /t/vol.json &&
    [ "$(grep -c '"read_plan"' /t/vol.json)" -ge 3 ]; do
    n=$((n + 1))
    [ $n -lt $first_wait_secs ] || fail "no first cycle of every volume: $(cat /t/vol.json)"
    kill -0 $pid_src || fail "node src stopped"
    if [ $((n % 20)) -eq 0 ]; then
        drmesh ctl --state-dir /t/src volumes || true
        drmesh ctl --state-dir /t/src peers || true
        tail -n 3 /t/src.log
    fi
    sleep 1
done
grep '"read_plan"' /t/vol.json
first_read=$(sed -n '/"read_plan": "everything (kmod)/{n;p}' /t/vol.json | sed -n 's/.*"scanned_bytes": \([0-9]*\).*/\1/p')
echo "cycle data (first): read $first_read bytes; everything (kmod): first cycle after attach"
[ "$first_read" -gt 0 ] || fail "the first cycle read nothing"
drmesh ctl --state-dir /t/src peers
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
    secs=$(num duration_secs /t/sync.json)
    consistency=$(str consistency /t/sync.json)
    echo "cycle $1@$seq: read $read_bytes of $volume_bytes bytes in $secs s; $plan; $consistency ($(str view /t/sync.json)); free space $(str free_space /t/sync.json)"
}

# rewrite_bench: rewrites the B files in place with fresh random data
rewrite_bench() {
    t0=$(now)
    i=0
    while [ $i -lt $B ]; do
        dd if=/dev/urandom of=/mnt/src/b/b$i bs=65536 count=4 conv=notrunc 2>/dev/null
        i=$((i + 1))
    done
    sync
    echo "rewrote $((B * 256)) KiB in $(elapsed $t0) s"
}
# bench_cycle NAME: a cycle of NAME; "bench:" line with what it read and sent
bench_cycle() {
    sync_now "$1"
    sent=$(num sent_payload_bytes /t/sync.json)
    echo "bench: $2: $1 read $read_bytes bytes, sent $sent, in $secs s ($plan)"
}

if [ "$mode" = bench ]; then
    disk_bytes=$(blockdev --getsize64 /dev/vda)
    echo "bench: $disk_bytes-byte disk; each round rewrites $((B * 262144)) bytes in $B files ($(awk -v a=$((B * 262144)) -v b="$disk_bytes" 'BEGIN { printf "%.2f", 100 * a / b }')%)"
    # The volume that goes first sends the new blocks, the second finds them
    # at the target already (same content ids): two rounds, each volume first
    # once, so each duration is seen with and without the sending.
    step "bench round 1: rewrite, a kmod cycle, then a file full scan"
    rewrite_bench
    bench_cycle data "round 1 (first)"
    case "$plan" in
    "changed blocks (kmod):"*) ;;
    *) fail "the incremental cycle read: $plan" ;;
    esac
    bench_cycle data-file "round 1 (second)"
    step "bench round 2: rewrite, a file full scan, then a kmod cycle"
    rewrite_bench
    bench_cycle data-file "round 2 (first)"
    bench_cycle data "round 2 (second)"
    case "$plan" in
    "changed blocks (kmod):"*) ;;
    *) fail "the incremental cycle read: $plan" ;;
    esac
    kill $pid_src
    wait $pid_src 2>/dev/null || true
    echo "replicate bench: done"
    exit 0
fi

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
    # The module froze the mounted ext4 while it took the snapshot.
    [ "$consistency" = fs-frozen ] || fail "a snapshot of the mounted disk is labelled $consistency"
    kmod_read=$read_bytes
    kmod_plan=$plan
    cycle=$((cycle + 1))
done
sync_now data-file
file_read=$read_bytes
# A block device read live, while the writer runs.
[ "$consistency" = inconsistent ] || fail "a live read of /dev/vda is labelled $consistency"

step "a logical volume under write load: each cycle reads an LVM snapshot"
lv_writer() {
    k=$F
    while [ ! -e /t/stop-lv ]; do
        write_tag $k /mnt/lv/w
        k=$((k + 1))
    done
    echo $k >/t/writes-lv
}
lv_writer &
lvpid=$!
# As if a node had been killed mid-cycle: its snapshot is still there.
lvm lvcreate -q -s -n drmesh-data-lvm-tgt -L 8M vgd/lvd || fail "cannot make the stale snapshot"
cycle=0
while [ $cycle -lt 2 ]; do
    sleep 1
    sync_now data-lvm
    [ "$consistency" = fs-frozen ] || fail "an LVM snapshot of the mounted logical volume is labelled $consistency"
    # Freezing flushed the journal: the snapshot's free space is not read
    # (the host's e2fsck and file checks of every RP prove nothing used was lost).
    case "$(str free_space /t/sync.json)" in
    "skipped: ext4 on the whole disk"*) ;;
    *) fail "data-lvm's free space: $(str free_space /t/sync.json)" ;;
    esac
    case "$(str view /t/sync.json)" in
    "LVM snapshot vgd/drmesh-data-lvm-tgt of vgd/lvd, its ext4 filesystem (mounted at /mnt/lv) frozen at the instant") ;;
    *) fail "data-lvm's view: $(str view /t/sync.json)" ;;
    esac
    lvs_now=$(lvm lvs --noheadings -o lv_name vgd | tr -d ' ' | tr '\n' ' ')
    [ "$lvs_now" = "lvd " ] || fail "the snapshot is left after the cycle: $lvs_now"
    cycle=$((cycle + 1))
done
touch /t/stop-lv
wait $lvpid
echo "lv writer did $(($(cat /t/writes-lv) - F)) rewrites"
grep -q "removing a snapshot an earlier run left behind" /t/src.log || fail "the stale snapshot was not said to be removed"
# A logical volume of the snapshot's name that is not a snapshot of lvd is
# never touched: the cycle reads live and says why.
sync
umount /mnt/lv
lvm lvcreate -q -n drmesh-data-lvm-tgt -L 8M vgd || fail "cannot make the look-alike logical volume"
sync_now data-lvm
[ "$consistency" = inconsistent ] || fail "a cycle next to a look-alike logical volume is labelled $consistency"
case "$(str view /t/sync.json)" in
*"a logical volume vgd/drmesh-data-lvm-tgt exists and is not drmesh's snapshot of vgd/lvd"*) ;;
*) fail "data-lvm's view next to the look-alike: $(str view /t/sync.json)" ;;
esac
lvm lvs vgd/drmesh-data-lvm-tgt >/dev/null || fail "the look-alike logical volume was removed"
echo "HOST-CHECK: lvm-last-rp $seq"
echo "bench: kmod incremental cycle read $kmod_read bytes ($kmod_plan); file full scan read $file_read bytes of the same $volume_bytes-byte disk; ratio $((file_read / (kmod_read + 1)))x"

step "a cycle whose target stops mid-cycle loses nothing"
# Rewrite a fresh region, then have the host stop the target while the cycle
# runs; the next cycle must still carry those writes (the host's check of the
# last RP against the quiet disk).
kill -STOP $wpid
dd if=/dev/urandom of=/mnt/src/w/big bs=65536 count=64 2>/dev/null
sync
kill -CONT $wpid
drmesh ctl --state-dir /t/src sync-now data --json >/t/fail.json 2>&1 &
cpid=$!
sleep 0.5
echo "HOST-ACTION: stop-target"
wait $cpid 2>/dev/null || true
if grep -q '"ok": true' /t/fail.json; then
    echo "the cycle committed before the target stopped; the pending path is exercised by later cycles only"
else
    echo "cycle failed as expected: $(sed -n 's/.*"error": "\(.*\)".*/\1/p' /t/fail.json | head -c 200)"
fi
drmesh ctl --state-dir /t/src agent-status
echo "HOST-ACTION: start-target"

step "writer stops, the disk is unmounted, a last cycle"
touch /t/stop
wait $wpid
echo "writer did $(($(cat /t/writes) - F)) rewrites"
umount /mnt/src
# The guest dials the restarted target again: a few tries.
tries=0
until drmesh ctl --state-dir /t/src peers --json 2>/dev/null | grep -q '"state": "connected"'; do
    tries=$((tries + 1))
    [ $tries -lt 120 ] || fail "src did not reconnect to the restarted target"
    sleep 1
done
sync_now data
case "$plan" in
"changed blocks (kmod):"* | "everything (kmod):"*) ;;
*) fail "the last cycle read: $plan" ;;
esac
# Nothing mounted on the device: nothing to freeze.
[ "$consistency" = crash ] || fail "a snapshot of the unmounted disk is labelled $consistency"
echo "HOST-CHECK: files $F"
echo "HOST-CHECK: last-rp $seq"
echo "HOST-CHECK: vda-sha256 $(sha256sum /dev/vda | cut -d' ' -f1)"

step "stop"
drmesh ctl --state-dir /t/src agent-status
kill $pid_src
wait $pid_src 2>/dev/null || true
echo "replicate: guest side done"
