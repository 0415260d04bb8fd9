//! Inputs with limits: a topology over `MAX_TOPOLOGY_BYTES` is refused unread
//! (whatever the path names: a big file, an endless pipe, a device, a
//! directory), a file with very many errors keeps the first `MAX_DIAGNOSTICS`
//! and counts the rest, and big valid topologies (16,000 nodes) load, without
//! checks that grow with the square of the file. Times are printed, never asserted.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use drmesh_topology::{Diagnostics, NodeId, Topology, MAX_DIAGNOSTICS, MAX_TOPOLOGY_BYTES};

const MIB: usize = 1 << 20;

/// Runs `f` on a thread; panics if it takes longer than `limit` (a hang fails, it does not block the run).
fn within<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: no answer within {limit:?} (a hang?)"))
}

fn id(n: u64) -> NodeId {
    NodeId::from_public_key(&n.to_le_bytes())
}

/// A valid `[mesh]` and one node, to append to or to put after other lines.
fn small_valid() -> String {
    format!("[mesh]\nname = \"m\"\nversion = 1\n\n[[node]]\nname = \"a\"\nid = \"{}\"\nsite = \"s\"\n", id(0))
}

/// `[[node]]` tables with name, id, addresses and site, as `drmesh init` prints them.
fn nodes(count: u64) -> String {
    let mut text = String::from("[mesh]\nname = \"big\"\nversion = 1\n");
    for i in 0..count {
        write!(
            text,
            "\n[[node]]\nname = \"node-{i:05}\"\nid = \"{}\"\naddresses = [\"10.{}.{}.{}:7400\"]\nsite = \"site-{}\"\n",
            id(i),
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255,
            i % 40
        )
        .unwrap();
    }
    text
}

fn only_error(d: &Diagnostics) -> String {
    assert_eq!(d.len(), 1, "{d}");
    d.iter().next().unwrap().to_string()
}

/// Asserts the first `MAX_DIAGNOSTICS` errors are kept in file order and the rest counted as `total`.
#[track_caller]
fn assert_capped(d: &Diagnostics, total: usize) {
    assert_eq!(d.len(), total);
    assert_eq!(d.iter().count(), MAX_DIAGNOSTICS);
    assert_eq!(d.omitted(), total - MAX_DIAGNOSTICS);
    let positions: Vec<(usize, usize)> = d.iter().map(|e| (e.line, e.column)).collect();
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "not in file order: {positions:?}");
    let shown = d.to_string();
    assert_eq!(shown.lines().count(), MAX_DIAGNOSTICS + 1);
    assert_eq!(shown.lines().last().unwrap(), format!("... and {} more errors", total - MAX_DIAGNOSTICS));
}

// ---- the size limit ----------------------------------------------------------

#[test]
fn the_limit_is_16_mib() {
    assert_eq!(MAX_TOPOLOGY_BYTES, 16 * 1024 * 1024);
}

#[test]
fn a_17_mib_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topology.toml");
    let mut text = small_valid();
    let line = "# a generated comment line, to make the file big enough\n";
    while text.len() < 17 * MIB {
        text.push_str(line);
    }
    text.truncate(17 * MIB);
    fs::write(&path, &text).unwrap();
    let start = Instant::now();
    let err = Topology::load(&path).unwrap_err();
    println!("17 MiB file refused in {:?}", start.elapsed());
    let shown = only_error(&err);
    assert!(shown.starts_with(&format!("{}:1:1: ", path.display())), "{shown}");
    assert!(shown.contains("is 17 MiB (17825792 bytes)"), "{shown}");
    assert!(shown.contains("limit of 16 MiB (16777216 bytes)"), "{shown}");
}

#[test]
fn a_file_of_exactly_16_mib_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topology.toml");
    let mut text = small_valid();
    let pad = MAX_TOPOLOGY_BYTES as usize - text.len();
    text.push_str(&"#".repeat(pad - 1));
    text.push('\n');
    assert_eq!(text.len() as u64, MAX_TOPOLOGY_BYTES);
    fs::write(&path, &text).unwrap();
    let start = Instant::now();
    let topology = Topology::load(&path).unwrap_or_else(|e| panic!("{e}"));
    println!("16 MiB file (one node and a long comment) loaded in {:?}", start.elapsed());
    assert_eq!(topology.nodes.len(), 1);

    // One byte more is too much.
    text.push('\n');
    fs::write(&path, &text).unwrap();
    assert!(only_error(&Topology::load(&path).unwrap_err()).contains("(16777217 bytes)"));
}

#[test]
fn parse_refuses_a_text_over_the_limit() {
    let text = small_valid() + &" ".repeat(MAX_TOPOLOGY_BYTES as usize);
    let err = Topology::parse(&text, Path::new("big.toml")).unwrap_err();
    let shown = only_error(&err);
    assert!(shown.starts_with("big.toml:1:1: the file is 16.0 MiB") && shown.contains("over the limit"), "{shown}");
}

