#!/bin/sh
# Guest side of the change-tracking test, run as /guest-test by the initramfs
# that scripts/kmod-vm boots. Disks: /dev/vda carries an ext4 filesystem,
# /dev/vdb is blank. Exits non-zero at the first failed check.
. /guest-lib.sh

step "load"
insmod /lib/modules/drmesh_trk.ko
[ -c /dev/drmesh-ctl ] || fail "no /dev/drmesh-ctl"

step "bad arguments, double attach (on /dev/vdb)"
$ctl errors /dev/vdb

step "exact ranges on an idle raw device: write, write-zeroes, discard, FUA"
set -- $($ctl attach /dev/vdb)
vdb=$1 gran=$2
[ "$gran" = 4096 ] || fail "default granularity $gran, want 4096"
$ctl bitmap "$vdb" /tmp/b0 >/dev/null
: >/tmp/r1
# dd with O_DIRECT: 3 blocks at 400 KiB, 1 block at 1 MiB + 4 KiB, FUA writes at 2 MiB
dd if=/dev/urandom of=/dev/vdb bs=4096 seek=100 count=3 oflag=direct conv=fsync status=none
echo "409600 12288" >>/tmp/r1
dd if=/dev/urandom of=/dev/vdb bs=4096 seek=257 count=1 oflag=direct conv=fsync status=none
echo "1052672 4096" >>/tmp/r1
$ctl syncwrite /dev/vdb 2097152 20480
echo "2097152 20480" >>/tmp/r1
# a sub-block write sets the whole block's bit
dd if=/dev/urandom of=/dev/vdb bs=512 seek=8200 count=1 oflag=direct conv=fsync status=none
echo "4198400 512" >>/tmp/r1
$ctl zeroout /dev/vdb 8388608 1048576
echo "8388608 1048576" >>/tmp/r1
blkdiscard -o 16777216 -l 2097152 /dev/vdb
echo "16777216 2097152" >>/tmp/r1
$ctl bitmap "$vdb" /tmp/b1
$ctl check /tmp/b1 "$gran" /tmp/r1 exact
# the hand-over started a fresh bitmap: an idle device shows nothing new
$ctl bitmap "$vdb" /tmp/b2
$ctl check /tmp/b2 "$gran" /dev/null exact

step "hand-overs racing random writes: the union of the bitmaps covers every write"
# two writers (one per guest CPU) and a hand-over loop
$ctl randwrite /dev/vdb 2000 11 >/tmp/rr1 &
rw1=$!
$ctl randwrite /dev/vdb 2000 12 >/tmp/rr2 &
rw2=$!
n=0
while kill -0 $rw1 2>/dev/null || kill -0 $rw2 2>/dev/null; do
    n=$((n + 1))
    $ctl bitmap "$vdb" /tmp/h$n >/dev/null
done
wait $rw1
wait $rw2
n=$((n + 1))
$ctl bitmap "$vdb" /tmp/h$n >/dev/null
echo "$n hand-overs during the writes"
[ "$n" -ge 3 ] || fail "too few hand-overs ($n) to test the race"
$ctl or /tmp/hall /tmp/h*
cat /tmp/rr1 /tmp/rr2 >/tmp/rr
$ctl check /tmp/hall "$gran" /tmp/rr exact

step "granularity 64 KiB"
$ctl detach "$vdb"
set -- $($ctl attach /dev/vdb 65536)
[ "$2" = 65536 ] || fail "granularity $2, want 65536"
dd if=/dev/urandom of=/dev/vdb bs=4096 seek=17 count=1 oflag=direct conv=fsync status=none
$ctl bitmap "$vdb" /tmp/b3
echo "65536 65536" >/tmp/r3
$ctl check /tmp/b3 65536 /tmp/r3 exact
$ctl detach "$vdb"

