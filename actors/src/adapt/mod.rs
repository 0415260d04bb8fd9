//! Boot adaptation: editing a recovered server's root filesystem so that it
//! boots as a VM (`drmesh recover VOLUME@SEQ --boot --adapt`), the way
//! virt-v2v converts a guest. It only ever runs on a copy-on-write overlay of
//! the recovery point, mounted read-write by the caller; the RP itself is
//! never written (promise 8).
//!
//! - [`layout`] lists the volumes of the whole-disk image (MBR, GPT, LVM2
//!   linear LVs) with their filesystem type, UUID and label, so that the
//!   caller can find and mount the root, and so that the source server's
//!   device names can be tied to filesystems ([`name_volumes`]).
//! - [`adapt`] then, on the mounted root:
//!   1. rewrites /etc/fstab entries that use kernel device names (/dev/sda1)
//!      to `UUID=` ([`fstab`]);
//!   2. turns static network configuration into DHCP on the VM's NIC
//!      (ifupdown, netplan, NetworkManager, systemd-networkd: [`network`]);
//!   3. disables VMware, Hyper-V and Xen guest tools (their systemd
//!      enablement links), without uninstalling anything;
//!   4. checks each installed kernel's initramfs for virtio_blk, virtio_pci and
//!      virtio_net ([`initramfs`], which reads cpio, gzip and zstd itself);
//!      where one is missing, adds the virtio drivers to initramfs-tools'
//!      modules file (or a dracut.conf.d file), rebuilds the initramfs with
//!      the image's own tool, and checks it again;
//!   5. warns about kernel device names left in the boot loader's
//!      configuration (not edited);
//!   6. writes a report of every change, check and thing left alone into the
//!      image (/root/drmesh-adaptation.txt, else /var/log/) and returns it.
//!
//! Every file changed is first copied to `NAME.drmesh-orig` beside it (a
//! hidden `.NAME.drmesh-orig` in folders whose every file is configuration,
//! such as interfaces.d/). An earlier backup is kept, so running `adapt`
//! twice keeps the true original; a second run changes nothing more.
//!
//! # A hostile image
//!
//! The image is data from the protected server, and may have been tampered
//! with. Every path inside it is resolved with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` against the root, so no symlink in the image
//! (absolute, `../..`, or through /proc) reaches a host file; an edited file
//! must be a regular file, and is replaced by a temporary file in the same
//! folder and a rename, which never follows a symlink at the name.
//!
//! # Running the image's own programs
//!
//! Rebuilding the initramfs runs the image's update-initramfs or dracut, that
//! is, the image's shell scripts and binaries and its hooks, as root. A
//! tampered image could make these do anything root can do: read host files,
//! write host devices, change the host's clock or sysctls, talk to the
//! network, leave a daemon behind. It is contained ([`sandbox`]): the program
//! runs in its own PID, mount, network (no interfaces but a down loopback),
//! IPC and UTS namespaces, inside a user namespace, after a `pivot_root` into
//! the image with the host's root detached, so no host path exists for it at
//! all (a plain chroot can be escaped by root; this cannot be walked out of).
//! In the user namespace it has no capability over the host: it cannot create
//! device nodes (its /dev is a private tmpfs with null, zero, random and
//! urandom only), mount block devices, load modules, or set the clock, and
//! /proc/sys and the other writable parts of /proc are read-only mounts it
//! cannot unmount or remount. It runs under a time limit, and when it ends
//! every process it started dies with its PID namespace and every mount made
//! for it vanishes with its mount namespace. What remains: its user id is
//! the host's root id (so that it can write the image's root-owned files), so
//! a kernel bug that lets a process out of its namespaces would give it root;
//! and it can use as much CPU, memory and overlay space as the time limit
//! allows.

pub mod fstab;
pub mod hvtools;
pub mod initramfs;
pub mod layout;
pub mod lvm;
pub mod network;
pub mod report;
mod rootdir;
pub mod sandbox;
pub mod superblock;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use self::layout::{list_volumes, name_volumes, Layout, NamedVolume, Place, ReadAt, Skipped, TableKind, Volume};
pub use self::report::{Action, Area, Item, Report};
pub use self::superblock::{Filesystem, FsKind};

use self::initramfs::{DriverState, KernelCheck, Limits};
use self::rootdir::{Editable, EntryKind, RootDir, BACKUP_SUFFIX};

