//! Story: an operator installs drmesh on a clean Debian 12 server from the
//! project's .deb and starts it the way the package sets it up.
//!
//! The test builds the package with scripts/package-deb (from the binary the
//! tests use), checks what the .deb holds, then boots a copy of the cached
//! Debian 12 disk of the recovery tests (scripts/recovery-image; the cached
//! image itself is never written) under qemu. A one-shot unit in the guest
//! runs `dpkg -i` as an operator would: the postinst makes the user, the
//! identity and a first topology and starts drmesh.service (Type=notify). The
//! guest script then reports on the serial console, one `DRMESH-PKG: key=value`
//! line per fact: the unit active (READY=1 arrived), its user, the admin
//! socket answering `drmesh ctl`, file modes, `systemctl reload`, a clean stop
//! (Result=success, socket removed), `dpkg -r` keeping the state and
//! `dpkg -P` removing it (no recovery points). The test asserts those lines.
//!
//! Needs root (loop devices, mounts) and qemu; skipped otherwise. One boot
//! under TCG; the test prints how long it took.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drmesh_tests::{debian_image, drmesh_bin, manifest_get as get, run_ok, LoopDevice, Mount};

/// Runs in the guest at boot (as root), output on the serial console.
const GUEST_SCRIPT: &str = r##"#!/bin/sh
exec >/dev/ttyS0 2>&1
say() { echo "DRMESH-PKG: $*"; }
finish() { echo "DRMESH-PKG-$1"; sync; systemctl poweroff; exit 0; }
echo "DRMESH-PKG-START"
dpkg -i /root/drmesh.deb | sed 's/^/dpkg: /'
say "dpkg_exit=$(dpkg-query -W -f='${db:Status-Abbrev}' drmesh 2>/dev/null)"
say "active=$(systemctl is-active drmesh)"
say "enabled=$(systemctl is-enabled drmesh)"
say "type=$(systemctl show -p Type --value drmesh)"
say "user=$(systemctl show -p User --value drmesh)"
pid=$(systemctl show -p MainPID --value drmesh)
say "main_pid_user=$(ps -o user= -p "$pid" | tr -d ' ')"
say "status_text=$(systemctl show -p StatusText --value drmesh)"
say "nrestarts=$(systemctl show -p NRestarts --value drmesh)"
drmesh ctl --state-dir /var/lib/drmesh status | sed 's/^/ctl status: /'
say "ctl_status_exit=$(drmesh ctl --state-dir /var/lib/drmesh status >/dev/null 2>&1; echo $?)"
drmesh ctl --state-dir /var/lib/drmesh volumes | sed 's/^/ctl volumes: /'
say "ctl_volumes_exit=$(drmesh ctl --state-dir /var/lib/drmesh volumes >/dev/null 2>&1; echo $?)"
say "topology_check_exit=$(drmesh topology check /etc/drmesh/topology.toml >/dev/null 2>&1; echo $?)"
for f in /var/lib/drmesh /var/lib/drmesh/node.key /var/lib/drmesh/admin.sock /etc/drmesh/topology.toml /etc/drmesh/README; do
    say "stat $(stat -c '%n=%U:%G:%a:%F' "$f" | tr ' ' '_')"
