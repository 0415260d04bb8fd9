#!/bin/sh
# Guest side of the end-to-end reboot test of the `kmod` source kind, run as
# /guest-test in two boots of the same disks by scripts/kmod-vm
# (DRMESH_KMOD_VM_BOOTS=2, /bin/drmesh in DRMESH_KMOD_VM_FILES).
#
# Two drmesh nodes in the guest on loopback: "src" is the source of volume
# "data" (kind kmod: /dev/vda, the mounted ext4 disk; COW store /dev/vdb;
# state store /dev/vdc), "tgt" keeps the recovery points. The nodes' state
# directories ride from boot to boot in a tar archive on /dev/vdd.
#
#   boot 1: the first cycle reads everything, a second one only changes;
#           files change after it; the nodes stop; clean power-off.
#   boot 2: `drmesh agent attach` before the mount restores the tracking; the
#           first cycle after the reboot reads only changed blocks; the last
#           RP restores, passes e2fsck and equals the disk byte for byte.
. /guest-lib.sh
guest_logs="/t/src.log /t/tgt.log"
[ -x /bin/drmesh ] || fail "no /bin/drmesh"
export TZ=UTC RUST_LOG=info
boot=$(sed -n 's/.*drmesh\.boot=\([0-9]*\).*/\1/p' /proc/cmdline)
# Files rewritten between cycles, 64 KiB each.
F=24

step "boot $boot: module, loopback, tmpfs"
insmod /lib/modules/drmesh_trk.ko
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
mkdir -p /t /mnt/src /r
mount -t tmpfs -o size=300m tmpfs /t

# write_files TAG: rewrites every file in place with 64 KiB of TAG lines
write_files() {
    yes "$(printf '%015d' "$1")" | head -c 65536 >/t/tag
    f=0
    while [ $f -lt $F ]; do
        dd if=/t/tag of=/mnt/src/w/f$f bs=65536 count=1 conv=notrunc 2>/dev/null
        f=$((f + 1))
    done
    sync
}
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
stop_nodes() {
    kill $pid_src $pid_tgt
    wait $pid_src 2>/dev/null || true
    wait $pid_tgt 2>/dev/null || true
}
# sync_now: a cycle of "data" now; sets seq, read_bytes, plan, volume_bytes
sync_now() {
    drmesh ctl --state-dir /t/src sync-now data --json >/t/sync.json || {
        cat /t/sync.json
        fail "sync-now data failed"
    }
    seq=$(num seq /t/sync.json)
    read_bytes=$(num scanned_bytes /t/sync.json)
    plan=$(str read_plan /t/sync.json)
    volume_bytes=$(num volume_bytes /t/sync.json)
    echo "cycle data@$seq: read $read_bytes of $volume_bytes bytes; $plan"
}

case $boot in
1)
    mount -t ext4 /dev/vda /mnt/src
    mkdir -p /mnt/src/w
    write_files 1
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
state_store = "/dev/vdc"
targets = ["tgt"]
policy = "p"

[policy.p]
rpo = "24h"
block_size = "64KiB"
EOF
    drmesh topology check /t/topology.toml
    start_node tgt
    start_node src

    step "the first cycle after attach reads everything"
    n=0
    until drmesh ctl --state-dir /t/src volumes --json >/t/vol.json 2>/dev/null &&
        grep -q '"read_plan": "everything (kmod): first cycle after attach"' /t/vol.json; do
        n=$((n + 1))
        [ $n -lt 400 ] || fail "no first cycle: $(cat /t/vol.json)"
        kill -0 $pid_src && kill -0 $pid_tgt || fail "a node stopped"
        sleep 1
    done
    first=$(sed -n '/"read_plan": "everything (kmod)/{n;p}' /t/vol.json | sed -n 's/.*"scanned_bytes": \([0-9]*\).*/\1/p')
    echo "$first" >/t/first_read
    echo "boot 1, first cycle: read $first bytes"
    drmesh ctl --state-dir /t/src agent-status

    step "an incremental cycle"
    write_files 2
    sync_now
    case "$plan" in "changed blocks (kmod):"*) ;; *) fail "the second cycle read: $plan" ;; esac

    step "files change after the last cycle; the nodes stop; clean power-off"
    write_files 3
    stop_nodes
    umount /mnt/src
    rm -f /t/src/admin.sock /t/tgt/admin.sock
    # The archive's size in the first 4 KiB, the archive after it (reading
    # the whole 4 GiB disk back under emulation would take minutes).
    (cd /t && tar cf /t/state.tar src tgt topology.toml first_read)
    printf '%s\n' "$(wc -c </t/state.tar)" | dd of=/dev/vdd bs=4096 conv=sync 2>/dev/null
    dd if=/t/state.tar of=/dev/vdd bs=4096 seek=1 conv=sync 2>/dev/null
    sync
    echo "KMOD-BOOT-OK"
    ;;
2)
    step "the node state comes back; attach before the mount"
    size=$(head -n 1 /dev/vdd)
    dd if=/dev/vdd bs=4096 skip=1 count=$(((size + 4095) / 4096)) 2>/dev/null | (cd /t && tar xf -)
    drmesh agent attach --state-dir /t/src --topology /t/topology.toml | tee /t/attach.out
    grep -q "tracking restored from /dev/vdc (clean shutdown)" /t/attach.out || fail "tracking not restored: $(cat /t/attach.out)"
    mount -t ext4 /dev/vda /mnt/src
    write_files 4
    start_node tgt
    start_node src
    drmesh agent status --state-dir /t/src

    step "the first cycle after the reboot reads only changed blocks"
    tries=0
    until drmesh ctl --state-dir /t/src peers --json 2>/dev/null | grep -q '"state": "connected"'; do
        tries=$((tries + 1))
        [ $tries -lt 120 ] || fail "the nodes did not connect"
        sleep 1
    done
    sync_now
    case "$plan" in "changed blocks (kmod):"*) ;; *) fail "the first cycle after the reboot read: $plan" ;; esac
    [ "$read_bytes" -lt $((volume_bytes / 8)) ] || fail "the first cycle after the reboot read $read_bytes of $volume_bytes bytes"
    first=$(cat /t/first_read)
    echo "reboot: first cycle after the reboot read $read_bytes bytes ($plan); the first cycle after attach read $first bytes; ratio $((first / (read_bytes + 1)))x"

    step "the last RP equals the disk"
    umount /mnt/src
    sync_now
    last=$seq
    drmesh restore "data@$last" --to /t/r.img --state-dir /t/tgt >/t/restore.log 2>&1 || {
        cat /t/restore.log
        fail "restore data@$last failed"
    }
    e2fsck -n -f /t/r.img >/t/fsck.log 2>&1 || {
        cat /t/fsck.log
        fail "e2fsck rejects data@$last"
    }
    cmp /t/r.img /dev/vda || fail "the RP data@$last differs from the disk"
    mount -t ext4 -o ro,noload,loop /t/r.img /r
    [ "$(sort -u /r/w/f0 | wc -l)" -eq 1 ] && [ "$(head -n 1 /r/w/f0)" = "$(printf '%015d' 4)" ] ||
        fail "data@$last does not hold the last writes"
    umount /r
    echo "reboot: data@$last restores, e2fsck clean, equals /dev/vda byte for byte"
    stop_nodes
    ;;
*)
    fail "no drmesh.boot=N on the kernel command line"
    ;;
esac