#[test]
fn dev_zero_is_refused_at_once() {
    let start = Instant::now();
    let err = within("loading /dev/zero", Duration::from_secs(60), || Topology::load(Path::new("/dev/zero")).unwrap_err());
    println!("/dev/zero refused in {:?}", start.elapsed());
    let shown = only_error(&err);
    assert!(shown.starts_with("/dev/zero:1:1: this is a character device, not a file"), "{shown}");
}

#[test]
fn a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let err = within("loading a directory", Duration::from_secs(60), move || Topology::load(&path).unwrap_err());
    assert!(only_error(&err).contains("this is a directory; expected the topology file (TOML) itself"), "{err}");
}

#[test]
fn an_endless_pipe_is_read_up_to_the_limit_only() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("topology.toml");
    let made = Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipped: mkfifo is not available");
        return;
    }
    // The writer writes until the reader goes away (then its write fails with EPIPE).
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        let mut pipe = fs::OpenOptions::new().write(true).open(&writer_path).unwrap();
        let chunk = "# more and more topology\n".repeat(4096);
        let mut written = 0usize;
        while pipe.write_all(chunk.as_bytes()).is_ok() {
            written += chunk.len();
        }
        written
    });
    let start = Instant::now();
    let path = fifo.clone();
    let err = within("loading an endless pipe", Duration::from_secs(60), move || Topology::load(&path).unwrap_err());
    let written = writer.join().unwrap();
    println!("endless pipe refused in {:?} after {} MiB were written", start.elapsed(), written / MIB);
    let shown = only_error(&err);
    assert!(shown.contains("has more than 16 MiB (16777216 bytes), the limit"), "{shown}");
    assert!(written < 20 * MIB, "{written} bytes went into the pipe");
}

// ---- the diagnostics limit ---------------------------------------------------

#[test]
fn ten_megabytes_of_unknown_keys_give_100_errors_and_a_count() {
    let mut text = String::new();
    let mut keys = 0;
    while text.len() < 10 * MIB {
        writeln!(text, "k{keys:x} = 1").unwrap();
        keys += 1;
    }
    text.push_str(&small_valid());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topology.toml");
    fs::write(&path, &text).unwrap();
    let start = Instant::now();
    let err = Topology::load(&path).unwrap_err();
    println!("{} MiB with {keys} unknown keys checked in {:?}", text.len() / MIB, start.elapsed());
    assert_capped(&err, keys);
    let first = err.iter().next().unwrap();
    assert_eq!((first.line, first.column), (1, 1));
    assert!(first.message.starts_with("unknown key `k0` in the top level; allowed keys:"), "{first}");
    assert_eq!(err.iter().last().unwrap().line, MAX_DIAGNOSTICS);
    assert_eq!(err.lines().len(), MAX_DIAGNOSTICS + 1);
}

#[test]
fn millions_of_syntax_errors_are_counted_not_kept() {
    // Each line is an empty key without a value: at least one error per line.
    let lines = 1_000_000;
    let text = "=\n".repeat(lines);
    let start = Instant::now();
    let err = Topology::parse(&text, Path::new("t.toml")).unwrap_err();
    println!("{lines} lines of syntax errors ({} errors) checked in {:?}", err.len(), start.elapsed());
    assert!(err.len() >= lines, "{} errors", err.len());
    assert_capped(&err, err.len());
    assert!(err.iter().all(|d| d.message.starts_with("TOML syntax error: ")));
    assert_eq!(err.iter().next().unwrap().line, 1);
}

#[test]
fn a_duplicate_key_flood_reports_the_first_one() {
    let text = small_valid() + "[[volume]]\n" + &"name = \"v\"\n".repeat(500_000);
    let err = Topology::parse(&text, Path::new("t.toml")).unwrap_err();
    let shown = only_error(&err);
    assert!(shown.starts_with("t.toml:11:1: TOML syntax error: duplicate key"), "{shown}");
}

// ---- big valid topologies and checks that must stay linear ----------------------

