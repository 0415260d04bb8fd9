//! `Topology::parse` never panics, whatever the bytes: mutated versions of the
//! examples and random bytes (deterministic, seeded).

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::path::{Path, PathBuf};

use drmesh_topology::Topology;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn example(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)).unwrap()
}

/// Interesting bytes to splice in: TOML punctuation, digits, unicode, units.
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"{",
    b"}",
    b"=",
    b"\"",
    b"'",
    b",",
    b".",
    b":",
    b"\n",
    b"#",
    b"-",
    b"0",
    b"9",
    b"\xc3\xa9",
    b"\xff",
    b"MiB",
    b"Mbit",
    b"unlimited",
    b"zstd:",
    b"24:00",
    b"vol-",
    b"unix:",
    b"[::1]:",
    b"\\u",
    b"\"\"\"",
    b"1e999",
    b"-0",
    b"0x",
    b"inf",
    b"nan",
    b"true",
    b"1979-05-27T07:32:00Z",
];

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(5) {
            0 if at < out.len() => {
                out.remove(at);
            }
            1 if at < out.len() => out[at] = rng.next() as u8,
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            3 => {
                // Duplicate a random slice (repeats tables, keys, values).
                let from = rng.below(out.len());
                let to = (from + rng.below(80)).min(out.len());
                let piece = out[from..to].to_vec();
                out.splice(at..at, piece);
            }
            _ if at < out.len() => {
                let to = (at + rng.below(40)).min(out.len());
                out.drain(at..to);
            }
            _ => {}
        }
    }
    out
}

fn parse_bytes(bytes: &[u8], origin: &Path) {
    let text = String::from_utf8_lossy(bytes);
    if let Err(diags) = Topology::parse(&text, origin) {
        assert!(!diags.is_empty(), "rejected without a diagnostic");
        let lines = text.lines().count().max(1);
        for d in diags.iter() {
            assert!(d.line >= 1 && d.line <= lines + 1, "line {} of {lines}: {d}", d.line);
            assert!(d.column >= 1, "{d}");
            assert!(!d.message.is_empty());
        }
    }
}

#[test]
fn mutated_examples_never_panic() {
    let origin = PathBuf::from("/nonexistent/dir/topology.toml");
    for (seed, name) in [(1u64, "branch-office.toml"), (2, "two-nodes.toml")] {
        let base = example(name);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
        for _ in 0..3000 {
            let input = mutate(&mut rng, &base);
            parse_bytes(&input, &origin);
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(42);
    let origin = Path::new("t.toml");
    for _ in 0..2000 {
        let len = rng.below(300);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half of the time, mostly printable TOML-ish characters.
        if rng.below(2) == 0 {
            const CHARSET: &[u8] = b"[]{}=\"'.,:#-_ \n\tabcdemnoprstvy0123456789";
            for b in &mut bytes {
                *b = CHARSET[*b as usize % CHARSET.len()];
            }
        }
        parse_bytes(&bytes, origin);
    }
}
