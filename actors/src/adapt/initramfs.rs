//! Kernels, their initramfs, and whether the initramfs can boot from virtio.
//!
//! An initramfs is one or more cpio archives ("newc", magic `070701`, or
//! `070702` with checksums) one after the other, separated by zero padding;
//! the first ones are often uncompressed (early CPU microcode), the last one
//! compressed. This module reads uncompressed, gzip and zstd parts as streams,
//! without unpacking anything: it keeps only the names of kernel modules. The
//! decompressed size and the number of entries are bounded; xz, lz4, lzma,
//! bzip2 and lzo parts are reported as unknown compression.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, BufRead, Read};

use serde::Serialize;

use super::report::Action;
use super::rootdir::{EntryKind, RootDir};
use super::Edit;

/// The drivers an initramfs needs to find its root on a virtio disk and
/// bring up a virtio NIC.
pub const VIRTIO_REQUIRED: [&str; 3] = ["virtio_blk", "virtio_pci", "virtio_net"];
/// The drivers added when some are missing (virtio_scsi too, for VMs whose
/// disks are virtio-scsi).
pub const VIRTIO_ADDED: [&str; 4] = ["virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"];

/// Bounds on reading an initramfs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes of cpio data read in all (decompressed).
    pub bytes_max: u64,
    /// Most archive entries read in all.
    pub entries_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // A large distribution initramfs is a few hundred MB unpacked.
        Limits { bytes_max: 4 << 30, entries_max: 2_000_000 }
    }
}

/// How a part of an initramfs is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain cpio.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// What an initramfs holds, as far as this module cares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Contents {
    /// Its parts in order: each one's compression and number of archives.
    pub parts: Vec<(Compression, u32)>,
    /// Entries read in all.
    pub entries: u64,
    /// Kernel modules found (file name without .ko…, '-' as '_').
    pub modules: BTreeSet<String>,
}

/// Why an initramfs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading or decompressing failed.
    #[error("reading it failed: {0}")]
    Io(#[from] io::Error),
    /// A part is compressed in a way this module does not read.
    #[error("at byte {offset} it holds {name} data, which drmesh does not read (it reads uncompressed, gzip and zstd parts)")]
    UnknownCompression {
        /// The compression, or the first bytes when unknown.
        name: String,
        /// Where the part starts in the file.
        offset: u64,
    },
    /// A cpio header or entry is malformed.
    #[error("malformed cpio archive at byte {offset}{within}: {reason}")]
    Malformed {
        /// Where, in the file or in the decompressed part.
        offset: u64,
        /// " of the gzip part" etc., or empty.
        within: String,
        /// What is wrong.
        reason: String,
    },
    /// A bound of [`Limits`] was reached.
    #[error("larger than the limit of {0}; not read further")]
    TooLarge(String),
}

/// A reader with lookahead that counts what it consumed and refuses to read
/// past a limit.
struct Stream<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    consumed: u64,
    limit: u64,
}

impl<R: Read> Stream<R> {
    fn new(inner: R, limit: u64) -> Self {
        Stream { inner, buf: vec![0; 64 << 10], pos: 0, end: 0, consumed: 0, limit }
    }

    /// Up to `n` (≤ 64 KiB) next bytes without consuming them; fewer only at the end.
    fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.end - self.pos < n {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            while self.end < n {
                let got = self.inner.read(&mut self.buf[self.end..])?;
                if got == 0 {
                    break;
                }
                self.end += got;
            }
        }
        Ok(&self.buf[self.pos..self.end.min(self.pos + n)])
    }

    fn over_limit(&self) -> bool {
        self.consumed > self.limit
    }

    /// Skips `n` bytes; returns how many were there.
    fn skip(&mut self, mut n: u64) -> io::Result<u64> {
        let want = n;
        while n > 0 {
            let avail = self.fill_buf()?.len() as u64;
            if avail == 0 {
                break;
            }
            let take = avail.min(n);
            self.consume(take as usize);
            n -= take;
            if self.over_limit() {
                break;
            }
        }
        Ok(want - n)
    }
}

impl<R: Read> Read for Stream<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for Stream<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = self.inner.read(&mut self.buf)?;
        }
        Ok(&self.buf[self.pos..self.end])
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.end - self.pos);
        self.pos += n;
        self.consumed += n as u64;
    }
}

/// Where the scanner is, for messages.
#[derive(Clone, Copy)]
enum Within {
    File,
    Part(Compression),
}