step "mounted ext4 with live writes (on /dev/vda)"
mkdir -p /mnt/a
mount -t ext4 /dev/vda /mnt/a
dd if=/dev/zero of=/mnt/a/data bs=1M count=64 conv=fsync status=none
dd if=/dev/zero of=/mnt/a/trim bs=1M count=8 conv=fsync status=none
sync
# a background writer runs across attach, hand-overs and detach
writer() {
    i=0
    while :; do
        dd if=/dev/urandom of=/mnt/a/bg.$((i % 4)) bs=64k count=8 conv=fsync status=none
        i=$((i + 1))
    done
}
writer &
bg=$!
sleep 1
set -- $($ctl attach /dev/vda)
vda=$1 gran=$2
echo "attached $vda granularity $gran while mounted"
if rmmod drmesh_trk 2>/dev/null; then fail "rmmod succeeded while attached"; fi
echo "rmmod refused while attached"
$ctl bitmap "$vda" /tmp/m0
sleep 1
# the measured window is quiet apart from the filesystem's own journal and
# metadata writes, so the ratio says how much the bitmap over-reports
kill $bg
wait $bg 2>/dev/null || true
sync
$ctl bitmap "$vda" /tmp/m0 >/dev/null
: >/tmp/rm
dd if=/dev/urandom of=/mnt/a/data bs=4096 seek=100 count=3 conv=notrunc,fsync oflag=direct status=none
$ctl map /mnt/a/data 409600 12288 >>/tmp/rm
dd if=/dev/urandom of=/mnt/a/data bs=4096 seek=9000 count=17 conv=notrunc,fsync oflag=direct status=none
$ctl map /mnt/a/data $((9000 * 4096)) $((17 * 4096)) >>/tmp/rm
$ctl randwrite /mnt/a/data 400 7 >>/tmp/rm
$ctl bitmap "$vda" /tmp/m1
echo "random writes + dd on mounted ext4 (set/written includes journal and metadata):"
$ctl check /tmp/m1 "$gran" /tmp/rm

step "discard through fstrim on the mounted filesystem"
$ctl map /mnt/a/trim 0 8388608 >/tmp/rt
rm /mnt/a/trim
sync
$ctl bitmap "$vda" /tmp/m2 >/dev/null
fstrim /mnt/a
$ctl bitmap "$vda" /tmp/m3
echo "fstrim discards all free space; the removed file's blocks must be among it:"
$ctl check /tmp/m3 "$gran" /tmp/rt
$ctl status "$vda"

step "detach while writes go on, then unload"
writer &
bg=$!
sleep 1
$ctl detach "$vda"
kill $bg
wait $bg 2>/dev/null || true
umount /mnt/a 2>/dev/null || { sleep 2; umount /mnt/a; }
rmmod drmesh_trk
[ ! -e /dev/drmesh-ctl ] || fail "/dev/drmesh-ctl still there after rmmod"
echo "unloaded"

step "attach, hand-over, detach and unload in a loop under two writers"
insmod /lib/modules/drmesh_trk.ko
# The writers run until the loop is done, so every cycle meets writes in flight
# however fast this kernel writes compared with how fast it loads and unloads
# the module (a fixed number of writes gave 6.12 only two cycles).
rm -f /tmp/stop
loop_writer() { # loop_writer SEED: batches of random writes until /tmp/stop
    seed=$1
    until [ -e /tmp/stop ]; do
        $ctl randwrite /dev/vdb 200 "$seed" >/dev/null
        seed=$((seed + 2))
    done
}
loop_writer 21 &
rw1=$!
loop_writer 22 &
rw2=$!
loops=0
while [ $loops -lt 8 ]; do
    kill -0 $rw1 2>/dev/null && kill -0 $rw2 2>/dev/null || fail "a writer stopped"
    set -- $($ctl attach /dev/vdb)
    $ctl bitmap "$1" /tmp/l >/dev/null
    $ctl detach "$1"
    # wrapped writes may still be in flight: unload waits for them
    rmmod drmesh_trk
    insmod /lib/modules/drmesh_trk.ko
    loops=$((loops + 1))
done
touch /tmp/stop
wait $rw1
wait $rw2
echo "$loops attach/detach/unload cycles under two writers"
rmmod drmesh_trk

step "device removed while attached"
insmod /lib/modules/drmesh_trk.ko
set -- $($ctl attach /dev/vdb)
vdb=$1
pci=$(readlink -f /sys/block/vdb/device/..)
dd if=/dev/urandom of=/dev/vdb bs=4096 count=4 oflag=direct conv=fsync status=none
echo 1 >"$pci/remove"
sleep 1
[ ! -e /sys/block/vdb ] || fail "vdb still present after PCI remove"
$ctl status "$vdb" | tee /tmp/st
grep -q '^state=3 ' /tmp/st || fail "removal not reported (want state=3: attached, gone)"
$ctl bitmap "$vdb" /tmp/g1
echo "0 16384" >/tmp/rg
$ctl check /tmp/g1 4096 /tmp/rg exact
$ctl detach "$vdb"
rmmod drmesh_trk
echo "detached and unloaded after the device went away"
