//! The `fsck` check: every filesystem on the disk (partitions, LVM linear
//! logical volumes, or one on the whole disk) is checked by its own tool,
//! read-only: ext2/3/4 `e2fsck -n -f`, XFS `xfs_repair -n`, FAT `fsck.vfat -n`,
//! NTFS `ntfsfix -n`, exFAT `fsck.exfat -n`, btrfs `btrfs check --readonly`.
//!
//! A crash-consistent recovery point has journals to replay: that is done
//! first, on the throwaway overlay (ext3/4 `e2fsck -E journal_only -y`, which
//! also releases orphan inodes; XFS and FAT are mounted and unmounted), so a
//! dirty journal is not reported as damage.
//!
//! Verdict: the check fails when any filesystem has errors, when a partition
//! whose type says it holds data (Linux, Linux filesystem/root/home, Microsoft
//! basic data) or a logical volume holds no recognisable filesystem (a zeroed
//! or overwritten superblock), or when no filesystem is found at all. A
//! filesystem whose tool is not installed (or a logical volume that cannot be
//! placed) is reported as *not checked*: the check still passes if at least
//! one filesystem was checked and all checked ones are clean, and fails if
//! none could be checked. Swap and LVM physical volumes are not filesystems
//! and are skipped.

use std::os::unix::fs::FileExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use drmesh_actors::adapt::{FsKind, Place, Volume};

use super::{chain, fs_text, place_text, run_tool, slug, which, Disk, Outcome, Ran, SpawnError};
use crate::mounts::{attach, mount};

/// A filesystem kind as far as fsck is concerned (the layout code does not
/// know NTFS and exFAT; they are recognised here by their boot sector).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ext(FsKind),
    Xfs,
    Vfat,
    Btrfs,
    Ntfs,
    Exfat,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ext(k) => k.name(),
            Kind::Xfs => "xfs",
            Kind::Vfat => "vfat",
            Kind::Btrfs => "btrfs",
            Kind::Ntfs => "ntfs",
            Kind::Exfat => "exfat",
        }
    }

    /// The checking tool and the Debian package holding it.
    fn tool(self) -> (&'static str, &'static str) {
        match self {
            Kind::Ext(_) => ("e2fsck", "e2fsprogs"),
            Kind::Xfs => ("xfs_repair", "xfsprogs"),
            Kind::Vfat => ("fsck.vfat", "dosfstools"),
            Kind::Btrfs => ("btrfs", "btrfs-progs"),
            Kind::Ntfs => ("ntfsfix", "ntfs-3g"),
            Kind::Exfat => ("fsck.exfat", "exfatprogs"),
        }
    }

    /// The read-only check's arguments (before the device).
    fn check_args(self) -> &'static [&'static str] {
        match self {
            Kind::Ext(_) => &["-n", "-f"],
            Kind::Xfs => &["-n"],
            Kind::Vfat => &["-n"],
            Kind::Btrfs => &["check", "--readonly"],
            Kind::Ntfs => &["-n"],
            Kind::Exfat => &["-n"],
        }
    }

    /// What a non-zero exit of the check means.
    fn meaning(self, code: i32) -> String {
        match self {
            Kind::Ext(_) | Kind::Exfat => {
                let bits = [
                    (1, "errors corrected"),
                    (2, "errors corrected, reboot needed"),
                    (4, "errors left uncorrected"),
                    (8, "operational error"),
                    (16, "usage error"),
                    (32, "cancelled"),
                    (128, "shared-library error"),
                ];
                let words: Vec<&str> = bits.iter().filter(|(b, _)| code & b != 0).map(|(_, w)| *w).collect();
                if words.is_empty() {
                    "no errors".into()
                } else {
                    words.join(", ")
                }
            }
            Kind::Xfs => match code {
                1 => "corruption found".into(),
                2 => "the log still needs replaying".into(),
                _ => "xfs_repair failed".into(),
            },
            Kind::Vfat => match code {
                1 => "errors found".into(),
                _ => "fsck.vfat failed".into(),
            },
            Kind::Btrfs => "errors found".into(),
            Kind::Ntfs => "errors found".into(),
        }
    }
}

