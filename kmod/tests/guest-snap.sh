#!/bin/sh
# Guest side of the snapshot test, run as /guest-test by the initramfs that
# scripts/kmod-vm boots. Disks: /dev/vda carries an ext4 filesystem, /dev/vdb
# is blank. Small COW stores live in loop devices over tmpfs files. Exits
# non-zero at the first failed check.
. /guest-lib.sh

step "load"
insmod /lib/modules/drmesh_trk.ko
mkdir -p /cow
mount -t tmpfs -o size=160m tmpfs /cow
truncate -s 48M /cow/big
losetup /dev/loop0 /cow/big
# 1 MiB: header, a 64 KiB index (vdb has 16384 chunks) and about 240 chunks
truncate -s 1M /cow/small
losetup /dev/loop1 /cow/small

step "snapshot bad arguments, double snapshot, detach/attach refused, release"
$ctl snaperrors /dev/vdb /dev/loop0

step "snapshots under two random writers: content at the instant, bitmaps cover the writes"
# The region the writers use starts as zeros (earlier runs may have left data).
$ctl zeroout /dev/vdb 0 8388608
set -- $($ctl attach /dev/vdb)
vdb=$1 gran=$2
rm -f /tmp/wlog1 /tmp/wlog2
prev_t0=0 prev_t1=0
# the region as it was at attach: zeros
$ctl tags /dev/vdb 0 2048 /tmp/tags0
for k in 1 2 3 4; do
    rm -f /tmp/stop
    $ctl logwrite /dev/vdb 0 2048 100000 $((k * 10 + 1)) /tmp/wlog1 /tmp/stop &
    w1=$!
    $ctl logwrite /dev/vdb 0 2048 100000 $((k * 10 + 2)) /tmp/wlog2 /tmp/stop &
    w2=$!
    sleep 1
    set -- $($ctl snapshot "$vdb" /dev/loop0 /tmp/sb$k)
    snap=$1 t0=$2 t1=$3
    echo "snapshot $k: $*"
    # read all of it while the writers run: reads race with the copies
    $ctl readat "$snap" 0 67108864 || fail "reading $snap under writes"
    sleep 1
    touch /tmp/stop
    wait $w1
    wait $w2
    # (a) (output to a file, not a pipe: a pipe's status is the last command's)
    $ctl verify "$snap" "$t0" "$t1" 0 2048 /tmp/wlog1 /tmp/wlog2 >/tmp/v ||
        { tail -n 20 /tmp/v; fail "snapshot $k differs from the disk at its instant"; }
    tail -n 1 /tmp/v
    over=$(val overwritten_after_snapshot "$(tail -n 1 /tmp/v)")
    [ "$over" -gt 0 ] || fail "no block was overwritten after snapshot $k: nothing tested"
    # (b) what the block-reader relies on: every block that differs between
    # snapshot k-1 and snapshot k is set in the bitmap handed over with k
    $ctl tags "$snap" 0 2048 /tmp/tags$k
    $ctl changed /tmp/tags$((k - 1)) /tmp/tags$k /tmp/sb$k "$gran" 0
    # and bitmap k holds every write between snapshot k-1 and snapshot k; a
    # write across the instant of k-1 is in bitmap k-1 or k
    $ctl covers /tmp/sb$k "$gran" "$prev_t1" "$t0" /tmp/wlog1 /tmp/wlog2
    if [ $k -gt 1 ]; then
        $ctl or /tmp/sbu /tmp/sb$((k - 1)) /tmp/sb$k
        $ctl covers /tmp/sbu "$gran" "$prev_t0" "$t0" /tmp/wlog1 /tmp/wlog2
    fi
    $ctl status "$vdb"
    $ctl cowhdr /dev/loop0
    if rmmod drmesh_trk 2>/dev/null; then fail "rmmod succeeded with a snapshot"; fi
    $ctl release "$vdb"
    [ ! -e "$snap" ] || fail "$snap still there after release"
    prev_t0=$t0 prev_t1=$t1
done
$ctl cowhdr /dev/loop0 | grep -q '^format=1 state=3 ' || fail "store not marked released"

step "snapshot and release in a loop under two writers"
# As in the unload loop below: a fixed count of cycles under writers that
# outlast them, so a slow emulated machine cannot leave too few.
$ctl randwrite /dev/vdb 200000 31 >/dev/null &
rw1=$!
$ctl randwrite /dev/vdb 200000 32 >/dev/null &
rw2=$!
loops=0
while [ "$loops" -lt 8 ]; do
    { kill -0 $rw1 && kill -0 $rw2; } 2>/dev/null || fail "a writer stopped during the cycles"
    set -- $($ctl snapshot "$vdb" /dev/loop0 /tmp/sl)
    $ctl readat "$1" 0 1048576 || fail "reading $1"
    # a reader still busy when the snapshot is released gets errors, no more
    $ctl readat "$1" 0 67108864 >/dev/null 2>&1 &
    rd=$!
    $ctl release "$vdb"
    wait $rd || true
    loops=$((loops + 1))
done
kill $rw1 $rw2
wait $rw1 || true
wait $rw2 || true
echo "$loops snapshot/release cycles under load"