done
say "reload_exit=$(systemctl reload drmesh >/dev/null 2>&1; echo $?)"
say "active_after_reload=$(systemctl is-active drmesh)"
say "bash_completion=$(test -f /usr/share/bash-completion/completions/drmesh && bash -n /usr/share/bash-completion/completions/drmesh && echo ok)"
say "zsh_completion=$(test -f /usr/share/zsh/vendor-completions/_drmesh && echo ok)"
say "fish_completion=$(test -f /usr/share/fish/vendor_completions.d/drmesh.fish && echo ok)"
if command -v man >/dev/null; then say "man_w=$(man -w drmesh)"; fi
say "man_pages_installed=$(ls /usr/share/man/man1/drmesh*.1.gz 2>/dev/null | wc -l)"
say "root_conf_example=$(test -f /usr/share/doc/drmesh/examples/root.conf && echo ok)"
# Installing again (an upgrade's path): the operator's edit and the identity stay; the node restarts.
id_before=$(sha256sum /var/lib/drmesh/node.key)
pid_before=$(systemctl show -p MainPID --value drmesh)
echo "# an operator's edit" >>/etc/drmesh/topology.toml
dpkg -i /root/drmesh.deb | sed 's/^/dpkg again: /'
say "reinstall_kept_edit=$(grep -q "an operator's edit" /etc/drmesh/topology.toml && echo yes || echo no)"
say "reinstall_same_identity=$(test "$(sha256sum /var/lib/drmesh/node.key)" = "$id_before" && echo yes || echo no)"
say "reinstall_restarted=$(test "$(systemctl show -p MainPID --value drmesh)" != "$pid_before" && echo yes || echo no)"
say "reinstall_active=$(systemctl is-active drmesh)"
say "unit_verify=$(systemd-analyze verify drmesh.service 2>&1 | grep -v "Command 'man " | tr '\n' ' ')"
# The example drop-in for nodes that need root; then back to the packaged unit
# (StateDirectory= hands the state back to the drmesh user).
mkdir -p /etc/systemd/system/drmesh.service.d
cp /usr/share/doc/drmesh/examples/root.conf /etc/systemd/system/drmesh.service.d/root.conf
systemctl daemon-reload
systemctl restart drmesh
say "root_dropin_active=$(systemctl is-active drmesh)"
say "root_dropin_user=$(ps -o user= -p "$(systemctl show -p MainPID --value drmesh)" | tr -d ' ')"
say "root_dropin_ctl_exit=$(drmesh ctl --state-dir /var/lib/drmesh status >/dev/null 2>&1; echo $?)"
rm -r /etc/systemd/system/drmesh.service.d
systemctl daemon-reload
systemctl restart drmesh
say "back_active=$(systemctl is-active drmesh)"
say "back_user=$(ps -o user= -p "$(systemctl show -p MainPID --value drmesh)" | tr -d ' ')"
say "back_key_owner=$(stat -c %U /var/lib/drmesh/node.key)"
systemd-analyze security drmesh 2>/dev/null | grep -i 'overall exposure' | sed 's/^/security: /'
systemctl stop drmesh
say "stopped_active=$(systemctl is-active drmesh)"
say "stop_result=$(systemctl show -p Result --value drmesh)"
say "stop_exit_status=$(systemctl show -p ExecMainStatus --value drmesh)"
say "socket_after_stop=$(test -e /var/lib/drmesh/admin.sock && echo present || echo removed)"
journalctl -u drmesh -o cat --no-pager | tail -n 12 | sed 's/^/journal: /'
dpkg -r drmesh | sed 's/^/dpkg -r: /'
say "removed_identity=$(test -f /var/lib/drmesh/node.key && echo kept || echo gone)"
say "removed_topology=$(test -f /etc/drmesh/topology.toml && echo kept || echo gone)"
dpkg -P drmesh 2>&1 | sed 's/^/dpkg -P: /'
say "purged_state=$(test -e /var/lib/drmesh && echo kept || echo gone)"
say "purged_user=$(getent passwd drmesh >/dev/null && echo kept || echo gone)"
finish DONE
"##;

/// The one-shot unit that runs the script once the system is up.
const GUEST_UNIT: &str = "[Unit]
Description=drmesh package test
After=multi-user.target

[Service]
Type=oneshot
TimeoutStartSec=600
ExecStart=/usr/local/sbin/drmesh-package-test

[Install]
WantedBy=multi-user.target
";

/// Builds the .deb from the binary the tests use; returns its path.
fn package(out: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("scripts/package-deb");
    let started = Instant::now();
    let stdout = run_ok(Command::new(script).arg("--binary").arg(drmesh_bin()).arg("--out").arg(out));
    eprintln!("scripts/package-deb took {:.1} s", started.elapsed().as_secs_f64());
    PathBuf::from(stdout.trim().lines().last().expect("the .deb's path"))
}

