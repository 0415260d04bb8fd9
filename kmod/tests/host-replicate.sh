#!/usr/bin/env bash
# End-to-end test of the `kmod` source kind across a network: a drmesh node in
# a qemu guest ("src", run by kmod/tests/guest-replicate.sh) replicates its
# tracked, mounted ext4 disk to a drmesh node on this host ("tgt"), over qemu's
# user-mode network (the guest dials 10.0.2.2, which qemu's NAT maps to the
# host's loopback, where tgt listens).
#
#   kmod/tests/host-replicate.sh DRMESH_BINARY           # the test (as root)
#   kmod/tests/host-replicate.sh DRMESH_BINARY --bench   # the 4 GiB benchmark
#
# The host makes both node identities and the topology: src has no
# `addresses` (it is behind the NAT, so it dials out and the connection carries
# both ways); tgt is written as 10.0.2.2:PORT, the address the guest sees, and
# listens on 127.0.0.1:PORT. src's state folder and the topology reach the
# guest as /data (DRMESH_KMOD_VM_DATA).
#
# The test: the guest runs the cycles and asks for the target to be stopped
# mid-cycle and started again ("HOST-ACTION:" console lines, acted on here);
# then, on the host, every RP of volumes "data" (kmod snapshots) and
# "data-lvm" (LVM snapshots) restores (restore checks the Merkle root),
# `e2fsck -n -f` accepts it, and its files (read with debugfs) are a
# consistent cut of the guest writer's sequence; data's last RP's sha256
# equals the guest's quiet disk ("HOST-CHECK:" lines).
#
# --bench: vda is a 4 GiB ext4 disk; the guest rewrites about 1% of it (40 MiB
# in 160 files) between cycles and prints "bench:" lines (bytes read and
# duration of the incremental `kmod` cycle and of the `file` full scan of the
# same disk). Asserts nothing about the figures.
#
# Prints "host-replicate: PASS" and exits 0 on success. Environment: what
# scripts/kmod-vm takes (DRMESH_KMOD_KERNEL, DRMESH_KMOD_CACHE, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] && [ -x "$1" ] || { echo "usage: $0 DRMESH_BINARY [--bench]" >&2; exit 2; }
drmesh=$(realpath "$1")
mode=test
case ${2:-} in
"") ;;
--bench) mode=bench ;;
*) echo "host-replicate: unknown option '$2'" >&2; exit 2 ;;
esac
fail() {
    echo "HOST FAIL: $*" >&2
    exit 1
}

w=$(mktemp -d "${TMPDIR:-/tmp}/drmesh-host-replicate.XXXXXX")
tgt_pid=
cleanup() {
    if [ -n "$tgt_pid" ]; then
        kill "$tgt_pid" 2>/dev/null || true
        wait "$tgt_pid" 2>/dev/null || true
    fi
    rm -rf "$w"
}
trap cleanup EXIT

# The guest's copy, stripped: the initramfs holds it in the guest's memory.
mkdir -p "$w/bin" "$w/guest"
strip -o "$w/bin/drmesh" "$drmesh" 2>/dev/null || cp "$drmesh" "$w/bin/drmesh"

node_id() { "$drmesh" init --state-dir "$1" --name "$2" | sed -n 's/^node id: //p'; }
src_id=$(node_id "$w/guest/src" src)
tgt_id=$(node_id "$w/tgt" tgt)

# A UDP port free on the host's loopback (tgt binds it; the guest dials it).
port=
for _ in $(seq 50); do
    p=$((20000 + RANDOM % 20000))
    if [ -z "$(ss -Hlun "sport = :$p")" ]; then
        port=$p
        break
    fi
done
[ -n "$port" ] || fail "no free UDP port"

cat >"$w/topology.toml" <<EOF
[mesh]
name = "guest-to-host"
version = 1

# In the qemu guest, behind qemu's NAT: dials out only.
[[node]]
name = "src"
id = "$src_id"
site = "guest"

# On the host: the guest reaches the host's loopback at 10.0.2.2.
[[node]]
name = "tgt"
id = "$tgt_id"
addresses = ["10.0.2.2:$port"]
listen = "127.0.0.1:$port"
site = "host"

[[volume]]
name = "data"
source = "src"
kind = "kmod"
device = "/dev/vda"
cow_store = "/dev/vdb"
targets = ["tgt"]
policy = "p"
# The last RP is compared with the whole disk, free blocks too.
free_space = "read"

[[volume]]
name = "data-file"
source = "src"
kind = "file"
path = "/dev/vda"
targets = ["tgt"]
policy = "p"

[[volume]]
name = "data-lvm"
source = "src"
kind = "file"
path = "/dev/vgd/lvd"
targets = ["tgt"]
policy = "p"

[policy.p]
rpo = "24h"
block_size = "64KiB"
EOF
"$drmesh" topology check "$w/topology.toml" >/dev/null
cp "$w/topology.toml" "$w/guest/topology.toml"
echo "$mode" >"$w/guest/mode"

start_tgt() {
    [ -z "$tgt_pid" ] || { echo "host: the target runs already"; return 0; }
    RUST_LOG=info "$drmesh" run --state-dir "$w/tgt" --topology "$w/topology.toml" >>"$w/tgt.log" 2>&1 &
    tgt_pid=$!
    local n=0
    until [ -S "$w/tgt/admin.sock" ]; do
        n=$((n + 1))
        [ $n -lt 300 ] || fail "the host's target node did not start: $(tail -n 20 "$w/tgt.log")"
        sleep 0.1
    done
    echo "host: target started"
}
stop_tgt() {
    [ -n "$tgt_pid" ] || { echo "host: the target is stopped already"; return 0; }
    kill "$tgt_pid"
    wait "$tgt_pid" 2>/dev/null || true
    tgt_pid=
    rm -f "$w/tgt/admin.sock"
    echo "host: target stopped"
}
start_tgt