impl Within {
    fn text(self) -> String {
        match self {
            Within::File => String::new(),
            Within::Part(c) => format!(" of the decompressed {} part", c.name()),
        }
    }
}

fn hex_field(header: &[u8], index: usize) -> Option<u64> {
    let field = header.get(6 + 8 * index..6 + 8 * (index + 1))?;
    u64::from_str_radix(std::str::from_utf8(field).ok()?, 16).ok()
}

/// The module name of a cpio entry, if it is a kernel module file.
fn module_name(path: &str) -> Option<String> {
    if !path.contains("lib/modules/") {
        return None;
    }
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file.strip_suffix(ext))?;
    (!stem.is_empty()).then(|| stem.replace('-', "_"))
}

/// Reads cpio archives (and the zero padding between them) until the end of
/// `s` or until data that is no cpio archive; returns the archives read and
/// whether it stopped at such data.
fn scan_archives<R: Read>(s: &mut Stream<R>, within: Within, limits: &Limits, contents: &mut Contents) -> Result<(u32, bool), InitramfsError> {
    let malformed = |offset: u64, reason: &str| InitramfsError::Malformed { offset, within: within.text(), reason: reason.to_string() };
    let mut archives = 0u32;
    loop {
        // Zero padding between archives.
        loop {
            let buf = s.fill_buf()?;
            if buf.is_empty() {
                return Ok((archives, false));
            }
            let zeros = buf.iter().take_while(|&&b| b == 0).count();
            if zeros == 0 {
                break;
            }
            s.consume(zeros);
            if s.over_limit() {
                return Err(InitramfsError::TooLarge(format!("{} bytes", limits.bytes_max)));
            }
        }
        if !s.peek(6)?.starts_with(b"07070") {
            return Ok((archives, true));
        }
        archives += 1;
        // One archive: entries up to TRAILER!!!.
        loop {
            let at = s.consumed;
            let mut header = [0u8; 110];
            s.read_exact(&mut header).map_err(|_| malformed(at, "truncated header"))?;
            if &header[..6] != b"070701" && &header[..6] != b"070702" {
                return Err(malformed(at, "bad header magic"));
            }
            let (Some(mode), Some(file_bytes), Some(name_bytes)) = (hex_field(&header, 1), hex_field(&header, 6), hex_field(&header, 11)) else {
                return Err(malformed(at, "header field is not hex"));
            };
            if name_bytes == 0 || name_bytes > 4096 {
                return Err(malformed(at, "name length out of range"));
            }
            let mut name = vec![0u8; name_bytes as usize];
            s.read_exact(&mut name).map_err(|_| malformed(at, "truncated name"))?;
            let name_pad = (4 - (110 + name_bytes) % 4) % 4;
            if s.skip(name_pad)? != name_pad {
                return Err(malformed(at, "truncated name padding"));
            }
            let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(&name)).into_owned();
            contents.entries += 1;
            if contents.entries > limits.entries_max {
                return Err(InitramfsError::TooLarge(format!("{} entries", limits.entries_max)));
            }
            if name == "TRAILER!!!" {
                break;
            }
            if mode & 0o170000 == 0o100000 {
                if let Some(m) = module_name(&name) {
                    contents.modules.insert(m);
                }
            }
            let data = file_bytes + (4 - file_bytes % 4) % 4;
            if s.skip(data)? != data {
                if s.over_limit() {
                    return Err(InitramfsError::TooLarge(format!("{} bytes", limits.bytes_max)));
                }
                return Err(malformed(at, &format!("entry {name} is truncated")));
            }
            if s.over_limit() {
                return Err(InitramfsError::TooLarge(format!("{} bytes", limits.bytes_max)));
            }
        }
    }
}

/// Names a compression from a part's first bytes.
fn compression_name(magic: &[u8]) -> Option<&'static str> {
    let known: [(&[u8], &'static str); 7] = [
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
        (&[0x02, 0x21, 0x4c, 0x18], "lz4 (legacy)"),
        (&[0x04, 0x22, 0x4d, 0x18], "lz4"),
        (b"BZh", "bzip2"),
        (&[0x89, b'L', b'Z', b'O'], "lzo"),
        (&[0x5d, 0, 0], "lzma"),
        (&[0x1f, 0x9e], "old gzip"),
    ];
    known.iter().find(|(m, _)| magic.starts_with(m)).map(|(_, n)| *n)
}