/// Why adaptation failed, and what it left behind.
#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    /// Reading the disk image failed; nothing was changed.
    #[error("reading the disk image at byte {offset}: {source}; check that the export or overlay is still reachable")]
    Read {
        /// Where.
        offset: u64,
        /// The cause.
        source: std::io::Error,
    },
    /// The options are not usable; nothing was changed.
    #[error("{0}; nothing was changed")]
    Options(String),
    /// The image's root could not be opened; nothing was changed.
    #[error("cannot open the image's root {path}: {source}; mount the root filesystem there first; nothing was changed")]
    Root {
        /// The root as given.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Some needed changes could not be made. The others were made (each
    /// changed file has its backup), and the report says which is which.
    #[error("boot adaptation of {root} is incomplete: {}; the other changes were made (see the report{})", failures.join("; "), report.written_to.as_deref().map(|p| format!(", also in the image at {p}")).unwrap_or_default())]
    Incomplete {
        /// The image root.
        root: PathBuf,
        /// What failed.
        failures: Vec<String>,
        /// The whole report.
        report: Box<Report>,
    },
}

/// The result of rewriting one configuration file's text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edit {
    /// The new text.
    pub text: String,
    /// What was changed, one line each (empty: nothing).
    pub changes: Vec<String>,
    /// Checks and things left alone, with why.
    pub notes: Vec<(Action, String)>,
}

/// What [`adapt`] should do.
#[derive(Debug, Clone)]
pub struct AdaptOptions {
    /// The source server's device names for the recovered volumes
    /// ([`name_volumes`] of each disk), to tie fstab's names to filesystems.
    pub volumes: Vec<NamedVolume>,
    /// The name of the VM's first NIC, which gets DHCP ("ens3": qemu's first
    /// PCI NIC on the default machine type).
    pub vm_nic: String,
    /// Rebuild an initramfs that lacks virtio drivers (else only report it).
    pub rebuild_initramfs: bool,
    /// Time limit of one initramfs rebuild.
    pub rebuild_timeout: Duration,
    /// Bounds on reading an initramfs.
    pub initramfs_limits: Limits,
}

impl Default for AdaptOptions {
    fn default() -> Self {
        AdaptOptions { volumes: Vec::new(), vm_nic: "ens3".into(), rebuild_initramfs: true, rebuild_timeout: Duration::from_secs(600), initramfs_limits: Limits::default() }
    }
}

/// Where the report goes inside the image (the first whose folder exists).
pub const REPORT_PATHS: [&str; 2] = ["/root/drmesh-adaptation.txt", "/var/log/drmesh-adaptation.txt"];

/// Largest configuration file edited.
const CONFIG_BYTES_MAX: u64 = 4 << 20;

/// Adapts the image whose root filesystem is mounted read-write at `root`
/// to boot as a VM. Returns the report (also written into the image), or
/// [`AdaptError::Incomplete`] with it when a needed change failed.
pub fn adapt(root: &Path, options: &AdaptOptions) -> Result<Report, AdaptError> {
    let nic_ok = !options.vm_nic.is_empty() && options.vm_nic.len() <= 15 && options.vm_nic.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !nic_ok {
        return Err(AdaptError::Options(format!("'{}' is not a network interface name (1-15 letters, digits, '_', '.', '-')", options.vm_nic.escape_default())));
    }
    let dir = RootDir::open(root).map_err(|source| AdaptError::Root { path: root.to_path_buf(), source })?;
    if !dir.is_dir("etc") {
        return Err(AdaptError::Root { path: root.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "it has no /etc: not a Linux root filesystem") });
    }
    let mut report = Report { root: root.display().to_string(), vm_nic: options.vm_nic.clone(), ..Report::default() };
    adapt_fstab(&dir, &options.volumes, &mut report);
    adapt_network(&dir, &options.vm_nic, &mut report);
    hvtools::disable_hypervisor_tools(&dir, &mut report);
    ensure_virtio(&dir, options, &mut report);
    check_boot_config(&dir, &options.volumes, &mut report);
    write_report(&dir, &mut report);
    let failures: Vec<String> = report.failures().map(|i| match &i.path {
        Some(p) => format!("{p}: {}", i.detail),
        None => i.detail.clone(),
    }).collect();
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(AdaptError::Incomplete { root: root.to_path_buf(), failures, report: Box::new(report) })
    }
}

/// How [`edit_file`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edited {
    Missing,
    NotEditable,
    Unchanged,
    Changed,
    Failed,
}

