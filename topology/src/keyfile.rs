//! Encryption key files named by a policy's `encryption_key_file`.
//!
//! A key file holds exactly 32 raw bytes, or 64 hex characters (a trailing
//! newline is allowed). It must be a regular file that neither group nor others
//! may read or write (`chmod 600`). The key never appears in `Debug` output.

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Most bytes read from a key file; a bigger file is refused unread.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// A 256-bit policy key. `Debug` prints `EncryptionKey(..)`, never the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey([u8; 32]);

impl EncryptionKey {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(..)")
    }
}

/// Checks and reads a key file. The error says what is wrong and how to fix it.
pub fn read_key_file(path: &Path) -> Result<EncryptionKey, String> {
    let shown = path.display();
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("encryption key file {shown} does not exist; expected a 32-byte key file (mode 0600)"));
        }
        Err(e) => return Err(format!("cannot read encryption key file {shown}: {e}")),
    };
    if !meta.is_file() {
        return Err(format!("encryption key file {shown} is not a regular file; expected a 32-byte key file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "encryption key file {shown} has mode {mode:04o}, open to group or others; expected 0600 (run `chmod 600 {shown}`)"
        ));
    }
    // A key is at most 64 hex characters and some white space: no need to read
    // (or hold) more when a policy names some big file by mistake.
    let wrong_size = |len: String| {
        format!("encryption key file {shown} has {len} bytes; expected exactly 32 raw bytes or 64 hex characters")
    };
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(wrong_size(meta.len().to_string()));
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read encryption key file {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(wrong_size(format!("more than {MAX_KEY_FILE_BYTES}")));
    }
    if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
        return Ok(EncryptionKey(raw));
    }
    let text = bytes.trim_ascii();
    if text.len() == 64 && text.iter().all(u8::is_ascii_hexdigit) {
        let mut key = [0u8; 32];
        for (i, pair) in text.chunks(2).enumerate() {
            // Both characters were checked to be hex digits just above.
            key[i] = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
        }
        return Ok(EncryptionKey(key));
    }
    Err(wrong_size(bytes.len().to_string()))
}

fn hex_value(ch: u8) -> u8 {
    match ch {
        b'0'..=b'9' => ch - b'0',
        b'a'..=b'f' => ch - b'a' + 10,
        b'A'..=b'F' => ch - b'A' + 10,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    #[test]
    fn accepts_raw_and_hex_rejects_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.key");
        fs::write(&raw, [7u8; 32]).unwrap();
        fs::set_permissions(&raw, Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key_file(&raw).unwrap().as_bytes(), &[7u8; 32]);

        let hex = dir.path().join("hex.key");
        fs::write(&hex, format!("{}\n", "0a".repeat(32))).unwrap();
        fs::set_permissions(&hex, Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_key_file(&hex).unwrap().as_bytes(), &[10u8; 32]);
        assert_eq!(format!("{:?}", read_key_file(&hex).unwrap()), "EncryptionKey(..)");

        fs::set_permissions(&raw, Permissions::from_mode(0o640)).unwrap();
        assert!(read_key_file(&raw).unwrap_err().contains("mode 0640"));
        assert!(read_key_file(&dir.path().join("none")).unwrap_err().contains("does not exist"));
        assert!(read_key_file(dir.path()).unwrap_err().contains("not a regular file"));

        let big = dir.path().join("big.key");
        fs::write(&big, vec![b'a'; 1 << 20]).unwrap();
        fs::set_permissions(&big, Permissions::from_mode(0o600)).unwrap();
        assert!(read_key_file(&big).unwrap_err().contains("has 1048576 bytes; expected exactly 32 raw bytes"));
    }
}
