#!/bin/sh
# Guest side of the test that change tracking survives reboot and crash, run
# as /guest-test in each of four boots of the same disks
# (DRMESH_KMOD_VM_BOOTS=4 scripts/kmod-vm kmod/tests/guest-persist.sh).
# Tracked: /dev/vdd (4 GiB, 1,024 log extents: more than the log holds);
# state store: /dev/vdc; the write logs survive the boots on /dev/vda's ext4.
#
#   boot 1: fresh start; writes over more extents than the log holds (it
#           fills and spills); hand-over; more writes; clean power-off.
#   boot 2: clean restore: the bitmap is exactly the writes after the last
#           hand-over. Hand-over, a discard too wide for the log, writes;
#           then a crash (sysrq b: no shutdown path runs).
#   boot 3: crash restore: the bitmap covers every write since the last
#           hand-over the client could have stored, plus at most the logged
#           extents. A detach leaves a state a later attach must not restore.
#   boot 4: the device is written before attach: no restore.
. /guest-lib.sh
# bits one 4 MiB log extent covers at 4 KiB per bit
ext_bits=1024

boot=$(sed -n 's/.*drmesh\.boot=\([0-9]*\).*/\1/p' /proc/cmdline)
step "boot $boot"
insmod /lib/modules/drmesh_trk.ko
mkdir -p /logs
mount /dev/vda /logs

attach() { # attach: prints the answer, which the caller checks
    $ctl attach /dev/vdd 0 /dev/vdc
}

case $boot in
1)
    step "bad state stores are refused"
    if $ctl attach /dev/vdd 0 /dev/vdd 2>/tmp/err; then fail "state store on the tracked disk accepted"; fi
    grep -q "Invalid argument" /tmp/err || fail "state store on the tracked disk: $(cat /tmp/err)"
    set -- $($ctl attach /dev/vdb)
    vdb=$1
    if $ctl attach /dev/vdd 0 /dev/vdb 2>/tmp/err; then fail "state store on a tracked disk accepted"; fi
    grep -q "busy" /tmp/err || fail "state store on a tracked disk: $(cat /tmp/err)"
    $ctl detach "$vdb"

    step "a blank state store: fresh start"
    a=$(attach)
    echo "attach: $a"
    [ "$(val restore "$a")" = 1 ] || fail "blank store: restore $(val restore "$a"), want 1 (fresh)"
    dev=${a%% *}
    val tracking_id "$a" >/logs/id

    step "writes over more extents than the log holds, then a hand-over"
    $ctl randwrite /dev/vdd 900 21 >/logs/w1
    st=$($ctl status "$dev")
    echo "status: $st"
    [ "$(val al_flushes "$st")" -ge 1 ] || fail "the log never filled: $st"
    [ "$(val al_slots "$st")" = 500 ] || fail "log slots: $st"
    $ctl bitmap "$dev" /tmp/b1 >/dev/null
    $ctl check /tmp/b1 4096 /logs/w1 exact

    step "writes after the hand-over, then a clean power-off"
    $ctl randwrite /dev/vdd 300 22 >/logs/w2
    umount /logs
    echo "KMOD-BOOT-OK"
    # init powers off: the reboot notifier writes the state
    ;;
2)
    step "restore after a clean shutdown"
    a=$(attach)
    echo "attach: $a"
    [ "$(val restore "$a")" = 2 ] || fail "restore $(val restore "$a"), want 2 (clean)"
    [ "$(val handovers "$a")" = 1 ] || fail "hand-over count $(val handovers "$a"), want 1"
    [ "$(val tracking_id "$a")" = "$(cat /logs/id)" ] || fail "tracking id changed"
    dev=${a%% *}
    step "the next hand-over holds exactly the writes after the last one before the reboot"
    $ctl bitmap "$dev" /tmp/b2 | tee /tmp/b2.out
    $ctl check /tmp/b2 4096 /logs/w2 exact | sed 's/^/clean reboot: /'

    step "a discard too wide for the log, writes, then a crash"
    # 1,200 MiB: 300 extents, more than half the log
    blkdiscard -o 1073741824 -l 1258291200 /dev/vdd
    echo "1073741824 1258291200" >/logs/w3
    $ctl randwrite /dev/vdd 300 23 >>/logs/w3
    st=$($ctl status "$dev")
    echo "status: $st"
    echo "$(val al_used "$st")" >/logs/al_used
    umount /logs
    echo "KMOD-BOOT-OK"
    # Let the serial console send the marker before the reset cuts it off
    # (under a loaded host, TCG's UART can still hold it when sysrq b runs).
    sleep 2
    echo b >/proc/sysrq-trigger
    sleep 10
    fail "still running after sysrq b"
    ;;
3)
    step "restore after a crash"
    a=$(attach)
    echo "attach: $a"
    [ "$(val restore "$a")" = 3 ] || fail "restore $(val restore "$a"), want 3 (crash)"
    [ "$(val tracking_id "$a")" = "$(cat /logs/id)" ] || fail "tracking id changed"
    al=$(val al_extents "$a")
    [ "$al" -ge 1 ] && [ "$al" -le "$(cat /logs/al_used)" ] ||
        fail "$al log extents restored, the log held $(cat /logs/al_used)"
    # Boot 2 handed over once, so the client stored count 2; the restored
    # count may be older (more is reread), never newer.
    [ "$(val handovers "$a")" -le 2 ] || fail "restored count $(val handovers "$a") > 2"
    dev=${a%% *}
    $ctl bitmap "$dev" /tmp/b3 >/dev/null
    out=$($ctl check /tmp/b3 4096 /logs/w3)
    echo "crash: $out"
    # Reread at most: the writes since the restored count (w2, w3) and the
    # logged extents whole.
    w2=$($ctl check /tmp/b3 4096 /logs/w2 | sed -n 's/^written_bits=\([0-9]*\).*/\1/p')
    set_bits=$(val set_bits "$out")
    bound=$(($(val written_bits "$out") + w2 + al * ext_bits))
    echo "crash: bits set $set_bits, bound $bound (writes since the count plus $al extents of $ext_bits bits)"
    [ "$set_bits" -le "$bound" ] || fail "restored bitmap larger than the bound"

    step "after a detach, a state store is not restored"
    $ctl detach "$dev"
    a=$(attach)
    echo "attach: $a"
    [ "$(val restore "$a")" = 6 ] || fail "restore $(val restore "$a"), want 6 (detached)"
    [ "$(val tracking_id "$a")" != "$(cat /logs/id)" ] || fail "a fresh start kept the tracking id"
    val tracking_id "$a" >/logs/id
    umount /logs
    echo "KMOD-BOOT-OK"
    ;;
4)
    step "a device written before attach is not restored"
    dd if=/dev/urandom of=/dev/vdd bs=4096 seek=7 count=1 oflag=direct status=none
    a=$(attach)
    echo "attach: $a"
    [ "$(val restore "$a")" = 4 ] || fail "restore $(val restore "$a"), want 4 (written before attach)"
    [ "$(val bits_set "$a")" = 0 ] || fail "a fresh start restored bits"
    [ "$(val tracking_id "$a")" != "$(cat /logs/id)" ] || fail "a fresh start kept the tracking id"
    dev=${a%% *}
    $ctl detach "$dev"
    umount /logs
    ;;
*)
    fail "no drmesh.boot=N on the kernel command line"
    ;;
esac