/// What became of one volume.
enum Verdict {
    /// Checked, no errors.
    Clean,
    /// Damaged (or could not be checked for a reason that is itself a failure).
    Failed(String),
    /// Not checked, and why (tool missing).
    NotChecked(String),
    /// Not a filesystem to check (swap, LVM PV, BIOS boot partition...).
    Skipped,
    /// The time limit was reached.
    TimeLimit(String),
}

/// Whether a volume's type says it holds a data filesystem.
fn holds_data(v: &Volume) -> bool {
    match &v.place {
        Place::WholeDisk => false,
        Place::LogicalVolume { .. } => true,
        Place::Partition { type_id, .. } => matches!(
            type_id.as_str(),
            "0x83"
                | "0x07"
                | "0x0b"
                | "0x0c"
                | "0x06"
                | "0x0e"
                | "0fc63daf-8483-4772-8e79-3d69d8477de4"
                | "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
                | "933ac7e1-2eb4-4f13-b844-0e14e2aef915"
                | "bc13c2ff-59e6-4262-a352-b275fd6f7172"
                | "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"
        ),
    }
}

/// Whether a volume's type says Linux.
fn linux_type(v: &Volume) -> bool {
    match &v.place {
        Place::LogicalVolume { .. } => true,
        Place::Partition { type_id, .. } => {
            matches!(type_id.as_str(), "0x83" | "0fc63daf-8483-4772-8e79-3d69d8477de4" | "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" | "933ac7e1-2eb4-4f13-b844-0e14e2aef915")
        }
        Place::WholeDisk => false,
    }
}

/// NTFS or exFAT, from the OEM name of the boot sector.
fn boot_sector_kind(file: &Path, v: &Volume) -> Option<Kind> {
    let f = std::fs::File::open(file).ok()?;
    let mut head = [0u8; 16];
    f.read_exact_at(&mut head, v.start_bytes).ok()?;
    match &head[3..11] {
        b"NTFS    " => Some(Kind::Ntfs),
        b"EXFAT   " => Some(Kind::Exfat),
        _ => None,
    }
}

