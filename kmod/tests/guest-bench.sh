#!/bin/sh
# Guest side of the write-overhead benchmark, run as /guest-test by
# scripts/kmod-vm (scripts/kmod-vm kmod/tests/guest-bench.sh). Prints figures, asserts no
# timing: O_DIRECT writes to /dev/vdb, bare vs tracking vs a live snapshot
# (COW store: /dev/vda, a disk of the same kind), 4 KiB random and 1 MiB
# sequential. With a snapshot, "first" writes each copy a chunk (the worst
# case); "again" rewrites the same blocks, which are already copied.
set -eu
trap 'rc=$?; [ $rc -eq 0 ] || echo "GUEST FAIL: a command failed (exit $rc)"' EXIT
ctl=drmesh-kmodctl
rounds=${BENCH_ROUNDS:-5}
rand_count=2000
seq_count=64

insmod /lib/modules/drmesh_trk.ko
# One untimed pass over vdb and over the part of vda the COW store uses, so
# every configuration meets host file blocks that are already allocated (the
# disk images are sparse files; a first write there also allocates on the host).
$ctl bench /dev/vdb seq1m $seq_count >/dev/null
dd if=/dev/zero of=/dev/vda bs=1M count=96 oflag=direct status=none

run() { # run LABEL: one figure per workload, appended to /tmp/bench
    r=$($ctl bench /dev/vdb rand4k $rand_count)
    s=$($ctl bench /dev/vdb seq1m $seq_count)
    echo "$1 $r $s" >>/tmp/bench
    echo "round $round $1: rand4k $r MB/s, seq1m $s MB/s"
}

: >/tmp/bench
round=1
while [ $round -le "$rounds" ]; do
    run bare
    set -- $($ctl attach /dev/vdb)
    dev=$1
    run tracking
    $ctl snapshot "$dev" /dev/vda /tmp/bm >/dev/null
    run snap-first
    run snap-again
    $ctl release "$dev"
    $ctl detach "$dev"
    round=$((round + 1))
done

# medians per configuration, and ratios against bare
awk '
{ n[$1]++; r[$1, n[$1]] = $2; s[$1, n[$1]] = $3 }
function med(a, k, c,   i, j, t, v) {
    for (i = 1; i <= c; i++) v[i] = a[k, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++)
        if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return v[int((c + 1) / 2)]
}
END {
    split("bare tracking snap-first snap-again", order, " ")
    br = med(r, "bare", n["bare"]); bs = med(s, "bare", n["bare"])
    for (i = 1; i <= 4; i++) {
        k = order[i]; mr = med(r, k, n[k]); ms = med(s, k, n[k])
        printf "bench: %-10s rand4k %7.2f MB/s (%.2fx bare)  seq1m %7.2f MB/s (%.2fx bare)\n", k, mr, mr / br, ms, ms / bs
    }
}' /tmp/bench
rmmod drmesh_trk