vda_bytes=256M
if [ "$mode" = bench ]; then
    vda_bytes=4G
    # two full reads of 4 GiB under TCG
    export DRMESH_KMOD_VM_TIMEOUT=${DRMESH_KMOD_VM_TIMEOUT:-3600}
fi
echo "== guest node dials tgt at 10.0.2.2:$port (host 127.0.0.1:$port), vda $vda_bytes, mode $mode"
# The guest's console, line by line: shown, kept, and its requests acted on
# (in this shell, not a pipeline's subshell, so tgt_pid stays current).
while IFS= read -r line; do
    line=${line%$'\r'}
    printf '%s\n' "$line"
    printf '%s\n' "$line" >>"$w/console.log"
    case $line in
    *"HOST-ACTION: stop-target"*) stop_tgt ;;
    *"HOST-ACTION: start-target"*) start_tgt ;;
    esac
done < <(
    rc=0
    DRMESH_KMOD_VM_NET=user DRMESH_KMOD_VM_DATA="$w/guest" DRMESH_KMOD_VM_FILES="$w/bin/drmesh" \
        DRMESH_KMOD_VM_VDA_BYTES=$vda_bytes scripts/kmod-vm kmod/tests/guest-replicate.sh 2>&1 || rc=$?
    echo "$rc" >"$w/vm.rc"
)
vm_rc=$(cat "$w/vm.rc")
if [ "$vm_rc" -ne 0 ]; then
    echo "== host target log (tail)"
    tail -n 30 "$w/tgt.log"
    fail "the guest failed (kmod-vm exit $vm_rc)"
fi
if [ "$mode" = bench ]; then
    echo "host-replicate: PASS"
    exit 0
fi

# ---- every RP, on the host --------------------------------------------------------
# What the guest reported: its writer's file count, the last RP, the quiet disk.
report() { sed -n "s/.*HOST-CHECK: $1 //p" "$w/console.log" | tail -n 1; }
F=$(report files)
last=$(report last-rp)
vda_sum=$(report vda-sha256)
[ -n "$F" ] && [ -n "$last" ] && [ -n "$vda_sum" ] || fail "the guest did not report files, last-rp and vda-sha256"

# check_rps VOLUME MIN: VOLUME has at least MIN RPs on the host; every one
# restores, e2fsck accepts it and its writer's files are a consistent cut.
# The data disk's last RP must also equal the guest's quiet disk.
check_rps() {
    local vol=$1 min=$2 s seqs compared=
    "$drmesh" ctl --state-dir "$w/tgt" rps "$vol" --json >"$w/rps.json"
    seqs=$(sed -n 's/.*"seq": \([0-9][0-9]*\).*/\1/p' "$w/rps.json" | sort -n -u)
    echo "RPs of $vol on the host: $(echo $seqs)"
    [ "$(echo $seqs | wc -w)" -ge "$min" ] || fail "expected at least $min RPs of $vol"
    for s in $seqs; do
        rm -rf "$w/r.img" "$w/r"
        "$drmesh" restore "$vol@$s" --to "$w/r.img" --state-dir "$w/tgt" >"$w/restore.log" 2>&1 || {
            cat "$w/restore.log"
            fail "restore $vol@$s failed"
        }
        e2fsck -n -f "$w/r.img" >"$w/fsck.log" 2>&1 || {
            cat "$w/fsck.log"
            fail "e2fsck rejects $vol@$s"
        }
        # The writer's files, copied out without mounting (no loop device needed).
        mkdir "$w/r"
        debugfs -R "rdump /w $w/r" "$w/r.img" >"$w/debugfs.log" 2>&1
        # The newest tag K: every file f must hold K - ((K - f) mod F); a file
        # holding two tags was torn.
        K=0
        declare -A tag=()
        for ((f = 0; f < F; f++)); do
            [ -f "$w/r/w/f$f" ] || fail "$vol@$s: no file w/f$f ($(cat "$w/debugfs.log"))"
            lines=$(sort -u "$w/r/w/f$f" | wc -l)
            [ "$lines" -eq 1 ] || fail "$vol@$s: file f$f mixes $lines tags (torn write)"
            t=$(head -n 1 "$w/r/w/f$f")
            t=$((10#$t))
            tag[$f]=$t
            ((t > K)) && K=$t
        done
        for ((f = 0; f < F; f++)); do
            want=$((K - (K - f) % F))
            [ "${tag[$f]}" -eq "$want" ] || fail "$vol@$s: file f$f holds write ${tag[$f]}, but the instant of write $K implies $want"
        done
        echo "$vol@$s: e2fsck clean, files are the cut after write $K"
        if [ "$vol" = data ] && [ "$s" -eq "$last" ]; then
            sum=$(sha256sum "$w/r.img" | cut -d' ' -f1)
            [ "$sum" = "$vda_sum" ] || fail "the last RP data@$last (sha256 $sum) differs from the guest's quiet disk ($vda_sum)"
            echo "data@$last equals the guest's /dev/vda byte for byte (sha256 $sum)"
            compared=yes
        fi
    done
    [ "$vol" != data ] || [ "$compared" = yes ] || fail "the host's target does not list the last RP data@$last"
}
check_rps data 6
# data-lvm: the scheduler's first cycle, two under the writer, one of the
# unmounted volume next to a look-alike.
lvm_last=$(report lvm-last-rp)
[ -n "$lvm_last" ] || fail "the guest did not report lvm-last-rp"
check_rps data-lvm 4
echo "host-replicate: PASS"
