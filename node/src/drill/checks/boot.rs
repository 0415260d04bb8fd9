//! The `boot` check: the recovery point boots in qemu, without a network,
//! until its console prints a boot marker; a kernel panic or an emergency
//! shell fails it as soon as the console shows it.

use std::path::Path;
use std::time::{Duration, Instant};

use drmesh_actors::vm::{ConsoleEvent, DiskBus, Network, Vm, VmSpec};
use drmesh_topology::DrillBoot;

use super::Outcome;

/// Console text that means the boot failed, and what to call it.
const FAILURES: [(&str, &str); 10] = [
    ("Kernel panic - not syncing", "kernel panic"),
    ("Entering emergency mode", "systemd emergency mode"),
    ("You are in emergency mode", "systemd emergency mode"),
    ("You are in rescue mode", "systemd rescue mode"),
    ("Give root password for maintenance", "maintenance shell"),
    ("Dropping to a shell", "initramfs shell (the root filesystem was not found or not mounted)"),
    ("(initramfs)", "initramfs shell (the root filesystem was not found or not mounted)"),
    // Debian's initramfs falls back to /bin/sh as init when /sbin/init is missing.
    ("Target filesystem doesn't have requested /sbin/init", "the root filesystem has no /sbin/init"),
    ("No init found.", "no init found on the root filesystem"),
    ("Kernel panic", "kernel panic"),
];

/// Console lines kept in the output.
const CONSOLE_LINES: usize = 60;

/// Boots `drive` (a qemu `-drive` spec without `if=`, e.g. an NBD export or
/// `file=/x.img,format=raw,snapshot=on`) with `cfg.memory_mib` MiB, up to 2
/// CPUs, no NIC, the disk on IDE (virtio when `cfg.adapt`: the caller has
/// adapted the image), the serial console logged in `work/console.log` and
/// qemu's pid in `work/qemu.pid`. Passes when the console prints one of
/// `cfg.markers` within `cfg.timeout` (and before `deadline`); fails as soon
/// as it shows a kernel panic or an emergency, rescue, maintenance or
/// initramfs shell, or when qemu exits. qemu is always stopped; the output
/// is the console's last lines.
pub fn boot(drive: &str, work: &Path, cfg: &DrillBoot, deadline: Instant) -> Outcome {
    let cpus = std::thread::available_parallelism().map(|n| n.get().min(2)).unwrap_or(1) as u32;
    let bus = if cfg.adapt { DiskBus::Virtio } else { DiskBus::Ide };
    let spec = VmSpec { drive: drive.to_string(), bus, memory_mib: cfg.memory_mib, cpus, network: Network::None, run_dir: work.to_path_buf(), accel: None };
    let markers: Vec<&str> = cfg.markers.iter().map(String::as_str).filter(|m| !m.is_empty()).collect();
    if markers.is_empty() {
        return Outcome::fail("no boot marker is configured", "");
    }
    let shown_markers = markers.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(" or ");
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Outcome::fail("time limit reached before the boot started", "");
    }
    let mut vm = match Vm::start_bound_to_thread(&spec) {
        Ok(vm) => vm,
        Err(e) => return Outcome::fail(format!("cannot start the VM: {e}"), ""),
    };
    let (accel, why) = vm.accel.clone();
    let wait = cfg.timeout.min(left);
    let fail_markers: Vec<&str> = FAILURES.iter().map(|(m, _)| *m).collect();
    let (event, after) = vm.wait_for_console(&markers, &fail_markers, wait);
    let console = vm.console_tail(CONSOLE_LINES);
    vm.stop(Duration::ZERO);
    let _ = std::fs::remove_file(work.join("qemu.pid"));
    let secs = after.as_secs_f64();
    let how = format!("qemu {accel} ({why}), {} disk, {} MiB, {cpus} CPU", bus.name(), cfg.memory_mib);
    let output = format!("{how}\n--- console (last {CONSOLE_LINES} lines):\n{console}\n");
    match event {
        ConsoleEvent::Ok { index, .. } => {
            let marker = markers.get(index).copied().unwrap_or_default();
            Outcome::pass(format!("booted to \"{marker}\" {secs:.1} s after qemu started ({accel})"), &output)
        }
        ConsoleEvent::Failed { index, line } => {
            let what = FAILURES.get(index).map_or("boot failure", |(_, w)| w);
            Outcome::fail(format!("{what} {secs:.1} s after qemu started: {}", without_timestamp(&line)), &output)
        }
        ConsoleEvent::Exited => Outcome::fail(format!("qemu exited {secs:.1} s after it started, before any boot marker ({shown_markers})"), &output),
        ConsoleEvent::TimedOut if wait < cfg.timeout => Outcome::fail(format!("time limit reached during boot: no boot marker ({shown_markers}) {secs:.0} s after qemu started"), &output),
        ConsoleEvent::TimedOut => Outcome::fail(format!("no boot marker ({shown_markers}) within {} s of qemu's start", cfg.timeout.as_secs()), &output),
    }
}

/// A kernel console line without its leading `[   7.107335]` timestamp.
fn without_timestamp(line: &str) -> &str {
    match line.strip_prefix('[').and_then(|rest| rest.split_once(']')) {
        Some((stamp, rest)) if stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.') => rest.trim_start(),
        _ => line,
    }
}
