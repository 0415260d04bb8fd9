//! Runs the kernel module's guest tests: boots a Debian kernel under qemu with the
//! module built for it and a guest script (`kmod/tests/guest-track.sh` for change
//! tracking, `kmod/tests/guest-snap.sh` for snapshots, `kmod/tests/guest-wrapper.sh`
//! for the Rust wrapper, `kmod/tests/guest-persist.sh` for tracking across
//! reboots and crashes, `kmod/tests/guest-reboot.sh` for the `kmod` source kind
//! across a reboot, via `scripts/kmod-vm`) and expects the guest's PASS marker.
//! The `kmod` source kind end to end runs through
//! `kmod/tests/host-replicate.sh`: a `drmesh` node in the guest
//! (`kmod/tests/guest-replicate.sh`) replicates to one on the host, over qemu's
//! user-mode network, and the host checks every recovery point.
//!
//! Two kernels: every script runs on the stock kernel (the one Debian 12's
//! `linux-image-amd64` depends on, 6.1), and the tracking, persistence and
//! snapshot scripts also on the newest kernel the apt sources offer (6.12 here); `scripts/kmod-env`
//! resolves both names.
//!
//! Needs root: `scripts/kmod-env` installs qemu, the kernels and their headers on
//! first use (`scripts/test` runs it first). Each test boots a VM: 30 s to a few
//! minutes under TCG. Run alone with `cargo test --release -p drmesh-kmod --test guest_vm`.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// One VM at a time: they share the module build cache and two host cores.
static VM: Mutex<()> = Mutex::new(());

/// The marker line the guest's init prints when the guest script exits 0.
const PASS_MARKER: &str = "KMOD-TEST-RESULT: PASS";
/// The guest's init prints this and the running kernel's version first.
const KERNEL_MARKER: &str = "KMOD-GUEST-KERNEL: ";

/// Which kernel a test boots, as `scripts/kmod-env` names it.
#[derive(Clone, Copy)]
enum Kernel {
    /// The kernel `linux-image-amd64` depends on (Debian 12: 6.1).
    Stock,
    /// The newest kernel the apt sources offer.
    Newest,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::Stock => "stock",
            Kernel::Newest => "newest",
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Boots `kernel` with `script` (relative to the repository) and asserts that it
/// passed; prints the guest's figure lines matching `report`.
fn run_guest(test: &str, kernel: Kernel, script: &str, report: &[&str]) {
    run_guest_with(test, kernel, script, report, &[]);
}

/// [`run_guest`] with host programs copied into the guest's `/bin`.
fn run_guest_with(test: &str, kernel: Kernel, script: &str, report: &[&str], files: &[&str]) {
    run_guest_boots(test, kernel, script, report, files, 1);
}

/// [`run_guest_with`] over `boots` boots of the same disks.
fn run_guest_boots(test: &str, kernel: Kernel, script: &str, report: &[&str], files: &[&str], boots: u32) {
    let mut cmd = Command::new(repo().join("scripts/kmod-vm"));
    cmd.arg(script)
        .env("DRMESH_KMOD_VM_FILES", files.join(" "))
        .env("DRMESH_KMOD_VM_BOOTS", boots.to_string());
    run_checked(test, kernel, script, cmd, None, report);
}

/// Runs `cmd` (a `scripts/kmod-vm` run, or a script around one) from the
/// repository root with `kernel` and asserts that the guest passed, and that
/// the output holds `pass_line` too when given; prints the output lines
/// matching `report`.
fn run_checked(
    test: &str,
    kernel: Kernel,
    what: &str,
    mut cmd: Command,
    pass_line: Option<&str>,
    report: &[&str],
) {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root (scripts/kmod-env installs packages)");
        return;
    }
    // A poisoned lock only means the other VM test failed; this one still runs.
    let _vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let out = cmd
        .env("DRMESH_KMOD_KERNEL", kernel.name())
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let passed = stdout.lines().any(|l| l.contains(PASS_MARKER))
        && pass_line.is_none_or(|p| stdout.lines().any(|l| l.contains(p)));
    // kmod-vm checks that it is the kernel asked for; this names it in the output.
    let booted = stdout.lines().find_map(|l| {
        l.split_once(KERNEL_MARKER)
            .map(|(_, v)| v.trim().to_string())
    });
    assert!(
        out.status.success() && passed && booted.is_some(),
        "guest test {what} on the {} kernel failed ({}):\n{stdout}\n{stderr}",
        kernel.name(),
        out.status
    );
    eprintln!(
        "{test}: PASS on {}",
        booted.expect("checked by the assertion above")
    );
    // The ratios and timings the guest reported, for whoever runs this by hand.
    for line in stdout
        .lines()
        .filter(|l| report.iter().any(|p| l.contains(p)) || l.starts_with("== guest finished"))
    {
        eprintln!("{line}");
    }
}