/// Reads the image file `path`, rewrites it with `rewrite`, and if that
/// changed it, backs it up and replaces it; reports all of it.
fn edit_file(root: &RootDir, path: &str, area: Area, hidden_backup: bool, report: &mut Report, rewrite: impl FnOnce(&str) -> Edit) -> Edited {
    let shown = format!("/{}", path.trim_start_matches('/'));
    let (data, stat) = match root.read_editable(path, CONFIG_BYTES_MAX) {
        Ok(Editable::Missing) => return Edited::Missing,
        Ok(Editable::Symlink(target)) => {
            report.push(area, Action::Warning, Some(&shown), format!("is a symlink to {target}; not followed and not edited"));
            return Edited::NotEditable;
        }
        Ok(Editable::NotRegular) => {
            report.push(area, Action::Warning, Some(&shown), "is not a regular file; not edited");
            return Edited::NotEditable;
        }
        Ok(Editable::TooLarge(n)) => {
            report.push(area, Action::Warning, Some(&shown), format!("is {n} bytes, larger than any such configuration file ({CONFIG_BYTES_MAX}); not edited"));
            return Edited::NotEditable;
        }
        Ok(Editable::File(data, stat)) => (data, stat),
        Err(e) => {
            report.push(area, Action::Failed, Some(&shown), format!("cannot read it: {e}"));
            return Edited::Failed;
        }
    };
    let Ok(text) = String::from_utf8(data.clone()) else {
        report.push(area, Action::Warning, Some(&shown), "is not UTF-8 text; not edited");
        return Edited::NotEditable;
    };
    let edit = rewrite(&text);
    for (action, note) in &edit.notes {
        report.push(area, *action, Some(&shown), note.clone());
    }
    if edit.changes.is_empty() || edit.text == text {
        return Edited::Unchanged;
    }
    let backup = match root.backup(path, &data, &stat, hidden_backup) {
        Ok((backup, true)) => format!("original saved as {backup}"),
        Ok((backup, false)) => format!("the original from an earlier run stays in {backup}"),
        Err(e) => {
            report.push(area, Action::Failed, Some(&shown), format!("cannot save a backup of it ({e}); not edited"));
            return Edited::Failed;
        }
    };
    if let Err(e) = root.replace(path, edit.text.as_bytes(), Some(&stat), 0o644) {
        report.push(area, Action::Failed, Some(&shown), format!("cannot write it ({e}); it is unchanged"));
        return Edited::Failed;
    }
    for change in edit.changes {
        report.push(area, Action::Changed, Some(&shown), change);
    }
    report.push(area, Action::Changed, Some(&shown), backup);
    Edited::Changed
}

/// The regular files (and symlinks, reported when edited) of an image folder
/// whose names pass `keep`, without our own backups and temporary files.
fn config_files(root: &RootDir, folder: &str, area: Area, report: &mut Report, keep: impl Fn(&str) -> bool) -> Vec<String> {
    match root.list(folder) {
        Ok(Some(entries)) => entries
            .into_iter()
            .filter(|e| matches!(e.kind, EntryKind::File | EntryKind::Symlink))
            .filter(|e| !e.name.ends_with(BACKUP_SUFFIX) && !e.name.contains(".drmesh-tmp-") && keep(&e.name))
            .map(|e| format!("{folder}/{}", e.name))
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            report.push(area, Action::Failed, Some(&format!("/{folder}")), format!("cannot list it: {e}"));
            Vec::new()
        }
    }
}

fn adapt_fstab(root: &RootDir, volumes: &[NamedVolume], report: &mut Report) {
    match edit_file(root, "etc/fstab", Area::Fstab, false, report, |text| fstab::rewrite_fstab(text, volumes)) {
        Edited::Missing => report.push(Area::Fstab, Action::Warning, Some("/etc/fstab"), "not there; the root is mounted from the kernel command line only"),
        Edited::Unchanged => report.push(Area::Fstab, Action::Checked, Some("/etc/fstab"), "names no device by a kernel name that could be rewritten"),
        _ => {}
    }
}

