//! /etc/fstab: entries that name a device by its kernel name (/dev/sda1,
//! /dev/nvme0n1p2, /dev/cciss/c0d0p1, ...) are rewritten to `UUID=` of the
//! filesystem the source server had under that name, since the VM's disks get
//! other names (/dev/vda). Everything else on the line (options, spacing,
//! comments) is kept.

use super::layout::NamedVolume;
use super::report::Action;
use super::superblock::FsKind;
use super::Edit;

/// Removes the leading characters matching `f`; `None` if there were none.
fn strip_some(s: &str, f: impl Fn(char) -> bool) -> Option<&str> {
    let rest = s.trim_start_matches(f);
    (rest.len() < s.len()).then_some(rest)
}

/// `digits` or `digits p digits` (a disk number and an optional partition).
fn disk_and_partition(s: &str) -> bool {
    match strip_some(s, |c| c.is_ascii_digit()) {
        Some("") => true,
        Some(rest) => rest.strip_prefix('p').and_then(|r| strip_some(r, |c| c.is_ascii_digit())) == Some(""),
        None => false,
    }
}

/// Whether `dev` is a kernel device name of a disk or partition, which depends
/// on the hardware and its probing order.
pub fn is_kernel_name(dev: &str) -> bool {
    let Some(rest) = dev.strip_prefix("/dev/") else { return false };
    for prefix in ["xvd", "sd", "hd", "vd"] {
        if let Some(r) = rest.strip_prefix(prefix) {
            if let Some(r) = strip_some(r, |c| c.is_ascii_lowercase()) {
                return r.chars().all(|c| c.is_ascii_digit());
            }
        }
    }
    if let Some(r) = rest.strip_prefix("nvme") {
        // nvme0n1, nvme0n1p2
        return strip_some(r, |c| c.is_ascii_digit()).and_then(|r| r.strip_prefix('n')).is_some_and(disk_and_partition);
    }
    if let Some(r) = rest.strip_prefix("mmcblk") {
        return disk_and_partition(r);
    }
    for dir in ["cciss/", "ida/", "rd/"] {
        // cciss/c0d0, cciss/c0d0p1
        if let Some(r) = rest.strip_prefix(dir).and_then(|r| r.strip_prefix('c')) {
            return strip_some(r, |c| c.is_ascii_digit()).and_then(|r| r.strip_prefix('d')).is_some_and(disk_and_partition);
        }
    }
    false
}

/// Whether an fstab type fits the filesystem found.
fn type_fits(fstab_type: &str, kind: FsKind) -> bool {
    match fstab_type {
        "auto" | "" => true,
        "ext2" | "ext3" | "ext4" => matches!(kind, FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4),
        "vfat" | "msdos" | "fat" | "umsdos" => kind == FsKind::Vfat,
        other => other == kind.name(),
    }
}