step "COW store full: snapshot invalid, reads fail, every bit dirty"
set -- $($ctl snapshot "$vdb" /dev/loop1 /tmp/sf)
snap=$1
echo "snapshot: $*"
# 4 MiB of first writes: 1024 chunks, more than the store's ~240
dd if=/dev/urandom of=/dev/vdb bs=1M seek=16 count=4 oflag=direct conv=fsync status=none \
    || fail "writes failed while the store filled"
$ctl status "$vdb" >/tmp/st
cat /tmp/st
st=$(val state "$(cat /tmp/st)")
[ $((st & 12)) -eq 12 ] || fail "state $st: want snapshot (4) and invalid (8)"
[ "$(val snap_error "$(cat /tmp/st)")" = 28 ] || fail "snap_error, want ENOSPC (28)"
out=$($ctl readat "$snap" 0 4096) && fail "read of an invalid snapshot succeeded"
echo "read of the invalid snapshot: $out"
[ "$out" = "Input/output error" ] || fail "want EIO, got $out"
$ctl cowhdr /dev/loop1 | grep -q '^format=1 state=2 ' || fail "store not marked invalid"
# the next cycle rescans everything
$ctl bitmap "$vdb" /tmp/sfull >/tmp/bf
cat /tmp/bf
[ "$(val bits_set "$(cat /tmp/bf)")" = 16384 ] || fail "not every bit set after the store filled"
$ctl release "$vdb"
$ctl detach "$vdb"

step "attach, snapshot, release, detach and unload in a loop under two writers"
# Writers that outlast the loop and are stopped after it: every cycle runs
# under load, and how many cycles run does not depend on the machine's
# speed (writers of 3,000 writes each left time for 2 cycles under a slow TCG).
$ctl randwrite /dev/vdb 200000 41 >/dev/null &
rw1=$!
$ctl randwrite /dev/vdb 200000 42 >/dev/null &
rw2=$!
loops=0
while [ "$loops" -lt 4 ]; do
    { kill -0 $rw1 && kill -0 $rw2; } 2>/dev/null || fail "a writer stopped during the cycles"
    set -- $($ctl attach /dev/vdb)
    $ctl snapshot "$1" /dev/loop0 /tmp/su >/dev/null
    # writes held for copies are still queued: release sends them on
    $ctl release "$1"
    $ctl detach "$1"
    # and unload waits for them
    rmmod drmesh_trk
    insmod /lib/modules/drmesh_trk.ko
    loops=$((loops + 1))
done
kill $rw1 $rw2
wait $rw1 || true
wait $rw2 || true
echo "$loops attach/snapshot/release/detach/unload cycles under load"

step "snapshot of the mounted ext4 disk under live writes; e2fsck -n on it"
mkdir -p /mnt/a
mount -t ext4 /dev/vda /mnt/a
for i in 0 1 2 3; do
    dd if=/dev/urandom of=/mnt/a/bg.$i bs=64k count=8 conv=fsync status=none
done
mkdir -p /mnt/a/tree
# rewrites four files in place (bounded copies) and churns small files and
# directories (journal and metadata)
writer() {
    i=0
    while :; do
        dd if=/dev/urandom of=/mnt/a/bg.$((i % 4)) bs=64k count=8 conv=notrunc,fsync status=none
        mkdir -p /mnt/a/tree/d$((i % 7))
        echo "$i" >/mnt/a/tree/d$((i % 7))/f$((i % 13))
        rm -f /mnt/a/tree/d$(((i + 3) % 7))/f$(((i + 5) % 13))
        i=$((i + 1))
    done
}
writer &
bg=$!
set -- $($ctl attach /dev/vda)
vda=$1
sleep 1
for k in 1 2 3; do
    set -- $($ctl snapshot "$vda" /dev/vdb /tmp/se$k)
    snap=$1
    echo "snapshot $k of the mounted fs: $*"
    sleep 1
    /bin/e2fsck -n -f "$snap" || fail "e2fsck -n on snapshot $k of the mounted fs"
    $ctl status "$vda"
    $ctl release "$vda"
done
kill $bg
wait $bg 2>/dev/null || true
umount /mnt/a 2>/dev/null || { sleep 2; umount /mnt/a; }
$ctl detach "$vda"

step "device removed while a snapshot lives"
set -- $($ctl attach /dev/vdb)
vdb=$1
set -- $($ctl snapshot "$vdb" /dev/loop0 /tmp/sg)
snap=$1
# chunk 0 is copied by this write; chunk 100 never is
dd if=/dev/urandom of=/dev/vdb bs=4096 count=1 oflag=direct conv=fsync status=none
pci=$(readlink -f /sys/block/vdb/device/..)
echo 1 >"$pci/remove"
sleep 1
[ ! -e /sys/block/vdb ] || fail "vdb still present after PCI remove"
$ctl status "$vdb" >/tmp/st
cat /tmp/st
st=$(val state "$(cat /tmp/st)")
[ $((st & 7)) -eq 7 ] || fail "state $st: want attached, gone, snapshot"
$ctl readat "$snap" 0 4096 || fail "copied chunk unreadable after the origin went away"
out=$($ctl readat "$snap" 409600 4096) && fail "read of the gone origin succeeded"
echo "read of a chunk only the gone origin held: $out"
$ctl release "$vdb"
$ctl detach "$vdb"
rmmod drmesh_trk
[ ! -e /dev/drmesh-ctl ] || fail "/dev/drmesh-ctl still there after rmmod"
echo "released, detached and unloaded after the device went away"