fn adapt_network(root: &RootDir, nic: &str, report: &mut Report) {
    let area = Area::Network;
    let mut found = false;

    // ifupdown: first find every interface with a static stanza, in all files.
    let main = "etc/network/interfaces";
    let mut files = config_files(root, "etc/network/interfaces.d", area, report, |_| true);
    files.push(main.to_string());
    let texts: Vec<(String, String)> = files
        .iter()
        .filter_map(|f| match root.read(f, CONFIG_BYTES_MAX) {
            Ok(Some(b)) => Some((f.clone(), String::from_utf8_lossy(&b).into_owned())),
            _ => None,
        })
        .collect();
    if !texts.is_empty() {
        found = true;
        let ifaces: Vec<network::Iface> = texts.iter().flat_map(|(_, t)| network::ifupdown_ifaces(t)).collect();
        let statics: BTreeSet<String> = ifaces.iter().filter(|i| i.name != "lo" && i.method == "static").map(|i| i.name.clone()).collect();
        let managed = ifaces.iter().any(|i| i.name != "lo");
        let nic_dhcp = !statics.contains(nic) && ifaces.iter().any(|i| i.name == nic && i.method == "dhcp") && texts.iter().any(|(_, t)| network::ifupdown_brings_up(t, nic));
        let add_stanza = managed && !nic_dhcp;
        for (file, _) in &texts {
            let is_main = file == main;
            let hidden = !is_main;
            let outcome = edit_file(root, file, area, hidden, report, |text| {
                let mut edit = network::ifupdown_disable(text, &statics);
                if is_main && add_stanza {
                    if !edit.text.is_empty() && !edit.text.ends_with('\n') {
                        edit.text.push('\n');
                    }
                    edit.text.push_str(&network::ifupdown_dhcp_stanza(nic));
                    edit.changes.push(format!("added 'allow-hotplug {nic}' and 'iface {nic} inet dhcp'"));
                }
                edit
            });
            if outcome == Edited::Unchanged && is_main {
                let why = if nic_dhcp { format!("{nic} already gets DHCP") } else { "configures no interface besides lo".to_string() };
                report.push(area, Action::Checked, Some("/etc/network/interfaces"), why);
            }
        }
        if add_stanza && !texts.iter().any(|(f, _)| f == main) {
            report.push(area, Action::Warning, Some("/etc/network/interfaces"), format!("missing although interfaces.d/ configures interfaces; no DHCP stanza for {nic} was added"));
        }
    }

    // netplan.
    let mut match_all_used = false;
    for file in config_files(root, "etc/netplan", area, report, |n| n.ends_with(".yaml")) {
        found = true;
        let mut used = false;
        let outcome = edit_file(root, &file, area, false, report, |text| {
            let (edit, u) = network::netplan_rewrite(text, !match_all_used);
            used = u;
            edit
        });
        match_all_used |= used && outcome == Edited::Changed;
        if outcome == Edited::Unchanged {
            report.push(area, Action::Checked, Some(&format!("/{file}")), "no static addresses on ethernets");
        }
    }

    // NetworkManager keyfiles: backups hidden, since NetworkManager reads
    // every non-hidden file of the folder.
    for file in config_files(root, "etc/NetworkManager/system-connections", area, report, |_| true) {
        found = true;
        if edit_file(root, &file, area, true, report, network::nm_rewrite) == Edited::Unchanged {
            report.push(area, Action::Checked, Some(&format!("/{file}")), "not a static wired connection");
        }
    }

    // systemd-networkd.
    let mut match_all_used = false;
    for file in config_files(root, "etc/systemd/network", area, report, |n| n.ends_with(".network")) {
        found = true;
        let mut used = false;
        let outcome = edit_file(root, &file, area, false, report, |text| {
            let (edit, u) = network::networkd_rewrite(text, !match_all_used);
            used = u;
            edit
        });
        match_all_used |= used && outcome == Edited::Changed;
        if outcome == Edited::Unchanged {
            report.push(area, Action::Checked, Some(&format!("/{file}")), "no static address on a wired NIC");
        }
    }
    if !found {
        report.push(area, Action::Warning, None, "no ifupdown, netplan, NetworkManager or systemd-networkd configuration found; the VM's network is left to whatever the image does by default");
    }
}