/// The repository root (the kmod crate's parent folder).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kmod crate lives in the repository root")
}

#[test]
fn module_tracks_writes_in_a_real_kernel() {
    run_guest(
        "module_tracks_writes_in_a_real_kernel",
        Kernel::Stock,
        "kmod/tests/guest-track.sh",
        &["written_bits="],
    );
}

#[test]
fn module_snapshots_in_a_real_kernel() {
    run_guest(
        "module_snapshots_in_a_real_kernel",
        Kernel::Stock,
        "kmod/tests/guest-snap.sh",
        &["verify:", "covers:"],
    );
}

#[test]
fn module_tracks_writes_in_the_newest_kernel() {
    run_guest(
        "module_tracks_writes_in_the_newest_kernel",
        Kernel::Newest,
        "kmod/tests/guest-track.sh",
        &["written_bits="],
    );
}

#[test]
fn module_snapshots_in_the_newest_kernel() {
    run_guest(
        "module_snapshots_in_the_newest_kernel",
        Kernel::Newest,
        "kmod/tests/guest-snap.sh",
        &["verify:", "covers:"],
    );
}

/// Four boots of the same disks: clean power-off, crash, detach, a write
/// before attach (see the script's header).
fn tracking_survives(test: &str, kernel: Kernel) {
    run_guest_boots(
        test,
        kernel,
        "kmod/tests/guest-persist.sh",
        &["attach:", "clean reboot:", "crash:"],
        &[],
        4,
    );
}

#[test]
fn tracking_survives_reboot_and_crash() {
    tracking_survives("tracking_survives_reboot_and_crash", Kernel::Stock);
}

#[test]
fn tracking_survives_reboot_and_crash_in_the_newest_kernel() {
    tracking_survives("tracking_survives_reboot_and_crash_in_the_newest_kernel", Kernel::Newest);
}

#[test]
fn rust_wrapper_drives_the_module_in_a_real_kernel() {
    run_guest_with(
        "rust_wrapper_drives_the_module_in_a_real_kernel",
        Kernel::Stock,
        "kmod/tests/guest-wrapper.sh",
        &["wrapper:"],
        &[env!("CARGO_BIN_EXE_drmesh-kmod-check")],
    );
}

/// The workspace's `drmesh` binary of this test's profile (cargo does not
/// build another package's binary for this crate's tests).
fn drmesh_binary() -> std::path::PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/drmesh
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("drmesh");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build --release -p drmesh-node` (the same profile as this test)",
        bin.display()
    );
    bin
}

/// [`drmesh_binary`] stripped into a fresh directory, for a guest's `/bin`
/// (the initramfs holds it in the guest's memory).
fn stripped_drmesh() -> std::path::PathBuf {
    let bin = drmesh_binary();
    let dir = std::env::temp_dir().join(format!("drmesh-guest-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir for the guest's drmesh");
    let out = dir.join("drmesh");
    let stripped = Command::new("strip").arg("-o").arg(&out).arg(&bin).status().is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(&bin, &out).expect("copy drmesh for the guest");
    }
    out
}

#[test]
fn kmod_volume_replicates_to_the_host() {
    if !is_root() {
        eprintln!("SKIPPED kmod_volume_replicates_to_the_host: needs root");
        return;
    }
    let mut cmd = Command::new(repo().join("kmod/tests/host-replicate.sh"));
    cmd.arg(drmesh_binary());
    run_checked(
        "kmod_volume_replicates_to_the_host",
        Kernel::Stock,
        "kmod/tests/host-replicate.sh",
        cmd,
        Some("host-replicate: PASS"),
        &[
            "bench:",
            "cycle data",
            "RPs of data",
            "e2fsck clean",
            "byte for byte",
            "cycle failed",
            "committed before",
            "REMOTE",
            "outbound",
        ],
    );
}

#[test]
fn kmod_volume_reads_only_changes_after_a_reboot() {
    if !is_root() {
        eprintln!("SKIPPED kmod_volume_reads_only_changes_after_a_reboot: needs root");
        return;
    }
    let drmesh = stripped_drmesh();
    run_guest_boots(
        "kmod_volume_reads_only_changes_after_a_reboot",
        Kernel::Stock,
        "kmod/tests/guest-reboot.sh",
        &["boot 1, first cycle", "cycle data", "attached /dev/vda", "reboot:"],
        &[drmesh.to_str().expect("utf-8 temp path")],
        2,
    );
    if let Some(dir) = drmesh.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
