//! Fuzzes `Topology::parse`: any bytes (read as UTF-8, lossily) must give a
//! topology or diagnostics with sane positions, never a panic.
//!
//! Run from `topology/`: `cargo +nightly fuzz run parse`. Seed the corpus with
//! the examples: `mkdir -p fuzz/corpus/parse && cp ../examples/*.toml fuzz/corpus/parse/`.

#![no_main]

use std::path::Path;

use drmesh_topology::Topology;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(diags) = Topology::parse(&text, Path::new("fuzz/topology.toml")) {
        assert!(!diags.is_empty());
        for d in diags.iter() {
            assert!(d.line >= 1 && d.column >= 1);
        }
    }
});
