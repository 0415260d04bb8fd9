#!/bin/sh
# Guest side of the Rust wrapper test, run as /guest-test by scripts/kmod-vm
# with /bin/drmesh-kmod-check (DRMESH_KMOD_VM_FILES). The program attaches
# /dev/vdb, hands bitmaps over, takes and releases a snapshot through the
# wrapper and checks what it sees.
. /guest-lib.sh
[ -x /bin/drmesh-kmod-check ] || fail "no /bin/drmesh-kmod-check"
insmod /lib/modules/drmesh_trk.ko
mkdir -p /cow
mount -t tmpfs -o size=64m tmpfs /cow
truncate -s 16M /cow/store
losetup /dev/loop0 /cow/store
/bin/drmesh-kmod-check /dev/vdb /dev/loop0
rmmod drmesh_trk
