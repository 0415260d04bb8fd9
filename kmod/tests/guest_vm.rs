//! Runs the kernel module's guest test: boots Debian's kernel under qemu with the
//! module and `kmod/tests/guest-track.sh` (via `scripts/kmod-vm`) and expects the
//! guest's PASS marker.
//!
//! Needs root: `scripts/kmod-env` installs qemu, the kernel and its headers on
//! first use (`scripts/test` runs it first). It boots a VM: under a minute under
//! TCG. Run alone with `cargo test --release -p drmesh-kmod --test guest_vm`.

use std::path::Path;
use std::process::Command;

/// The marker line the guest's init prints when the guest script exits 0.
const PASS_MARKER: &str = "KMOD-TEST-RESULT: PASS";

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

#[test]
fn module_tracks_writes_in_a_real_kernel() {
    if !is_root() {
        eprintln!(
            "SKIPPED module_tracks_writes_in_a_real_kernel: needs root \
             (scripts/kmod-env installs packages)"
        );
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the kmod crate lives in the repository root");
    let out = Command::new(repo.join("scripts/kmod-vm"))
        .current_dir(repo)
        .output()
        .expect("run scripts/kmod-vm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let passed = stdout.lines().any(|l| l.contains(PASS_MARKER));
    assert!(
        out.status.success() && passed,
        "guest test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The ratios and timings the guest reported, for whoever runs this by hand.
    for line in stdout.lines().filter(|l| {
        l.starts_with("written_bits=") || l.starts_with("== guest finished")
    }) {
        eprintln!("{line}");
    }
}
