//! Node ids: the name a node is known by in topology files, on the wire and in logs.
//!
//! A node id is the blake3 hash of the DER `SubjectPublicKeyInfo` of the node's
//! key. It is written as 52 base32 characters split in four runs of 13, each run
//! followed by a Luhn mod 32 check character, and shown in eight dash-separated
//! groups of seven (56 characters in all), like Syncthing's device ids. Parsing
//! ignores case, dashes and spaces, so ids can be pasted from anywhere; a typo is
//! caught by the check characters and reported as a bad id, never silently read
//! as some other (unknown) node.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The base32 alphabet of RFC 4648; ids are rendered upper-case.
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Data characters per check character.
const RUN_CHARS: usize = 13;
/// Base32 characters carrying the 32 hash bytes (256 bits / 5, rounded up).
const DATA_CHARS: usize = 52;
/// Characters of a complete id without separators.
pub const NODE_ID_CHARS: usize = DATA_CHARS + DATA_CHARS / RUN_CHARS;
/// Characters per dash-separated display group.
const GROUP_CHARS: usize = 7;

/// A node's identity: blake3 of its public key. Cheap to copy and compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId([u8; 32]);

/// Why a text is not a valid node id. Messages say what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    /// Wrong number of characters once dashes and spaces are removed.
    #[error("node id has {found} characters, expected {NODE_ID_CHARS} (8 groups of 7, dashes optional)")]
    Length {
        /// Characters found, not counting dashes and spaces.
        found: usize,
    },
    /// A character outside A-Z and 2-7.
    #[error("node id has {ch:?} at character {position}; only letters A-Z and digits 2-7 are used")]
    Character {
        /// The offending character.
        ch: char,
        /// 1-based position among the id's characters (dashes not counted).
        position: usize,
    },
    /// A check character does not match: the id was mistyped or truncated.
    #[error("node id check character {run} of 4 does not match (a typo in group {group_from}-{group_to}?)")]
    Check {
        /// Which of the four check characters failed (1-based).
        run: usize,
        /// First display group covering the failing run (1-based).
        group_from: usize,
        /// Last display group covering the failing run (1-based).
        group_to: usize,
    },
    /// The data characters decode to more than 256 bits (the last data character is out of range).
    #[error("node id does not encode a 256-bit hash (last data character out of range)")]
    Padding,
}

impl NodeId {
    /// The id of the node whose DER `SubjectPublicKeyInfo` is `spki_der`.
    pub fn from_public_key(spki_der: &[u8]) -> Self {
        NodeId(*blake3::hash(spki_der).as_bytes())
    }

    /// Wraps raw hash bytes, as carried on the wire.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        NodeId(bytes)
    }

    /// The raw 32 hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first display group, for log lines and narrow tables; not unique enough to pin a peer.
    pub fn short(&self) -> String {
        self.to_string()[..GROUP_CHARS].to_string()
    }

    fn data_chars(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DATA_CHARS);
        let mut acc: u32 = 0;
        let mut bits = 0;
        for byte in self.0 {
            acc = (acc << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(ALPHABET[((acc >> bits) & 31) as usize]);
            }
        }
        if bits > 0 {
            out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize]);
        }
        debug_assert_eq!(out.len(), DATA_CHARS);
        out
    }
}

/// Value of a base32 character, upper-case only.
fn digit(ch: u8) -> Option<u32> {
    ALPHABET.iter().position(|&a| a == ch).map(|p| p as u32)
}

