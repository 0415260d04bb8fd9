#!/bin/sh
# Guest side of the write-overhead benchmark, run as /guest-test by
# scripts/kmod-vm (scripts/kmod-vm kmod/tests/guest-bench.sh). Prints figures, asserts no
# timing: O_DIRECT writes to /dev/vdb, bare vs tracking vs a live snapshot
# (COW store: /dev/vda, a disk of the same kind), 4 KiB random from one writer
# (one write in flight), 1 MiB sequential, and 4 KiB random from 8 writers at
# once (qd8: up to 8 writes in flight, as a filesystem's writeback or a
# database would have). With a snapshot, "first" writes each copy a chunk (the
# worst case); "again" rewrites the same blocks, which are already copied.
#
# The host's load drifts while a run goes on (TCG on shared cores): a round's
# figures are compared with the bare figures of the same round (the mean of a
# bare pass before and one after the others), and the summary gives the
# medians of those per-round ratios next to the medians of the speeds.
. /guest-lib.sh
rounds=${BENCH_ROUNDS:-5}
rand_count=2000
seq_count=64

insmod /lib/modules/drmesh_trk.ko
# One untimed pass over vdb and over the part of vda the COW store uses, so
# every configuration meets host file blocks that are already allocated (the
# disk images are sparse files; a first write there also allocates on the host).
$ctl bench /dev/vdb seq1m $seq_count >/dev/null
dd if=/dev/zero of=/dev/vda bs=1M count=96 oflag=direct status=none

run() { # run LABEL: one figure per workload, appended to /tmp/round
    r=$($ctl bench /dev/vdb rand4k $rand_count)
    # before seq1m, which writes (and so, under a snapshot, copies) it all
    q=$($ctl bench /dev/vdb rand4k $rand_count 8)
    s=$($ctl bench /dev/vdb seq1m $seq_count)
    echo "$1 $r $s $q" >>/tmp/round
}

: >/tmp/bench
round=1
while [ $round -le "$rounds" ]; do
    : >/tmp/round
    run bare
    set -- $($ctl attach /dev/vdb)
    dev=$1
    run tracking
    $ctl snapshot "$dev" /dev/vda /tmp/bm >/dev/null
    run snap-first
    run snap-again
    $ctl release "$dev"
    $ctl detach "$dev"
    run bare-end
    # LABEL RAND SEQ QD8 RAND/BARE SEQ/BARE QD8/BARE, bare = mean of bare
    # and bare-end
    awk -v round=$round '
    { r[$1] = $2; s[$1] = $3; q[$1] = $4 }
    END {
        br = (r["bare"] + r["bare-end"]) / 2; bs = (s["bare"] + s["bare-end"]) / 2
        bq = (q["bare"] + q["bare-end"]) / 2
        split("bare tracking snap-first snap-again", order, " ")
        for (i = 1; i <= 4; i++) {
            k = order[i]
            printf "round %d %-10s rand4k %7.2f MB/s (%.2fx)  seq1m %7.2f MB/s (%.2fx)  rand4k-qd8 %7.2f MB/s (%.2fx)\n", round, k, r[k], r[k] / br, s[k], s[k] / bs, q[k], q[k] / bq
            print k, r[k], s[k], q[k], r[k] / br, s[k] / bs, q[k] / bq >>"/tmp/bench"
        }
    }' /tmp/round
    round=$((round + 1))
done

# medians per configuration: speeds, and ratios against the same round's bare
awk '
{ n[$1]++; for (f = 2; f <= 7; f++) v[$1, f, n[$1]] = $f }
function med(k, f,   i, j, t, a, c) {
    c = n[k]
    for (i = 1; i <= c; i++) a[i] = v[k, f, i]
    for (i = 1; i <= c; i++) for (j = i + 1; j <= c; j++)
        if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return c % 2 ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2
}
END {
    split("bare tracking snap-first snap-again", order, " ")
    for (i = 1; i <= 4; i++) {
        k = order[i]
        printf "bench: %-10s rand4k %7.2f MB/s (%.2fx bare)  seq1m %7.2f MB/s (%.2fx bare)  rand4k-qd8 %7.2f MB/s (%.2fx bare)\n", k, med(k, 2), med(k, 5), med(k, 3), med(k, 6), med(k, 4), med(k, 7)
    }
}' /tmp/bench
rmmod drmesh_trk