/// Reads an initramfs from `reader` and lists its parts and kernel modules.
pub fn scan<R: Read>(reader: R, limits: &Limits) -> Result<Contents, InitramfsError> {
    let mut contents = Contents::default();
    let mut file = Stream::new(reader, u64::MAX);
    let mut budget = limits.bytes_max;
    loop {
        let (archives, more) = scan_archives(&mut file, Within::File, limits, &mut contents)?;
        if archives > 0 {
            contents.parts.push((Compression::None, archives));
        }
        if !more {
            return Ok(contents);
        }
        let offset = file.consumed;
        let magic = file.peek(8)?.to_vec();
        let compression = if magic.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            let name = match compression_name(&magic) {
                Some(n) => n.to_string(),
                None => format!("unknown (first bytes {})", magic.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")),
            };
            return Err(InitramfsError::UnknownCompression { name, offset });
        };
        let used = match compression {
            Compression::Gzip => {
                let decoder = flate2::bufread::GzDecoder::new(&mut file);
                scan_part(decoder, compression, budget, limits, &mut contents)?
            }
            _ => {
                let decoder = zstd::stream::read::Decoder::with_buffer(&mut file)?.single_frame();
                scan_part(decoder, compression, budget, limits, &mut contents)?
            }
        };
        budget = budget.saturating_sub(used);
    }
}

/// Scans one decompressed part; returns its decompressed size.
fn scan_part<R: Read>(decoder: R, compression: Compression, budget: u64, limits: &Limits, contents: &mut Contents) -> Result<u64, InitramfsError> {
    let mut part = Stream::new(decoder, budget);
    let (archives, more) = scan_archives(&mut part, Within::Part(compression), limits, contents)?;
    if more {
        return Err(InitramfsError::Malformed {
            offset: part.consumed,
            within: Within::Part(compression).text(),
            reason: "data that is no cpio archive".into(),
        });
    }
    contents.parts.push((compression, archives));
    Ok(part.consumed)
}

/// Where a virtio driver is for one kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverState {
    /// Built into the kernel (listed in modules.builtin).
    BuiltIn,
    /// A module inside the initramfs.
    InInitramfs,
    /// A module on disk, not in the initramfs: a rebuild adds it.
    Missing,
    /// Neither built in nor a module of this kernel: no rebuild can add it.
    NotInKernel,
    /// The initramfs could not be read.
    Unknown,
}

/// One installed kernel and the virtio drivers of its initramfs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelCheck {
    /// Kernel version (`uname -r`).
    pub version: String,
    /// Its initramfs inside the image, if one was found.
    pub initramfs: Option<String>,
    /// The initramfs's parts (compression and number of archives).
    pub parts: Vec<(Compression, u32)>,
    /// Each driver of [`VIRTIO_REQUIRED`].
    pub drivers: BTreeMap<String, DriverState>,
    /// Why the initramfs could not be read, if it could not.
    pub error: Option<String>,
    /// Seconds the rebuild took, if it was rebuilt.
    pub rebuild_seconds: Option<f64>,
}

impl KernelCheck {
    /// Whether every required driver is built in or in the initramfs.
    pub fn ready(&self) -> bool {
        self.drivers.values().all(|s| matches!(s, DriverState::BuiltIn | DriverState::InInitramfs))
    }

    /// Whether a rebuild could help: a driver missing from (or not known to
    /// be in) the initramfs that the kernel has as a module.
    pub fn needs_rebuild(&self) -> bool {
        self.initramfs.is_some() && self.drivers.values().any(|s| matches!(s, DriverState::Missing | DriverState::Unknown))
    }

    /// Drivers in a given state.
    pub fn drivers_in(&self, state: DriverState) -> Vec<&str> {
        self.drivers.iter().filter(|(_, s)| **s == state).map(|(n, _)| n.as_str()).collect()
    }
}

impl fmt::Display for KernelCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.version)?;
        match &self.initramfs {
            Some(p) => {
                let parts: Vec<&str> = self.parts.iter().map(|(c, _)| c.name()).collect();
                write!(f, "/{} ({})", p.trim_start_matches('/'), if parts.is_empty() { "unread".to_string() } else { parts.join(" + ") })?;
            }
            None => write!(f, "no initramfs")?,
        }
        let drivers: Vec<String> = self
            .drivers
            .iter()
            .map(|(n, s)| {
                let s = match s {
                    DriverState::BuiltIn => "built in",
                    DriverState::InInitramfs => "in initramfs",
                    DriverState::Missing => "MISSING",
                    DriverState::NotInKernel => "NOT IN KERNEL",
                    DriverState::Unknown => "unknown",
                };
                format!("{n} {s}")
            })
            .collect();
        write!(f, "; {}", drivers.join(", "))?;
        if let Some(s) = self.rebuild_seconds {
            write!(f, "; rebuilt in {s:.1} s")?;
        }
        if let Some(e) = &self.error {
            write!(f, "; {e}")?;
        }
        Ok(())
    }
}