/// Luhn mod 32 check character over a run of base32 characters.
fn luhn32(run: &[u8]) -> u8 {
    let mut factor = 2;
    let mut sum = 0;
    for &ch in run.iter().rev() {
        // Callers pass only alphabet characters.
        let addend = factor * digit(ch).unwrap_or(0);
        sum += addend / 32 + addend % 32;
        factor = if factor == 2 { 1 } else { 2 };
    }
    ALPHABET[((32 - sum % 32) % 32) as usize]
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let data = self.data_chars();
        let mut full = Vec::with_capacity(NODE_ID_CHARS);
        for run in data.chunks(RUN_CHARS) {
            full.extend_from_slice(run);
            full.push(luhn32(run));
        }
        for (i, group) in full.chunks(GROUP_CHARS).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            // The alphabet is ASCII.
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let chars: Vec<char> = text.chars().filter(|c| *c != '-' && !c.is_whitespace()).collect();
        if chars.len() != NODE_ID_CHARS {
            return Err(NodeIdError::Length { found: chars.len() });
        }
        let mut upper = Vec::with_capacity(NODE_ID_CHARS);
        for (i, ch) in chars.iter().enumerate() {
            let up = ch.to_ascii_uppercase();
            if !up.is_ascii() || digit(up as u8).is_none() {
                return Err(NodeIdError::Character { ch: *ch, position: i + 1 });
            }
            upper.push(up as u8);
        }
        let mut data = Vec::with_capacity(DATA_CHARS);
        for (run_index, run) in upper.chunks(RUN_CHARS + 1).enumerate() {
            let (body, check) = run.split_at(RUN_CHARS);
            if luhn32(body) != check[0] {
                let first = run_index * (RUN_CHARS + 1);
                let last = first + RUN_CHARS;
                return Err(NodeIdError::Check {
                    run: run_index + 1,
                    group_from: first / GROUP_CHARS + 1,
                    group_to: last / GROUP_CHARS + 1,
                });
            }
            data.extend_from_slice(body);
        }
        let mut bytes = [0u8; 32];
        let mut acc: u64 = 0;
        let mut bits = 0;
        let mut at = 0;
        for ch in data {
            acc = (acc << 5) | u64::from(digit(ch).unwrap_or(0));
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                if at == 32 {
                    return Err(NodeIdError::Padding);
                }
                bytes[at] = (acc >> bits) as u8;
                at += 1;
            }
        }
        // 52 characters carry 260 bits; the 4 spare low bits must be zero.
        if acc & ((1 << bits) - 1) != 0 {
            return Err(NodeIdError::Padding);
        }
        Ok(NodeId(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u8) -> NodeId {
        NodeId::from_public_key(&[seed; 91])
    }

    #[test]
    fn round_trips_in_any_case_and_spacing() {
        for seed in 0..=255u8 {
            let id = sample(seed);
            let text = id.to_string();
            assert_eq!(text.len(), NODE_ID_CHARS + 7);
            assert_eq!(text.parse::<NodeId>().unwrap(), id);
            assert_eq!(text.to_lowercase().parse::<NodeId>().unwrap(), id);
            assert_eq!(text.replace('-', "").parse::<NodeId>().unwrap(), id);
            assert_eq!(text.replace('-', " ").parse::<NodeId>().unwrap(), id);
        }
    }

    #[test]
    fn every_single_character_substitution_is_caught() {
        let text: Vec<u8> = sample(7).to_string().into_bytes();
        for i in 0..text.len() {
            if text[i] == b'-' {
                continue;
            }
            for &other in ALPHABET {
                if other == text[i] {
                    continue;
                }
                let mut typo = text.clone();
                typo[i] = other;
                let typo = String::from_utf8(typo).unwrap();
                assert!(typo.parse::<NodeId>().is_err(), "typo at {i} accepted: {typo}");
            }
        }
    }

    #[test]
    fn adjacent_transpositions_are_caught() {
        let id = sample(3).to_string().replace('-', "").into_bytes();
        let mut caught = 0;
        let mut tried = 0;
        for i in 0..id.len() - 1 {
            if id[i] == id[i + 1] || (i + 1) % (RUN_CHARS + 1) == 0 {
                continue;
            }
            let mut t = id.clone();
            t.swap(i, i + 1);
            tried += 1;
            if String::from_utf8(t).unwrap().parse::<NodeId>().is_err() {
                caught += 1;
            }
        }
        // Luhn misses only swaps of digit pairs that sum to 31 (like 0/9 in base 10).
        assert!(caught * 10 >= tried * 9, "{caught} of {tried} transpositions caught");
    }

    #[test]
    fn reports_what_is_wrong() {
        let good = sample(1).to_string();
        assert_eq!(good[..20].parse::<NodeId>(), Err(NodeIdError::Length { found: 18 }));
        let mut bad = good.clone().into_bytes();
        bad[3] = b'1';
        assert_eq!(
            String::from_utf8(bad).unwrap().parse::<NodeId>(),
            Err(NodeIdError::Character { ch: '1', position: 4 })
        );
        let mut bad = good.into_bytes();
        bad[0] = if bad[0] == b'A' { b'B' } else { b'A' };
        let err = String::from_utf8(bad).unwrap().parse::<NodeId>().unwrap_err();
        assert!(matches!(err, NodeIdError::Check { run: 1, group_from: 1, group_to: 2 }), "{err:?}");
        assert!(err.to_string().contains("check character 1 of 4"));
    }
}