/// Rewrites the fstab `text`, given the device names the source server used
/// for the volumes of its disks.
pub fn rewrite_fstab(text: &str, volumes: &[NamedVolume]) -> Edit {
    let mut edit = Edit::default();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let lineno = n + 1;
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            edit.text.push_str(line);
            continue;
        }
        let indent = &line[..line.len() - body.len()];
        let spec_len = body.find(char::is_whitespace).unwrap_or(body.len());
        let (spec, rest) = body.split_at(spec_len);
        let mut fields = rest.split_whitespace();
        let (mount, fstype) = (fields.next().unwrap_or("?"), fields.next().unwrap_or(""));
        let entry = format!("line {lineno} ({spec} on {mount})");
        if let Some(uuid) = spec.strip_prefix("UUID=") {
            let uuid = uuid.trim_matches('"');
            match volumes.iter().find(|v| v.volume.filesystem.as_ref().and_then(|f| f.uuid.as_deref()).is_some_and(|u| u.eq_ignore_ascii_case(uuid))) {
                Some(v) => edit.notes.push((Action::Checked, format!("{entry}: UUID is {}", v.volume.describe()))),
                None => edit.notes.push((
                    Action::Warning,
                    format!("{entry}: no volume of the recovered disk has this UUID (a disk that was not recovered, or a filesystem made since); add nofail if the VM must boot without it"),
                )),
            }
            edit.text.push_str(line);
            continue;
        }
        let named = volumes.iter().find(|v| v.device == spec);
        if !is_kernel_name(spec) {
            if spec.starts_with("/dev/disk/by-id/") || spec.starts_with("/dev/disk/by-path/") {
                edit.notes.push((Action::Warning, format!("{entry}: names hardware by its id or bus path, which the VM does not have; not rewritten")));
            } else if spec.starts_with("/dev/") || spec.contains('=') {
                let how = if named.is_some() { "a name LVM or udev gives in the VM too" } else { "a stable name" };
                edit.notes.push((Action::LeftAlone, format!("{entry}: {how}")));
            }
            edit.text.push_str(line);
            continue;
        }
        let Some(named) = named else {
            edit.notes.push((Action::LeftAlone, format!("{entry}: no recovered volume was {spec} on the source (another disk?); the VM will not find it")));
            edit.text.push_str(line);
            continue;
        };
        let volume = &named.volume;
        let Some(fs) = &volume.filesystem else {
            edit.notes.push((Action::LeftAlone, format!("{entry}: {spec} was {}, on which no filesystem was recognised", volume.describe())));
            edit.text.push_str(line);
            continue;
        };
        if !type_fits(fstype, fs.kind) {
            edit.notes.push((Action::LeftAlone, format!("{entry}: fstab says {fstype} but {spec} holds {}", fs.kind.name())));
            edit.text.push_str(line);
            continue;
        }
        let Some(uuid) = &fs.uuid else {
            edit.notes.push((Action::LeftAlone, format!("{entry}: the {} on {spec} has no UUID", fs.kind.name())));
            edit.text.push_str(line);
            continue;
        };
        edit.text.push_str(indent);
        edit.text.push_str("UUID=");
        edit.text.push_str(uuid);
        edit.text.push_str(rest);
        edit.changes.push(format!("line {lineno}: {spec} -> UUID={uuid} ({}) for {mount}", volume.describe()));
    }
    edit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::layout::{Place, TableKind, Volume};
    use crate::adapt::superblock::Filesystem;

    fn vol(device: &str, kind: FsKind, uuid: &str) -> NamedVolume {
        NamedVolume {
            device: device.into(),
            volume: Volume {
                place: Place::Partition { table: TableKind::Mbr, number: 1, type_id: "0x83".into(), type_name: None },
                start_bytes: 1 << 20,
                size_bytes: 1 << 30,
                filesystem: Some(Filesystem { kind, uuid: Some(uuid.into()), label: None }),
            },
        }
    }

    #[test]
    fn kernel_names() {
        for yes in ["/dev/sda", "/dev/sda1", "/dev/sdab12", "/dev/hda2", "/dev/vdb", "/dev/xvda1", "/dev/nvme0n1", "/dev/nvme0n1p2", "/dev/nvme10n2p15", "/dev/mmcblk0p1", "/dev/cciss/c0d0p1", "/dev/cciss/c0d1"] {
            assert!(is_kernel_name(yes), "{yes}");
        }
        for no in ["/dev/mapper/vg-root", "/dev/vg0/root", "UUID=x", "/dev/disk/by-uuid/x", "/dev/sd", "/dev/sda1x", "/dev/nvme0", "/dev/nvme0n1q", "proc", "/dev/md0", "/dev/cciss/c0"] {
            assert!(!is_kernel_name(no), "{no}");
        }
    }

    #[test]
    fn rewrites_kernel_names_and_keeps_the_rest() {
        let text = "# /etc/fstab: static file system information.\n\
                    /dev/sda1 / ext4 errors=remount-ro 0 1\n\
                    \t/dev/sda5   none   swap   sw   0   0\n\
                    /dev/sdb1 /data xfs defaults 0 2\n\
                    /dev/sda6 /srv xfs defaults 0 2\n\
                    UUID=b184cb03-35e7-4447-9bc2-aacd6cef902f /x ext4 defaults 0 0\n\
                    /dev/mapper/vg0-home /home ext4 defaults 0 2\n\
                    proc /proc proc defaults 0 0\n\
                    /dev/sda7 /noeol ext4 defaults";
        let vols = [
            vol("/dev/sda1", FsKind::Ext4, "b184cb03-35e7-4447-9bc2-aacd6cef902f"),
            vol("/dev/sda5", FsKind::Swap, "2222"),
            vol("/dev/sda6", FsKind::Ext4, "6666"),
            vol("/dev/sda7", FsKind::Ext3, "7777"),
        ];
        let e = rewrite_fstab(text, &vols);
        let lines: Vec<&str> = e.text.lines().collect();
        assert_eq!(lines[0], "# /etc/fstab: static file system information.");
        assert_eq!(lines[1], "UUID=b184cb03-35e7-4447-9bc2-aacd6cef902f / ext4 errors=remount-ro 0 1");
        assert_eq!(lines[2], "\tUUID=2222   none   swap   sw   0   0");
        assert_eq!(lines[3], "/dev/sdb1 /data xfs defaults 0 2", "unknown device left alone");
        assert_eq!(lines[4], "/dev/sda6 /srv xfs defaults 0 2", "type mismatch left alone");
        assert_eq!(lines[8], "UUID=7777 /noeol ext4 defaults");
        assert!(!e.text.ends_with('\n'));
        assert_eq!(e.changes.len(), 3, "{:?}", e.changes);
        let notes: Vec<&str> = e.notes.iter().map(|(_, n)| n.as_str()).collect();
        assert!(notes.iter().any(|n| n.contains("/dev/sdb1") && n.contains("no recovered volume")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("/dev/sda6") && n.contains("says xfs")), "{notes:?}");
        assert!(e.notes.iter().any(|(a, n)| *a == Action::Checked && n.contains("UUID is")), "{notes:?}");
        // Rewriting again changes nothing.
        let again = rewrite_fstab(&e.text, &vols);
        assert!(again.changes.is_empty());
        assert_eq!(again.text, e.text);
    }
}