/// Module names listed in a modules.builtin or modules.dep text (the part
/// before ':' on each line).
fn module_names(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(|l| module_name(&format!("lib/modules/{}", l.split(':').next()?.trim()))).collect()
}

/// The kernel versions installed in the image's /boot (vmlinuz-VERSION).
pub(crate) fn kernel_versions(root: &RootDir) -> std::io::Result<Vec<String>> {
    let entries = root.list("boot")?.unwrap_or_default();
    Ok(entries
        .into_iter()
        .filter(|e| matches!(e.kind, EntryKind::File | EntryKind::Symlink))
        .filter_map(|e| e.name.strip_prefix("vmlinuz-").map(str::to_string))
        .filter(|v| !v.is_empty() && !v.ends_with(".drmesh-orig"))
        .collect())
}

/// Where the initramfs of kernel `version` is: Debian/Ubuntu, Fedora/RHEL
/// (dracut) and SUSE names.
pub(crate) fn initramfs_path(root: &RootDir, version: &str) -> Option<String> {
    [format!("boot/initrd.img-{version}"), format!("boot/initramfs-{version}.img"), format!("boot/initrd-{version}")].into_iter().find(|p| root.exists(p))
}

/// Checks the initramfs of kernel `version`.
pub(crate) fn check_kernel(root: &RootDir, version: &str, limits: &Limits) -> KernelCheck {
    let mut check = KernelCheck { version: version.to_string(), initramfs: None, parts: Vec::new(), drivers: BTreeMap::new(), error: None, rebuild_seconds: None };
    let modules_dir = format!("lib/modules/{version}");
    let read_list = |name: &str| root.read(&format!("{modules_dir}/{name}"), 64 << 20).ok().flatten().map(|b| module_names(&String::from_utf8_lossy(&b)));
    let builtin = read_list("modules.builtin").unwrap_or_default();
    let on_disk = read_list("modules.dep");
    check.initramfs = initramfs_path(root, version);
    let contents = match &check.initramfs {
        None => {
            check.error = Some("no initramfs found (looked for /boot/initrd.img-V, /boot/initramfs-V.img, /boot/initrd-V)".into());
            None
        }
        Some(path) => match root.open_file(path) {
            Ok(Some(file)) => match scan(file, limits) {
                Ok(c) => {
                    check.parts = c.parts.clone();
                    Some(c)
                }
                Err(e) => {
                    check.error = Some(format!("/{path}: {e}"));
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                check.error = Some(format!("/{path}: {e}"));
                None
            }
        },
    };
    for driver in VIRTIO_REQUIRED {
        let state = if builtin.contains(driver) {
            DriverState::BuiltIn
        } else if contents.as_ref().is_some_and(|c| c.modules.contains(driver)) {
            DriverState::InInitramfs
        } else if on_disk.as_ref().is_some_and(|d| !d.contains(driver)) {
            DriverState::NotInKernel
        } else if contents.is_some() {
            DriverState::Missing
        } else {
            DriverState::Unknown
        };
        check.drivers.insert(driver.to_string(), state);
    }
    check
}

/// Adds the drivers of [`VIRTIO_ADDED`] that initramfs-tools' modules file
/// (`text`) does not list yet.
pub fn add_initramfs_tools_modules(text: &str) -> Edit {
    let listed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.split('#').next()?.split_whitespace().next())
        .map(|m| m.replace('-', "_"))
        .collect();
    let mut edit = Edit { text: text.to_string(), ..Edit::default() };
    let missing: Vec<&str> = VIRTIO_ADDED.iter().copied().filter(|m| !listed.contains(*m)).collect();
    if missing.is_empty() {
        edit.notes.push((Action::Checked, "already lists the virtio drivers".into()));
        return edit;
    }
    if !edit.text.is_empty() && !edit.text.ends_with('\n') {
        edit.text.push('\n');
    }
    edit.text.push_str("# drmesh recovery: virtio drivers, so that the initramfs finds its root in a VM\n");
    for m in &missing {
        edit.text.push_str(m);
        edit.text.push('\n');
    }
    edit.changes.push(format!("added {}", missing.join(", ")));
    edit
}

