//! The layering rule of docs/development.md, as anyone can check it: the
//! protocol cores (crate `drmesh-proto`) depend on no async runtime, actor
//! system, transport or database, so they stay sans-IO and simnet can drive
//! them. (Clippy, with actors/proto/clippy.toml, refuses clocks, files,
//! sockets, threads and processes inside the crate itself.)

use std::process::Command;

/// Crates the protocol cores must never link, directly or through another crate.
const FORBIDDEN: &[&str] = &[
    "tokio", "actix", "actix-rt", "mio", "quinn", "quinn-proto", "rustls", "socket2", "redb", "drmesh-actors", "drmesh-transport",
];

#[test]
fn protocol_cores_link_no_runtime_transport_or_database() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args(["tree", "--offline", "--locked", "-p", "drmesh-proto", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).expect("cargo tree prints UTF-8");
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains(&"drmesh-proto") && crates.contains(&"zstd"), "cargo tree listed an unexpected tree:\n{tree}");
    let found: Vec<&str> = crates.iter().copied().filter(|c| FORBIDDEN.contains(c)).collect();
    assert!(found.is_empty(), "drmesh-proto depends on {found:?}; the protocol cores must stay sans-IO:\n{tree}");
}