/// Checks every filesystem on the disk; see the module doc for the verdict.
pub fn fsck(disk: &Disk, deadline: Instant) -> Outcome {
    let layout = match super::layout(disk.file) {
        Ok(l) => l,
        Err(e) => return Outcome::fail(e, ""),
    };
    let logs = disk.work.join("logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        return Outcome::fail(format!("cannot make {}: {e}", logs.display()), "");
    }
    let mut clean = Vec::new();
    let mut failed = Vec::new();
    let mut not_checked = Vec::new();
    // Sections of output: those of failed volumes go last, so the tail keeps them.
    let mut ok_output = String::new();
    let mut bad_output = String::new();
    for v in &layout.volumes {
        let kind = match v.filesystem.as_ref().map(|f| f.kind) {
            Some(FsKind::Swap) => {
                ok_output.push_str(&format!("== swap on {}: not a filesystem, not checked\n", place_text(v)));
                continue;
            }
            Some(FsKind::LvmPv) => {
                ok_output.push_str(&format!("== LVM physical volume on {}: its logical volumes are checked one by one\n", place_text(v)));
                continue;
            }
            Some(FsKind::Xfs) => Some(Kind::Xfs),
            Some(FsKind::Vfat) => Some(Kind::Vfat),
            Some(FsKind::Btrfs) => Some(Kind::Btrfs),
            Some(k @ (FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4)) => Some(Kind::Ext(k)),
            None => boot_sector_kind(disk.file, v),
        };
        let mut section = String::new();
        let verdict = match kind {
            Some(kind) => check_volume(disk, v, kind, &logs, deadline, &mut section),
            None if holds_data(v) => {
                let what = place_text(v);
                section.push_str(&format!("== {what}: its type says it holds a filesystem, but no known filesystem signature is there\n"));
                let mut why = format!("{what} holds no recognisable filesystem (its superblock is damaged or overwritten)");
                if linux_type(v) {
                    if let Some(verdict) = e2fsck_unknown(disk, v, &logs, deadline, &mut section) {
                        why.push_str(&format!("; e2fsck -n: {verdict}"));
                    }
                }
                Verdict::Failed(why)
            }
            None => {
                section.push_str(&format!("== {}: no filesystem, and its type does not call for one; not checked\n", place_text(v)));
                Verdict::Skipped
            }
        };
        let what = kind.map(|k| fs_text(k.name(), v)).unwrap_or_else(|| place_text(v));
        match verdict {
            Verdict::Clean => {
                clean.push(what);
                ok_output.push_str(&section);
            }
            Verdict::Failed(why) => {
                failed.push(why);
                bad_output.push_str(&section);
            }
            Verdict::NotChecked(why) => {
                not_checked.push(format!("{what} ({why})"));
                ok_output.push_str(&section);
            }
            Verdict::Skipped => ok_output.push_str(&section),
            Verdict::TimeLimit(during) => {
                bad_output.push_str(&section);
                return Outcome::fail(format!("time limit reached during {during}"), &format!("{ok_output}{bad_output}"));
            }
        }
    }
    for s in &layout.skipped {
        not_checked.push(format!("{} ({})", s.what, s.reason));
        ok_output.push_str(&format!("== {}: not checked: {}\n", s.what, s.reason));
    }
    let output = format!("{ok_output}{bad_output}");
    let not_checked_text = if not_checked.is_empty() { String::new() } else { format!("; not checked: {}", not_checked.join(", ")) };
    if !failed.is_empty() {
        let clean_text = if clean.is_empty() { String::new() } else { format!("; clean: {}", clean.join(", ")) };
        return Outcome::fail(format!("{}{clean_text}{not_checked_text}", failed.join("; ")), &output);
    }
    if clean.is_empty() {
        if not_checked.is_empty() {
            let volumes: Vec<String> = layout.volumes.iter().map(Volume::describe).collect();
            let volumes = if volumes.is_empty() { "none".to_string() } else { volumes.join("; ") };
            return Outcome::fail(format!("no filesystem found on the recovery point; volumes: {volumes}"), &output);
        }
        return Outcome::fail(format!("no filesystem could be checked: {}", not_checked.join(", ")), &output);
    }
    let n = clean.len();
    let noun = if n == 1 { "filesystem" } else { "filesystems" };
    Outcome::pass(format!("{n} {noun} clean: {}{not_checked_text}", clean.join(", ")), &output)
}

/// Runs `tool ARGS DEV` for `what`; the run, or the verdict that ends the volume.
fn run_on(tool: &Path, args: &[&str], dev: &str, log: &Path, what: &str, deadline: Instant, section: &mut String) -> Result<Ran, Verdict> {
    let line = format!("$ {} {} {dev}\n", tool.display(), args.join(" "));
    section.push_str(&line);
    let name = tool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Its messages name it as people know it, not by its path.
    match run_tool(Command::new(tool).arg0(&name).args(args).arg(dev), log, false, None, deadline) {
        Ok(ran) => {
            section.push_str(&ran.output);
            if !ran.output.ends_with('\n') && !ran.output.is_empty() {
                section.push('\n');
            }
            if ran.status.is_none() {
                return Err(Verdict::TimeLimit(format!("{name} of {what}")));
            }
            Ok(ran)
        }
        Err(SpawnError::NotFound) => Err(Verdict::NotChecked(format!("{} is not installed", tool.display()))),
        Err(SpawnError::Other(e)) => Err(Verdict::Failed(format!("{what}: {e}"))),
    }
}

