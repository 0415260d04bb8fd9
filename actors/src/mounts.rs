//! The mount table of this machine (`/proc/self/mountinfo`), read for the one
//! question drmesh asks of it: is a block device mounted, and where. Restores
//! refuse a mounted destination; snapshots say whether a filesystem was frozen.

use std::fs;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::PathBuf;

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted (mountinfo's octal escapes undone).
    pub point: PathBuf,
    /// The filesystem type (`ext4`, `xfs`).
    pub fs_type: String,
}

/// Parses a "MAJOR:MINOR" pair as mountinfo and sysfs write it.
pub fn parse_dev(text: &str) -> Option<u64> {
    let (ma, mi) = text.split_once(':')?;
    Some(nix::sys::stat::makedev(ma.parse().ok()?, mi.parse().ok()?))
}

/// The first mount of a filesystem on any of `devs` (dev_t numbers), matched
/// by the device number mountinfo gives or by its source being that block
/// device; `None` when none is mounted or the table cannot be read.
pub fn mounted(devs: &[u64]) -> Option<Mount> {
    let table = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let same = |path: &str| fs::metadata(path).map(|m| m.file_type().is_block_device() && devs.contains(&m.rdev())).unwrap_or(false);
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let (dev, point) = (fields.get(2)?, fields.get(4)?);
        let mut rest = line.split(" - ").nth(1)?.split(' ');
        let (fs_type, source) = (rest.next().unwrap_or(""), rest.next().unwrap_or(""));
        let hit = parse_dev(dev).is_some_and(|d| devs.contains(&d)) || (source.starts_with('/') && same(source));
        hit.then(|| Mount { point: PathBuf::from(unescape(point)), fs_type: fs_type.to_string() })
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape(r"/mnt/my\040disk"), "/mnt/my disk");
        assert_eq!(unescape(r"/a\134b\011c"), "/a\\b\tc");
        assert_eq!(unescape(r"/odd\04"), r"/odd\04");
        assert_eq!(unescape(r"/x\999"), r"/x\999");
    }

    #[test]
    fn the_root_filesystem_is_found_by_its_device() {
        let dev = fs::metadata("/").unwrap().dev();
        let m = mounted(&[dev]).expect("/ is mounted");
        assert!(m.point.is_absolute(), "{m:?}");
        assert!(!m.fs_type.is_empty());
        assert_eq!(mounted(&[nix::sys::stat::makedev(4095, 1048575)]), None);
    }
}
