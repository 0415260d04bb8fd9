//! Reading a topology file within [`MAX_TOPOLOGY_BYTES`]: never more than the
//! limit plus one byte is read, whatever the path names (a file that grows
//! while it is read, a pipe, a device), and what is not a file is refused
//! before any read.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::MAX_TOPOLOGY_BYTES;

/// Why the bytes of a topology file could not be had. Nothing was parsed; the
/// caller keeps whatever topology it had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// Opening or reading failed (missing file, no permission, I/O error).
    #[error("cannot read topology file: {0}")]
    Io(#[from] std::io::Error),
    /// The path is a directory.
    #[error("this is a directory; expected the topology file (TOML) itself")]
    Directory,
    /// The path is a device or a socket.
    #[error("this is a {0}, not a file; expected the topology file (TOML)")]
    NotAFile(&'static str),
    /// The file's size, known before reading, is over the limit.
    #[error(
        "the file is {} ({bytes} bytes), over the limit of {} ({MAX_TOPOLOGY_BYTES} bytes) for topology files; it was not parsed. A topology of 16,000 nodes takes about 2.5 MB: check that this is the right file",
        mib(*bytes),
        mib(MAX_TOPOLOGY_BYTES)
    )]
    TooBig {
        /// Size of the file or text.
        bytes: u64,
    },
    /// More than the limit arrived while reading (a pipe, or a file that grew).
    #[error(
        "the file has more than {} ({MAX_TOPOLOGY_BYTES} bytes), the limit for topology files; reading stopped there. A topology of 16,000 nodes takes about 2.5 MB: check that this is the right file",
        mib(MAX_TOPOLOGY_BYTES)
    )]
    GrewTooBig,
}

/// `bytes` in MiB, like "16 MiB" or "79.2 MiB" (the exact figure goes beside it).
fn mib(bytes: u64) -> String {
    // Display only: precision lost above 2^53 bytes does not matter.
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib.fract() == 0.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{mib:.1} MiB")
    }
}

/// The bytes of the file at `path`, at most [`MAX_TOPOLOGY_BYTES`] of them.
pub(crate) fn read_capped(path: &Path) -> Result<Vec<u8>, ReadError> {
    // Opening a pipe waits for a writer, as for any reader; every other kind opens at once.
    let file = File::open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(ReadError::Directory);
    }
    let not_a_file = [
        (kind.is_block_device(), "block device"),
        (kind.is_char_device(), "character device"),
        (kind.is_socket(), "socket"),
    ];
    if let Some((_, what)) = not_a_file.iter().find(|(is, _)| *is) {
        return Err(ReadError::NotAFile(what));
    }
    if kind.is_file() && meta.len() > MAX_TOPOLOGY_BYTES {
        return Err(ReadError::TooBig { bytes: meta.len() });
    }
    // A regular file (that may still grow) or a pipe: one byte past the limit tells "too big".
    let mut bytes = Vec::with_capacity(if kind.is_file() { usize::try_from(meta.len()).unwrap_or(0) + 1 } else { 64 << 10 });
    file.take(MAX_TOPOLOGY_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_TOPOLOGY_BYTES {
        return Err(ReadError::GrewTooBig);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_mib() {
        assert_eq!(mib(16 << 20), "16 MiB");
        assert_eq!(mib(17 << 20), "17 MiB");
        assert_eq!(mib(83 * 1000 * 1000), "79.2 MiB");
    }
}