/// Replays the journal (on the overlay) and checks one filesystem.
fn check_volume(disk: &Disk, v: &Volume, kind: Kind, logs: &Path, deadline: Instant, section: &mut String) -> Verdict {
    let what = fs_text(kind.name(), v);
    section.push_str(&format!("== {what}\n"));
    if Instant::now() >= deadline {
        return Verdict::TimeLimit(format!("fsck, before checking {what}"));
    }
    let (tool_name, package) = kind.tool();
    let Some(tool) = which(tool_name) else {
        section.push_str(&format!("not checked: {tool_name} is not installed (Debian package {package})\n"));
        return Verdict::NotChecked(format!("{tool_name} is not installed; Debian package {package}"));
    };
    let dev = match attach(disk.file, v.start_bytes, v.size_bytes) {
        Ok(d) => d,
        Err(e) => return Verdict::Failed(format!("cannot attach {what} to a loop device: {}", chain(&e))),
    };
    let log = logs.join(format!("fsck-{}.log", slug(v)));
    // Journal replay on the overlay, so that a crash-consistent image is not
    // reported as damaged.
    match kind {
        Kind::Ext(FsKind::Ext3 | FsKind::Ext4) => {
            section.push_str("replaying the journal (on the overlay):\n");
            let replay_log = logs.join(format!("replay-{}.log", slug(v)));
            match run_on(&tool, &["-E", "journal_only", "-y"], &dev.0, &replay_log, &what, deadline, section) {
                Ok(ran) if ran.status.and_then(|s| s.code()).is_some_and(|c| c <= 2) => {}
                Ok(ran) => section.push_str(&format!("journal replay: {} ({}); checking anyway\n", ran.how(), kind.meaning(ran.status.and_then(|s| s.code()).unwrap_or(8)))),
                Err(verdict) => return verdict,
            }
        }
        Kind::Xfs | Kind::Vfat => {
            let point = disk.work.join("fsck-mnt");
            let fs_kind = if kind == Kind::Xfs { FsKind::Xfs } else { FsKind::Vfat };
            match mount(&dev.0, &point, fs_kind, false) {
                Ok(m) => {
                    drop(m);
                    section.push_str("mounted and unmounted on the overlay (log replay, dirty flag cleared)\n");
                }
                Err(e) => {
                    let why = if kind == Kind::Xfs { "replay its log" } else { "clear its dirty flag" };
                    section.push_str(&format!("mounting it to {why} failed ({}); checking anyway\n", chain(&e)));
                }
            }
            let _ = std::fs::remove_dir(&point);
        }
        _ => {}
    }
    let ran = match run_on(&tool, kind.check_args(), &dev.0, &log, &what, deadline, section) {
        Ok(ran) => ran,
        Err(verdict) => return verdict,
    };
    let code = ran.status.and_then(|s| s.code());
    match code {
        Some(0) => {
            section.push_str("=> clean\n");
            Verdict::Clean
        }
        Some(c) => {
            let meaning = kind.meaning(c);
            section.push_str(&format!("=> {meaning} (exit {c})\n"));
            Verdict::Failed(format!("{what}: {tool_name} {} reports {meaning} (exit {c})", kind.check_args().join(" ")))
        }
        None => Verdict::Failed(format!("{what}: {tool_name} {}", ran.how())),
    }
}

/// `e2fsck -n` on a Linux volume without a recognised filesystem, so the
/// output shows e2fsck's own complaint; its verdict in words.
fn e2fsck_unknown(disk: &Disk, v: &Volume, logs: &Path, deadline: Instant, section: &mut String) -> Option<String> {
    let tool = which("e2fsck")?;
    let dev = attach(disk.file, v.start_bytes, v.size_bytes).ok()?;
    let log = logs.join(format!("fsck-{}.log", slug(v)));
    let ran = run_on(&tool, &["-n"], &dev.0, &log, &place_text(v), deadline, section).ok()?;
    let code = ran.status.and_then(|s| s.code())?;
    // Its first complaint, without the version banner and the function name.
    let first = ran.output.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("e2fsck ")).unwrap_or_default();
    let first = first.split_once(": ").filter(|(f, _)| !f.contains(' ')).map_or(first, |(_, rest)| rest).to_string();
    let meaning = Kind::Ext(FsKind::Ext4).meaning(code);
    Some(if first.is_empty() { format!("{meaning} (exit {code})") } else { format!("{first} ({meaning}, exit {code})") })
}