/// Checks every kernel's initramfs; adds virtio drivers and rebuilds where
/// one is missing; checks again.
fn ensure_virtio(root: &RootDir, options: &AdaptOptions, report: &mut Report) {
    let area = Area::Initramfs;
    let versions = match initramfs::kernel_versions(root) {
        Ok(v) => v,
        Err(e) => {
            report.push(area, Action::Failed, Some("/boot"), format!("cannot list it: {e}"));
            return;
        }
    };
    if versions.is_empty() {
        report.push(area, Action::Warning, Some("/boot"), "no kernel (vmlinuz-VERSION) found; if /boot is a filesystem of its own, mount it under the root before adapting");
        return;
    }
    let limits = &options.initramfs_limits;
    let mut checks: Vec<KernelCheck> = Vec::new();
    for version in &versions {
        if !root.is_dir(&format!("lib/modules/{version}")) {
            report.push(area, Action::LeftAlone, Some(&format!("/boot/vmlinuz-{version}")), format!("no /lib/modules/{version}: a rescue or leftover kernel, not checked"));
            continue;
        }
        checks.push(initramfs::check_kernel(root, version, limits));
    }
    for check in &checks {
        let shown = format!("/boot/vmlinuz-{}", check.version);
        let not_in_kernel = check.drivers_in(DriverState::NotInKernel);
        if !not_in_kernel.is_empty() {
            report.push(area, Action::Failed, Some(&shown), format!("kernel {} has no {} (neither built in nor a module): it cannot boot from virtio; install a kernel that has them", check.version, not_in_kernel.join(", ")));
        } else if check.ready() {
            report.push(area, Action::Checked, Some(&shown), format!("{check}"));
        } else if check.initramfs.is_none() {
            report.push(area, Action::Failed, Some(&shown), format!("{check}; without an initramfs it cannot load virtio modules"));
        } else {
            report.push(area, Action::Checked, Some(&shown), format!("{check}: the VM cannot boot from a virtio disk with this initramfs"));
        }
    }
    let to_rebuild: Vec<usize> = (0..checks.len()).filter(|&i| checks[i].needs_rebuild() && checks[i].drivers_in(DriverState::NotInKernel).is_empty()).collect();
    if !to_rebuild.is_empty() && !options.rebuild_initramfs {
        for &i in &to_rebuild {
            report.push(area, Action::Warning, Some(&format!("/boot/vmlinuz-{}", checks[i].version)), format!("{}; not rebuilt (rebuilding was not asked for): the VM cannot boot from a virtio disk", checks[i]));
        }
    }
    if !to_rebuild.is_empty() && options.rebuild_initramfs {
        rebuild(root, options, &mut checks, &to_rebuild, report);
    }
    report.kernels = checks;
}

/// Which initramfs generator the image uses.
enum Generator {
    InitramfsTools,
    Dracut(&'static str),
}

fn rebuild(root: &RootDir, options: &AdaptOptions, checks: &mut [KernelCheck], which: &[usize], report: &mut Report) {
    let area = Area::Initramfs;
    let update_initramfs = ["usr/sbin/update-initramfs", "sbin/update-initramfs"].into_iter().find(|p| root.exists(p));
    let dracut = ["usr/bin/dracut", "usr/sbin/dracut", "sbin/dracut"].into_iter().find(|p| root.exists(p));
    let generator = match (update_initramfs, dracut) {
        (Some(_), _) if root.is_dir("etc/initramfs-tools") => Generator::InitramfsTools,
        (_, Some(d)) => Generator::Dracut(d),
        _ => {
            report.push(area, Action::Failed, None, "the initramfs lacks virtio drivers, and the image has neither initramfs-tools nor dracut to rebuild it");
            return;
        }
    };
    // Configure the generator to include the virtio drivers.
    let configured = match &generator {
        Generator::InitramfsTools => {
            let path = "etc/initramfs-tools/modules";
            match edit_file(root, path, area, false, report, initramfs::add_initramfs_tools_modules) {
                Edited::Missing => match root.replace(path, initramfs::add_initramfs_tools_modules("").text.as_bytes(), None, 0o644) {
                    Ok(()) => {
                        report.push(area, Action::Changed, Some("/etc/initramfs-tools/modules"), format!("created, listing {}", initramfs::VIRTIO_ADDED.join(", ")));
                        true
                    }
                    Err(e) => {
                        report.push(area, Action::Failed, Some("/etc/initramfs-tools/modules"), format!("cannot create it: {e}"));
                        false
                    }
                },
                Edited::Changed | Edited::Unchanged => true,
                Edited::NotEditable | Edited::Failed => false,
            }
        }
        Generator::Dracut(_) => {
            let shown = format!("/{}", initramfs::DRACUT_CONF);
            let written = root.create_dir("etc/dracut.conf.d", 0o755).and_then(|()| match root.read_editable(initramfs::DRACUT_CONF, CONFIG_BYTES_MAX)? {
                Editable::Missing | Editable::File(..) => root.replace(initramfs::DRACUT_CONF, initramfs::dracut_conf().as_bytes(), None, 0o644),
                _ => Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "something other than a file is there")),
            });
            match written {
                Ok(()) => {
                    report.push(area, Action::Changed, Some(&shown), format!("written: add_drivers+=\" {} \"", initramfs::VIRTIO_ADDED.join(" ")));
                    true
                }
                Err(e) => {
                    report.push(area, Action::Failed, Some(&shown), format!("cannot write it: {e}"));
                    false
                }
            }
        }
    };
    if !configured {
        return;
    }
    for &i in which {
        let version = checks[i].version.clone();
        let Some(initramfs_path) = checks[i].initramfs.clone() else { continue };
        let image_path = format!("/{initramfs_path}");
        let (argv, with_sys): (Vec<String>, bool) = match &generator {
            Generator::InitramfsTools => (vec!["update-initramfs".into(), "-u".into(), "-k".into(), version.clone()], false),
            Generator::Dracut(d) => (vec![format!("/{d}"), "-f".into(), image_path.clone(), version.clone()], true),
        };
        let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
        let shown = format!("/boot/vmlinuz-{version}");
        let run = match sandbox::run_in_image(root.path(), &argv_ref, with_sys, options.rebuild_timeout) {
            Ok(run) => run,
            Err(e) => {
                report.push(area, Action::Failed, Some(&shown), format!("cannot run {} contained: {e}", argv[0]));
                continue;
            }
        };
        let tail: String = run.output.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
        if !run.success() {
            let how = if run.timed_out { format!("was killed after the time limit of {} s", options.rebuild_timeout.as_secs()) } else { format!("exited with {}", run.code.map_or("a signal".to_string(), |c| c.to_string())) };
            report.push(area, Action::Failed, Some(&shown), format!("{} {how}; its output ends: {tail}", argv.join(" ")));
            continue;
        }
        let mut after = initramfs::check_kernel(root, &version, &options.initramfs_limits);
        after.rebuild_seconds = Some(run.seconds);
        if after.ready() {
            report.push(area, Action::Changed, Some(&image_path), format!("rebuilt with {} in {:.1} s (contained); it now has {}", argv.join(" "), run.seconds, initramfs::VIRTIO_REQUIRED.join(", ")));
        } else {
            report.push(area, Action::Failed, Some(&image_path), format!("rebuilt with {} in {:.1} s, but virtio drivers are still not all there: {after}", argv.join(" "), run.seconds));
        }
        checks[i] = after;
    }
}