/// The dracut configuration file written for dracut systems.
pub const DRACUT_CONF: &str = "etc/dracut.conf.d/drmesh-virtio.conf";

/// Its content.
pub fn dracut_conf() -> String {
    format!("# drmesh recovery: virtio drivers, so that the initramfs finds its root in a VM\nadd_drivers+=\" {} \"\n", VIRTIO_ADDED.join(" "))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A newc archive of `(path, data)` files plus the trailer.
    pub(crate) fn cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut entry = |name: &str, mode: u32, data: &[u8]| {
            let header = format!("070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}", 1, mode, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0);
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
        for (name, data) in files {
            entry(name, 0o100644, data);
        }
        entry("TRAILER!!!", 0, b"");
        while out.len() % 512 != 0 {
            out.push(0);
        }
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn early_microcode_then_compressed_main() {
        let early = cpio(&[("kernel/x86/microcode/GenuineIntel.bin", b"ucode")]);
        let main = cpio(&[
            ("usr/lib/modules/6.1.0-57-amd64/kernel/drivers/block/virtio_blk.ko", b"elf"),
            ("lib/modules/6.1.0/kernel/drivers/net/virtio_net.ko.zst", b"elf"),
            ("lib/modules/6.1.0/kernel/drivers/scsi/sd_mod.ko.xz", &[0u8; 1000]),
            ("etc/modules.ko", b"not under lib/modules"),
        ]);
        for (compression, packed) in [(Compression::Gzip, gzip(&main)), (Compression::Zstd, zstd::encode_all(main.as_slice(), 1).unwrap()), (Compression::None, main.clone())] {
            let mut image = early.clone();
            image.extend_from_slice(&packed);
            let c = scan(image.as_slice(), &Limits::default()).unwrap();
            let want: BTreeSet<String> = ["virtio_blk", "virtio_net", "sd_mod"].iter().map(|s| s.to_string()).collect();
            assert_eq!(c.modules, want);
            if compression == Compression::None {
                assert_eq!(c.parts, vec![(Compression::None, 2)]);
            } else {
                assert_eq!(c.parts, vec![(Compression::None, 1), (compression, 1)]);
            }
        }
    }

    #[test]
    fn unknown_compression_and_limits() {
        let mut image = cpio(&[("a", b"b")]);
        image.extend_from_slice(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2]);
        match scan(image.as_slice(), &Limits::default()) {
            Err(InitramfsError::UnknownCompression { name, offset }) => assert_eq!((name.as_str(), offset), ("xz", 512)),
            other => panic!("{other:?}"),
        }
        let big = cpio(&[("f", &[7u8; 100_000])]);
        let packed = zstd::encode_all(big.as_slice(), 1).unwrap();
        let small = Limits { bytes_max: 50_000, entries_max: 10 };
        assert!(matches!(scan(packed.as_slice(), &small), Err(InitramfsError::TooLarge(_))));
        let many = cpio(&[("a", b""), ("b", b""), ("c", b"")]);
        assert!(matches!(scan(many.as_slice(), &Limits { bytes_max: 1 << 20, entries_max: 2 }), Err(InitramfsError::TooLarge(_))));
        let mut truncated = cpio(&[("a", &[1u8; 600])]);
        truncated.truncate(300);
        assert!(matches!(scan(truncated.as_slice(), &Limits::default()), Err(InitramfsError::Malformed { .. })));
        assert_eq!(scan(&[][..], &Limits::default()).unwrap(), Contents::default());
    }

    #[test]
    fn modules_file_gets_the_missing_drivers() {
        let e = add_initramfs_tools_modules("# comment\nahci\nvirtio-blk\n");
        assert_eq!(e.text, "# comment\nahci\nvirtio-blk\n# drmesh recovery: virtio drivers, so that the initramfs finds its root in a VM\nvirtio_pci\nvirtio_scsi\nvirtio_net\n");
        assert!(add_initramfs_tools_modules(&e.text).changes.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_scan_without_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000), prefix in 0u8..3) {
            let mut image = match prefix { 0 => b"070701".to_vec(), 1 => vec![0x28, 0xb5, 0x2f, 0xfd], _ => vec![] };
            image.extend_from_slice(&data);
            let _ = scan(image.as_slice(), &Limits { bytes_max: 1 << 20, entries_max: 1000 });
        }
    }
}
