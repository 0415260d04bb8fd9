//! Volume names: how a volume is known in topology files, on the wire, in the
//! store's folders and catalog, and in RP names (`NAME@SEQ`).
//!
//! One rule everywhere: 1 to [`VOLUME_NAME_BYTES_MAX`] bytes of lower-case
//! letters, digits, `-`, `_` and `.`, starting with a letter or digit. So a
//! name is always a single path component (never `..`, never a `/`), fits a
//! gossip item, and reads the same in a shell. A [`VolumeName`] can only be
//! made by checking that rule, and a decoded one (from a peer, a manifest or
//! a request) is checked the same way, so code that holds one need not check.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest volume name, in bytes.
pub const VOLUME_NAME_BYTES_MAX: usize = 128;

/// A checked volume name. Derefs to `str`; encodes as a plain string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

/// Why a text is not a volume name. Messages say what the rule is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeNameError {
    /// The empty string.
    #[error("a volume name is empty; expected lower-case letters, digits, '-', '_' and '.', starting with a letter or digit")]
    Empty,
    /// More than [`VOLUME_NAME_BYTES_MAX`] bytes.
    #[error("volume name of {bytes} bytes is longer than {VOLUME_NAME_BYTES_MAX}")]
    TooLong {
        /// Its length.
        bytes: usize,
    },
    /// A character outside the rule, or a first character that may not start a name.
    #[error("bad volume name \"{}\": '{}' at character {position}; expected lower-case letters, digits, '-', '_' and '.', starting with a letter or digit", .name.escape_debug(), .ch.escape_debug())]
    Character {
        /// The name (at most the longest allowed).
        name: String,
        /// The offending character.
        ch: char,
        /// Its 1-based position.
        position: usize,
    },
}

impl VolumeName {
    /// Checks `name` against the rule.
    pub fn new(name: impl Into<String>) -> Result<VolumeName, VolumeNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(VolumeNameError::Empty);
        }
        if name.len() > VOLUME_NAME_BYTES_MAX {
            return Err(VolumeNameError::TooLong { bytes: name.len() });
        }
        for (i, ch) in name.chars().enumerate() {
            let ok = ch.is_ascii_lowercase() || ch.is_ascii_digit() || (i > 0 && matches!(ch, '-' | '_' | '.'));
            if !ok {
                return Err(VolumeNameError::Character { name, ch, position: i + 1 });
            }
        }
        Ok(VolumeName(name))
    }

    /// A name written in the code (a test's, an example's), like
    /// `http::HeaderValue::from_static`: panics if it breaks the rule, which is
    /// a bug in that code. Names from files, peers and users go through [`VolumeName::new`].
    #[track_caller]
    pub fn from_static(name: &'static str) -> VolumeName {
        match VolumeName::new(name) {
            Ok(name) => name,
            Err(e) => panic!("{e}"),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl Deref for VolumeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for VolumeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for VolumeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for VolumeName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for VolumeName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for VolumeName {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<VolumeName> for str {
    fn eq(&self, other: &VolumeName) -> bool {
        self == other.0
    }
}

impl PartialEq<VolumeName> for &str {
    fn eq(&self, other: &VolumeName) -> bool {
        *self == other.0
    }
}

impl PartialEq<VolumeName> for String {
    fn eq(&self, other: &VolumeName) -> bool {
        *self == other.0
    }
}

impl fmt::Display for VolumeName {
    /// The name, with the formatter's width and alignment.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for VolumeName {
    type Err = VolumeNameError;
    fn from_str(s: &str) -> Result<VolumeName, VolumeNameError> {
        VolumeName::new(s)
    }
}

impl TryFrom<String> for VolumeName {
    type Error = VolumeNameError;
    fn try_from(s: String) -> Result<VolumeName, VolumeNameError> {
        VolumeName::new(s)
    }
}

impl TryFrom<&str> for VolumeName {
    type Error = VolumeNameError;
    fn try_from(s: &str) -> Result<VolumeName, VolumeNameError> {
        VolumeName::new(s)
    }
}

impl From<VolumeName> for String {
    fn from(name: VolumeName) -> String {
        name.0
    }
}

impl Serialize for VolumeName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for VolumeName {
    /// A string that keeps the rule; anything else is refused with the rule's message.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<VolumeName, D::Error> {
        let text = String::deserialize(deserializer)?;
        VolumeName::new(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_keep_the_rule_are_taken_as_they_are() {
        for ok in ["db", "0", "web-01.data_disk", &"a".repeat(VOLUME_NAME_BYTES_MAX)] {
            let name = VolumeName::new(ok).unwrap();
            assert_eq!(name.as_str(), ok);
            assert_eq!(name.to_string(), ok);
            assert_eq!(ok.parse::<VolumeName>().unwrap(), name);
        }
    }

    #[test]
    fn names_a_path_or_a_shell_would_misread_are_refused_with_the_rule() {
        assert_eq!(VolumeName::new(""), Err(VolumeNameError::Empty));
        assert_eq!(VolumeName::new("a".repeat(VOLUME_NAME_BYTES_MAX + 1)), Err(VolumeNameError::TooLong { bytes: VOLUME_NAME_BYTES_MAX + 1 }));
        for (bad, ch, position) in [("..", '.', 1), ("a/b", '/', 2), ("-x", '-', 1), ("Db", 'D', 1), ("a b", ' ', 2), ("vol\u{e9}", '\u{e9}', 4), (".hidden", '.', 1)] {
            let e = VolumeName::new(bad).unwrap_err();
            assert_eq!(e, VolumeNameError::Character { name: bad.to_string(), ch, position }, "{bad}");
            assert!(e.to_string().starts_with(&format!("bad volume name \"{}\": '{}' at character {position};", bad.escape_debug(), ch.escape_debug())), "{e}");
        }
    }

    #[test]
    fn decoding_checks_the_rule_and_encoding_is_a_plain_string() {
        let name = VolumeName::new("db").unwrap();
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"db\"");
        assert_eq!(serde_json::from_str::<VolumeName>(&json).unwrap(), name);
        let refused = serde_json::from_str::<VolumeName>("\"../etc\"").unwrap_err();
        assert!(refused.to_string().contains("bad volume name \"../etc\": '.' at character 1"), "{refused}");
        let hostile = VolumeName::new("a\nb").unwrap_err().to_string();
        assert!(hostile.starts_with("bad volume name \"a\\nb\": '\\n' at character 2"), "a newline is shown escaped: {hostile}");
        let bytes = postcard::to_allocvec(&name).unwrap();
        assert_eq!(bytes, postcard::to_allocvec("db").unwrap());
        assert_eq!(postcard::from_bytes::<VolumeName>(&bytes).unwrap(), name);
    }
}