/// Warns about kernel device names in the boot loader and resume
/// configuration (not edited: the kernel command line of the VM comes from
/// these files, and GRUB's own config is regenerated by the image's tools).
fn check_boot_config(root: &RootDir, volumes: &[NamedVolume], report: &mut Report) {
    let files = ["boot/grub/grub.cfg", "boot/grub2/grub.cfg", "etc/default/grub", "etc/initramfs-tools/conf.d/resume"];
    let mut looked = 0;
    for file in files {
        let Ok(Some(data)) = root.read(file, 16 << 20) else { continue };
        looked += 1;
        let text = String::from_utf8_lossy(&data);
        let mut names = BTreeSet::new();
        for word in text.split(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            if let Some((key, value)) = word.split_once('=') {
                if matches!(key, "root" | "resume" | "RESUME") && fstab::is_kernel_name(value) {
                    names.insert(word.to_string());
                }
            }
        }
        for name in names {
            let device = name.split_once('=').map_or("", |(_, d)| d);
            let hint = volumes
                .iter()
                .find(|v| v.device == device)
                .and_then(|v| v.volume.filesystem.as_ref()?.uuid.clone())
                .map(|u| format!("; {device} was UUID={u}"))
                .unwrap_or_default();
            report.push(Area::Boot, Action::Warning, Some(&format!("/{file}")), format!("uses {name}, a kernel device name the VM may not have{hint}; not edited"));
        }
    }
    if looked > 0 && !report.items.iter().any(|i| i.area == Area::Boot) {
        report.push(Area::Boot, Action::Checked, None, "the boot loader configuration names no device by kernel name");
    }
}

fn write_report(root: &RootDir, report: &mut Report) {
    let Some(path) = REPORT_PATHS.iter().find(|p| p.rsplit_once('/').is_some_and(|(dir, _)| root.is_dir(dir))) else {
        report.push(Area::Report, Action::Warning, None, "neither /root nor /var/log exists in the image; the report was not written there");
        return;
    };
    let text = report.text();
    match root.replace(path, text.as_bytes(), None, 0o600) {
        Ok(()) => report.written_to = Some(path.to_string()),
        Err(e) => report.push(Area::Report, Action::Failed, Some(path), format!("cannot write the report: {e}")),
    }
}

#[cfg(test)]
mod tests;
