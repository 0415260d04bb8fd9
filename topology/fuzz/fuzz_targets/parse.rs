//! Fuzzes `Topology::parse`: any bytes (read as UTF-8, lossily) must give a
//! topology or diagnostics with sane positions, at most `MAX_DIAGNOSTICS` of
//! them kept, never a panic.
//!
//! Run with the others by `scripts/fuzz` (stable toolchain, 20 s per target),
//! or alone from `topology/`: `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none parse`. Seed
//! the corpus with the examples: `mkdir -p fuzz/corpus/parse && cp ../examples/*.toml fuzz/corpus/parse/`.

#![no_main]

use std::path::Path;

use drmesh_topology::{Topology, MAX_DIAGNOSTICS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(diags) = Topology::parse(&text, Path::new("fuzz/topology.toml")) {
        assert!(!diags.is_empty());
        assert!(diags.iter().count() <= MAX_DIAGNOSTICS);
        assert_eq!(diags.iter().count() + diags.omitted(), diags.len());
        for d in diags.iter() {
            assert!(d.line >= 1 && d.column >= 1);
        }
    }
});