/// Prepares the guest disk (a copy of the image): the .deb, the script and its unit, enabled.
fn prepare_disk(image: &Path, disk: &Path, deb: &Path, manifest: &[(String, String)], work: &Path) {
    run_ok(Command::new("cp").arg("--sparse=always").arg(image).arg(disk));
    let start = get(manifest, "partition_start_bytes");
    let size = get(manifest, "partition_size_bytes");
    let out = run_ok(Command::new("losetup").args(["--find", "--show", "--offset", start, "--sizelimit", size]).arg(disk));
    let dev = LoopDevice { path: PathBuf::from(out.trim()), backing: disk.to_path_buf() };
    let root = Mount::new(&[dev.path.to_str().expect("utf8")], &work.join("root"));
    let r = &root.point;
    std::fs::copy(deb, r.join("root/drmesh.deb")).expect("copy the .deb");
    let script = r.join("usr/local/sbin/drmesh-package-test");
    std::fs::write(&script, GUEST_SCRIPT).expect("write the guest script");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(r.join("etc/systemd/system/drmesh-package-test.service"), GUEST_UNIT).expect("write the unit");
    std::os::unix::fs::symlink("/etc/systemd/system/drmesh-package-test.service", r.join("etc/systemd/system/multi-user.target.wants/drmesh-package-test.service")).expect("enable the unit");
    // The recovery image tells dpkg to leave docs and man pages out (to stay
    // small); a stock Debian installs them, so this copy does too.
    let _ = std::fs::remove_file(r.join("etc/dpkg/dpkg.cfg.d/01-drmesh-nodoc"));
    // The serial getty hangs up ttyS0 when it starts, which would cut the script's output.
    std::os::unix::fs::symlink("/dev/null", r.join("etc/systemd/system/serial-getty@ttyS0.service")).expect("mask the serial getty");
    drop(root);
    drop(dev);
}