#[test]
fn sixteen_thousand_nodes_load() {
    let text = nodes(16_000);
    assert!((text.len() as u64) < MAX_TOPOLOGY_BYTES / 4, "{} bytes", text.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topology.toml");
    fs::write(&path, &text).unwrap();
    let start = Instant::now();
    let topology = Topology::load(&path).unwrap_or_else(|e| panic!("{e}"));
    println!("16,000 nodes ({:.1} MB) loaded in {:?}", text.len() as f64 / 1e6, start.elapsed());
    assert_eq!(topology.nodes.len(), 16_000);
    assert!(topology.node_by_id(&id(15_999)).is_some());
}

#[test]
fn sixteen_thousand_duplicates_are_each_reported_once() {
    // Every node twice: names, ids and addresses are all duplicates.
    let once = nodes(16_000);
    let twice = format!("{once}{}", &once[once.find("\n[[node]]").unwrap()..]);
    let start = Instant::now();
    let err = Topology::parse(&twice, Path::new("t.toml")).unwrap_err();
    println!("32,000 nodes with 48,000 duplicates checked in {:?}", start.elapsed());
    assert_capped(&err, 48_000);
    assert!(err.iter().next().unwrap().message.starts_with("duplicate node name \"node-00000\" (first defined on line 6)"));
}

/// Node "a" at an unknown site, node "b", `n` sites and `n` volumes from a to
/// b alternating between policies "p0" and "p1", then `policies`.
fn many_sections(n: usize, policies: &str) -> String {
    let mut text = small_valid().replace("site = \"s\"", "site = \"x\"");
    write!(text, "\n[[node]]\nname = \"b\"\nid = \"{}\"\nsite = \"s0\"\n", id(1)).unwrap();
    for i in 0..n {
        write!(text, "\n[[site]]\nname = \"s{i}\"\n").unwrap();
    }
    for i in 0..n {
        write!(text, "\n[[volume]]\nname = \"v{i}\"\nsource = \"a\"\nkind = \"file\"\npath = \"/img\"\ntargets = [\"b\"]\npolicy = \"p{}\"\n", i % 2).unwrap();
    }
    text + policies
}

#[test]
fn unknown_sites_and_policies_stay_linear() {
    let n = 20_000;
    // p1 is missing.
    let mut policies = String::from("\n[policy.p0]\nrpo = \"1h\"\n");
    for i in 2..n {
        write!(policies, "\n[policy.p{i}]\nrpo = \"1h\"\n").unwrap();
    }
    let text = many_sections(n, &policies);
    let start = Instant::now();
    let err = Topology::parse(&text, Path::new("t.toml")).unwrap_err();
    println!("{:.1} MB with {n} sites, volumes and policies checked in {:?}", text.len() as f64 / 1e6, start.elapsed());
    // One unknown site, and n/2 volumes with an undefined policy.
    assert_capped(&err, 1 + n / 2);
    let site = err.iter().next().unwrap();
    assert!(site.message.ends_with("\"s10012\", \"s10013\" and 19980 more"), "{site}");
    assert!(site.message.len() < 400, "{site}");
    let policy = err.iter().nth(1).unwrap();
    assert!(policy.message.starts_with("undefined policy \"p1\"; expected one of \"p0\", \"p10\","), "{policy}");
    assert!(policy.message.ends_with(" and 19979 more"), "{policy}");
}

#[test]
fn many_unknown_drill_nodes_stay_linear() {
    let n = 20_000;
    // Both policies drill on n nodes that do not exist.
    let mut drill_nodes = String::new();
    for i in 0..n {
        write!(drill_nodes, "\"d{i}\", ").unwrap();
    }
    let policies = format!(
        "\n[policy.p0]\nrpo = \"1h\"\ndrill = {{ schedule = \"daily 02:00\", nodes = [{drill_nodes}] }}\n\n[policy.p1]\nrpo = \"1h\"\ndrill = {{ schedule = \"daily 03:00\", nodes = [{drill_nodes}] }}\n"
    );
    let text = many_sections(n, &policies).replace("site = \"x\"", "site = \"s1\"");
    let start = Instant::now();
    let err = Topology::parse(&text, Path::new("t.toml")).unwrap_err();
    println!("{:.1} MB with {n} volumes and 2 x {n} drill nodes checked in {:?}", text.len() as f64 / 1e6, start.elapsed());
    // Each policy's unknown drill nodes once, and each volume's drill nodes not among its targets.
    assert_capped(&err, 2 * n + n);
    let first = err.iter().next().unwrap();
    assert_eq!(first.message, "drill node \"d0\" of policy \"p0\" is not a [[node]] name");

    // With the drill nodes known, the volumes whose targets hold none of them remain.
    let mut drill_nodes = String::new();
    for i in 0..n {
        write!(drill_nodes, "\n[[node]]\nname = \"d{i}\"\nid = \"{}\"\nsite = \"s1\"\n", id(100 + i as u64)).unwrap();
    }
    let known = text.replacen("\n[[site]]", &format!("{drill_nodes}\n[[site]]"), 1);
    let err = Topology::parse(&known, Path::new("t.toml")).unwrap_err();
    assert_capped(&err, n);
    let first = err.iter().next().unwrap();
    assert!(first.message.starts_with("policy \"p0\" drills on d0, d1, d2,") && first.message.contains(" and 19980 more, none of which"), "{first}");
    assert!(first.message.len() < 400, "{first}");
}