/// Boots the disk until the script's last line; returns the console text.
fn boot(disk: &Path, log: &Path) -> String {
    let started = Instant::now();
    let mut qemu = drmesh_tests::spawn_qemu_ide(disk, false, log);
    let deadline = Instant::now() + Duration::from_secs(900);
    let text = loop {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).replace('\r', "");
        if text.contains("DRMESH-PKG-DONE") {
            break text;
        }
        let failed = ["Kernel panic", "Dropping to a shell", "emergency mode"].iter().any(|m| text.contains(m));
        if failed || Instant::now() > deadline || qemu.try_wait().expect("qemu").is_some() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            panic!("the guest did not finish the package test; console tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("boot, install, checks and removal took {:.1} s under TCG", started.elapsed().as_secs_f64());
    // The script powers the guest off; it need not wait for that.
    let _ = qemu.kill();
    let _ = qemu.wait();
    text
}

#[test]
fn the_deb_installs_on_a_clean_debian_and_its_service_starts_and_stops() {
    let Some((image, manifest)) = debian_image() else { return };
    let dir = tempfile::Builder::new().prefix("drmesh-package-").tempdir().expect("tempdir");
    let work = dir.path();
    let deb = package(&work.join("deb"));

    // What the package holds and needs.
    let field = |name: &str| run_ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name)).trim().to_string();
    let depends = field("Depends");
    eprintln!("{}: Version {}, Depends {depends}", deb.display(), field("Version"));
    assert!(depends.contains("libc6 (>= "), "libc6 with a minimum version: {depends}");
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/drmesh",
        "./lib/systemd/system/drmesh.service",
        "./etc/drmesh/README",
        "./usr/share/man/man1/drmesh.1.gz",
        "./usr/share/man/man1/drmesh-run.1.gz",
        "./usr/share/man/man1/drmesh-ctl-status.1.gz",
        "./usr/share/bash-completion/completions/drmesh",
        "./usr/share/zsh/vendor-completions/_drmesh",
        "./usr/share/fish/vendor_completions.d/drmesh.fish",
        "./usr/share/doc/drmesh/copyright",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "the .deb holds {path}:\n{listing}");
    }
    assert!(listing.lines().all(|l| l.contains(" root/root ")), "every file belongs to root:\n{listing}");
    let conffiles = run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/drmesh/README", "the conffiles");

    let disk = work.join("disk.img");
    prepare_disk(&image, &disk, &deb, &manifest, work);
    let console = boot(&disk, &work.join("console.log"));
    for line in console.lines().filter(|l| l.starts_with("DRMESH-PKG") || l.starts_with("ctl ") || l.starts_with("journal: ") || l.starts_with("security: ") || l.starts_with("dpkg")) {
        eprintln!("guest: {line}");
    }
    let facts: HashMap<&str, &str> = console.lines().filter_map(|l| l.strip_prefix("DRMESH-PKG: ")).filter_map(|l| l.split_once('=')).collect();
    let fact = |key: &str| *facts.get(key).unwrap_or_else(|| panic!("no {key}= line on the console"));

    // Installed, enabled, started; Type=notify: active means READY=1 arrived.
    assert_eq!(fact("dpkg_exit"), "ii ", "dpkg -i configured the package");
    assert_eq!(fact("active"), "active");
    assert_eq!(fact("enabled"), "enabled");
    assert_eq!(fact("type"), "notify");
    assert!(fact("status_text").starts_with("node drmesh-guest serving"), "STATUS= from the node: {}", fact("status_text"));
    assert_eq!(fact("nrestarts"), "0");
    // The dedicated user, not root.
    assert_eq!(fact("user"), "drmesh");
    assert_eq!(fact("main_pid_user"), "drmesh");
    // The admin socket answers; the postinst's topology is valid.
    assert_eq!(fact("ctl_status_exit"), "0");
    assert_eq!(fact("ctl_volumes_exit"), "0");
    assert_eq!(fact("topology_check_exit"), "0");
    assert!(console.lines().any(|l| l.starts_with("ctl status: ") && l.contains("drmesh-guest")), "ctl status names the node");
    // Private state, readable configuration.
    assert_eq!(fact("stat /var/lib/drmesh"), "drmesh:drmesh:700:directory");
    assert_eq!(fact("stat /var/lib/drmesh/node.key"), "drmesh:drmesh:600:regular_file");
    assert_eq!(fact("stat /var/lib/drmesh/admin.sock"), "drmesh:drmesh:600:socket");
    assert_eq!(fact("stat /etc/drmesh/topology.toml"), "root:root:644:regular_file");
    // ExecReload works under the hardening.
    assert_eq!(fact("reload_exit"), "0");
    assert_eq!(fact("active_after_reload"), "active");
    // Completions, man pages and the root drop-in example installed.
    assert_eq!(fact("bash_completion"), "ok");
    assert_eq!(fact("zsh_completion"), "ok");
    assert_eq!(fact("fish_completion"), "ok");
    let pages: usize = fact("man_pages_installed").parse().expect("a count");
    assert_eq!(pages, listing.lines().filter(|l| l.contains("/usr/share/man/man1/drmesh")).count(), "every man page of the .deb is installed");
    assert_eq!(fact("root_conf_example"), "ok");
    // A second install keeps the operator's topology and the identity, and restarts the node.
    assert_eq!(fact("reinstall_kept_edit"), "yes");
    assert_eq!(fact("reinstall_same_identity"), "yes");
    assert_eq!(fact("reinstall_restarted"), "yes");
    assert_eq!(fact("reinstall_active"), "active");
    assert!(!console.contains("cannot notify the service manager"), "sd_notify worked");
    // The unit has no setting systemd complains about; the root drop-in works, and undoing it too.
    assert_eq!(fact("unit_verify").trim(), "", "systemd-analyze verify drmesh.service");
    assert_eq!(fact("root_dropin_active"), "active");
    assert_eq!(fact("root_dropin_user"), "root");
    assert_eq!(fact("root_dropin_ctl_exit"), "0");
    assert_eq!(fact("back_active"), "active");
    assert_eq!(fact("back_user"), "drmesh");
    assert_eq!(fact("back_key_owner"), "drmesh");
    // A graceful stop: SIGTERM, exit 0, socket removed.
    assert_eq!(fact("stopped_active"), "inactive");
    assert_eq!(fact("stop_result"), "success");
    assert_eq!(fact("stop_exit_status"), "0");
    assert_eq!(fact("socket_after_stop"), "removed");
    // Remove keeps the identity and the configuration; purge (no recovery points) removes them.
    assert_eq!(fact("removed_identity"), "kept");
    assert_eq!(fact("removed_topology"), "kept");
    assert_eq!(fact("purged_state"), "gone");
    assert_eq!(fact("purged_user"), "kept");
}
