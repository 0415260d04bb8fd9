//! Story: bandwidth limits. A policy's cap holds the payload rate of a long
//! cycle within ±10% over a minute; a window open at the node's local time
//! sets a lower cap than outside it, and a topology edit reloaded during a
//! cycle changes that cycle's rate; two source nodes of one site share the
//! site's uplink, agreeing by gossip, so their summed rate stays at it; two
//! volumes sent over one `[[link]]` share its cap, a link added or removed by
//! a reload applies to a running cycle, and a restore fetched over a link
//! keeps to it.
//!
//! Images are random bytes (nothing to compress, nothing to dedupe), so the
//! payload is the volume size. Caps are low (16-40 Mbit/s) so that a slow
//! machine can still sustain them: the rate band is the only timing asserted.

use std::io::Read as _;
use std::process::Child;
use std::time::{Duration, Instant};

use drmesh_tests::{parse_ctl_json, report_seq, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

const MB: usize = 1_000_000;

/// A random image of `len` bytes at `name` in the mesh directory.
fn random_image(mesh: &TestMesh, name: &str, seed: u64, len: usize) -> std::path::PathBuf {
    let path = mesh.dir.path().join(name);
    let mut rng = Rng::new(seed);
    let mut image = vec![0u8; len];
    rng.fill(&mut image);
    write_image_atomic(&path, &image);
    path
}

/// A policy with no compression (the payload is the data) and a `bandwidth` table.
fn policy(name: &str, bandwidth: Option<&str>) -> String {
    let mut p = PolicySpec::new(name, "1MiB");
    p.compression = Some("off".into());
    let mut text = p.text();
    if let Some(b) = bandwidth {
        text.push_str(&format!("bandwidth = {b}\n"));
    }
    text
}

fn volume(name: &str, source: &str, target: &str, path: &std::path::Path, policy: &str) -> String {
    VolumeSpec::new(name, source, &[target], path, policy).text()
}

/// The `ctl volumes --json` row of `volume` on `node`.
fn volume_row(mesh: &TestMesh, node: &str, volume: &str) -> Value {
    let rows = mesh.ctl_data(node, &["volumes"]).unwrap_or_else(|e| panic!("volumes on {node}: {e}"));
    rows.as_array().into_iter().flatten().find(|r| r["volume"] == volume).cloned().unwrap_or_else(|| panic!("no row for {volume}: {rows}"))
}

/// Payload bytes the running cycle of `volume` has sent so far.
fn progress(mesh: &TestMesh, node: &str, volume: &str) -> Option<u64> {
    volume_row(mesh, node, volume)["running_sent_payload_bytes"].as_u64()
}

/// Waits for a backgrounded `ctl sync-now --json` and returns its data.
fn finish(mesh: &TestMesh, node: &str, mut child: Child) -> Value {
    let mut stdout = Vec::new();
    child.stdout.take().expect("piped stdout").read_to_end(&mut stdout).expect("read ctl output");
    let status = child.wait().expect("wait ctl");
    let data = parse_ctl_json(&std::process::Output { status, stdout, stderr: Vec::new() })
        .unwrap_or_else(|e| panic!("sync-now on {node} failed: {e}\n--- {node} log:\n{}", mesh.node(node).log_text()));
    assert!(data["errors"].as_array().is_none_or(|e| e.is_empty()), "sync-now on {node}: {data}");
    data
}

/// The one report of a sync-now answer.
fn report(sync: &Value) -> &Value {
    let reports = sync["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 1, "one target: {sync}");
    &reports[0]
}

fn assert_within_10_percent(what: &str, rate_bps: f64, cap_bps: f64) {
    let ratio = rate_bps / cap_bps;
    eprintln!("{what}: {:.2} Mbit/s, cap {:.2} Mbit/s", rate_bps / 1e6, cap_bps / 1e6);
    assert!((0.9..=1.1).contains(&ratio), "{what}: {:.2} Mbit/s against a cap of {:.2} Mbit/s ({:.1}%)", rate_bps / 1e6, cap_bps / 1e6, ratio * 100.0);
}

/// Measures the running cycle's payload rate over `secs` seconds, in bit/s.
fn measure(mesh: &TestMesh, node: &str, volume: &str, secs: u64) -> f64 {
    let (t0, b0) = (Instant::now(), progress(mesh, node, volume).expect("a cycle is running"));
    std::thread::sleep(Duration::from_secs(secs));
    let b1 = progress(mesh, node, volume).expect("the cycle still runs at the end of the phase");
    (b1 - b0) as f64 * 8.0 / t0.elapsed().as_secs_f64()
}

fn start_all(mesh: &mut TestMesh, names: &[&str]) {
    for n in names {
        mesh.start(n, "topology.toml");
    }
    for n in names {
        let others: Vec<&str> = names.iter().copied().filter(|o| o != n).collect();
        mesh.wait_connected(n, &others);
    }
}

/// Writes `text` as the topology, reloads it on `src` while a cycle of `vol`
/// may run, waits until `vol`'s effective cap is `cap_bps` and one second more
/// (the running cycle's rate settles at its next frames).
fn reload_src(mesh: &TestMesh, text: &str, cap_bps: u64) {
    mesh.write_file("topology.toml", text);
    let out = mesh.ctl("src", &["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("the new cap is in force", Duration::from_secs(10), || volume_row(mesh, "src", "vol")["bandwidth"]["cap_bps"] == cap_bps);
    std::thread::sleep(Duration::from_secs(1));
}

#[test]
fn policy_cap_holds_the_rate_over_a_minute() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    // 40 Mbit/s for 60 s.
    let image = random_image(&mesh, "disk.img", 0xb0d1, 300 * MB);
    let mut text = mesh.standard_topology(1, &["src", "dst"]);
    text.push_str(&volume("vol", "src", "dst", &image, "capped"));
    text.push_str(&policy("capped", Some("{ limit = \"40Mbit\" }")));
    mesh.write_file("topology.toml", &text);
    start_all(&mut mesh, &["src", "dst"]);

    let row = volume_row(&mesh, "src", "vol");
    assert_eq!(row["bandwidth"]["cap_bps"], 40_000_000, "{row}");
    assert_eq!(row["bandwidth"]["reason"], "capped 40 Mbit/s by policy limit");
    let human = String::from_utf8_lossy(&mesh.ctl("src", &["volumes"]).stdout).to_string();
    assert!(human.contains("capped 40 Mbit/s by policy limit"), "ctl volumes shows the cap:\n{human}");

    let sync = mesh.sync_ok("src", "vol");
    let r = report(&sync);
    let payload = r["stats"]["sent_payload_bytes"].as_u64().expect("payload");
    assert!(payload >= 300 * MB as u64, "random data goes whole: {r}");
    let rate = payload as f64 * 8.0 / r["duration_secs"].as_f64().expect("duration");
    assert_within_10_percent("payload rate of the cycle", rate, 40e6);
}

/// `HH:MM` of the local time `minutes` from now (wrapping at midnight), as the node sees it.
fn local_hhmm(offset_minutes: i64) -> String {
    let now = jiff::Zoned::now();
    let m = (i64::from(now.hour()) * 60 + i64::from(now.minute()) + offset_minutes).rem_euclid(1440);
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[test]
fn open_window_sets_the_cap_and_a_reload_changes_a_running_cycle() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    // Phase 1 at 16 Mbit/s (~25 s: 50 MB), phase 2 at 32 Mbit/s (~25 s: 100 MB), and a margin.
    let image = random_image(&mesh, "disk.img", 0xb0d2, 190 * MB);
    // A window from an hour ago to an hour ahead: open now, whatever the time zone.
    let (from, to) = (local_hhmm(-60), local_hhmm(60));
    let topology = |version: u64, window_limit: &str| {
        let mut text = mesh.standard_topology(version, &["src", "dst"]);
        text.push_str(&volume("vol", "src", "dst", &image, "office"));
        let bw = format!("{{ limit = \"40Mbit\", windows = [{{ days = \"daily\", from = \"{from}\", to = \"{to}\", limit = \"{window_limit}\" }}] }}");
        text.push_str(&policy("office", Some(&bw)));
        text
    };
    let (first, edited) = (topology(1, "16Mbit"), topology(2, "32Mbit"));
    mesh.write_file("topology.toml", &first);
    start_all(&mut mesh, &["src", "dst"]);

    let row = volume_row(&mesh, "src", "vol");
    assert_eq!(row["bandwidth"]["cap_bps"], 16_000_000, "the open window's limit, lower than outside: {row}");
    assert_eq!(row["bandwidth"]["reason"], format!("capped 16 Mbit/s by policy window {from}-{to}"));

    let sync = mesh.spawn_ctl("src", &["sync-now", "vol"]);
    wait_until("the cycle sends", Duration::from_secs(30), || progress(&mesh, "src", "vol").is_some_and(|b| b > 0));
    std::thread::sleep(Duration::from_secs(2));
    let phase1 = measure(&mesh, "src", "vol", 20);
    assert_within_10_percent("rate while the window caps at 16 Mbit/s", phase1, 16e6);

    // Edit the window's limit and reload while the cycle runs.
    reload_src(&mesh, &edited, 32_000_000);
    let phase2 = measure(&mesh, "src", "vol", 20);
    assert_within_10_percent("rate after the reload raised the window to 32 Mbit/s", phase2, 32e6);

    let data = finish(&mesh, "src", sync);
    assert!(report(&data)["stats"]["sent_payload_bytes"].as_u64().unwrap_or(0) >= 190 * MB as u64, "{data}");
}

#[test]
fn nodes_of_a_site_share_its_uplink() {
    let mut mesh = TestMesh::new(&["a", "b", "dst"]);
    // Two sources, 150 MB each, summed 40 Mbit/s: about a minute.
    let image_a = random_image(&mesh, "a.img", 0xb0d3, 150 * MB);
    let image_b = random_image(&mesh, "b.img", 0xb0d4, 150 * MB);
    // Every node is in site "lab"; the uplink is declared, no policy caps.
    let mut text = mesh.standard_topology(1, &["a", "b", "dst"]);
    text.push_str("\n[[site]]\nname = \"lab\"\nuplink = \"40Mbit\"\n");
    text.push_str(&volume("va", "a", "dst", &image_a, "open"));
    text.push_str(&volume("vb", "b", "dst", &image_b, "open"));
    text.push_str(&policy("open", None));
    mesh.write_file("topology.toml", &text);
    start_all(&mut mesh, &["a", "b", "dst"]);
    wait_until("a and b see each other in gossip", Duration::from_secs(30), || {
        ["a", "b"].iter().all(|n| {
            let other = if *n == "a" { "b" } else { "a" };
            mesh.ctl_data(n, &["mesh"]).ok().and_then(|d| {
                d["members"].as_array().and_then(|m| m.iter().find(|x| x["name"] == other).map(|x| x["state"] == "alive"))
            }) == Some(true)
        })
    });
    // Idle, each would get the whole uplink.
    assert_eq!(volume_row(&mesh, "a", "va")["bandwidth"]["reason"], "site share 40 Mbit/s of 40 Mbit/s");

    let started = Instant::now();
    let sync_a = mesh.spawn_ctl("a", &["sync-now", "va"]);
    let sync_b = mesh.spawn_ctl("b", &["sync-now", "vb"]);
    // Once both publish their demand, each computes the same split.
    wait_until("both nodes run at half the uplink", Duration::from_secs(20), || {
        [("a", "va"), ("b", "vb")].iter().all(|(n, v)| volume_row(&mesh, n, v)["bandwidth"]["cap_bps"] == 20_000_000)
    });
    let row = volume_row(&mesh, "b", "vb");
    assert_eq!(row["bandwidth"]["reason"], "site share 20 Mbit/s of 40 Mbit/s", "{row}");
    let human = String::from_utf8_lossy(&mesh.ctl("a", &["volumes"]).stdout).to_string();
    assert!(human.contains("site share 20 Mbit/s of 40 Mbit/s"), "ctl volumes shows the share:\n{human}");

    let data_a = finish(&mesh, "a", sync_a);
    let data_b = finish(&mesh, "b", sync_b);
    let elapsed = started.elapsed().as_secs_f64();
    let payload: u64 = [&data_a, &data_b].iter().map(|d| report(d)["stats"]["sent_payload_bytes"].as_u64().unwrap_or(0)).sum();
    assert!(payload >= 300 * MB as u64, "random data goes whole: {data_a} {data_b}");
    // While either runs the pair uses the whole uplink (the one left alone
    // takes all of it), so the summed rate over the whole run is the uplink.
    assert_within_10_percent("summed rate of the site's two nodes", payload as f64 * 8.0 / elapsed, 40e6);
}

#[test]
fn a_link_cap_holds_all_transfers_to_one_target() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    // Two volumes of one source to one target, 60 MB each, under a 24 Mbit/s
    // link: the pair takes about 40 s. Their policy allows far more.
    let image_a = random_image(&mesh, "a.img", 0xb0d5, 60 * MB);
    let image_b = random_image(&mesh, "b.img", 0xb0d6, 60 * MB);
    let mut text = mesh.standard_topology(1, &["src", "dst"]);
    text.push_str(&volume("va", "src", "dst", &image_a, "wide"));
    text.push_str(&volume("vb", "src", "dst", &image_b, "wide"));
    text.push_str("\n[[link]]\nnodes = [\"dst\", \"src\"]\nlimit = \"24Mbit\"\n");
    text.push_str(&policy("wide", Some("{ limit = \"200Mbit\" }")));
    mesh.write_file("topology.toml", &text);
    start_all(&mut mesh, &["src", "dst"]);

    let row = volume_row(&mesh, "src", "va");
    assert_eq!(row["bandwidth"]["cap_bps"], 24_000_000, "{row}");
    assert_eq!(row["bandwidth"]["reason"], "capped 24 Mbit/s by link limit", "{row}");
    assert_eq!(row["bandwidth"]["link_cap_bps"], 24_000_000, "{row}");
    assert_eq!(row["bandwidth"]["policy_cap_bps"], 200_000_000, "{row}");

    let started = Instant::now();
    let sync_a = mesh.spawn_ctl("src", &["sync-now", "va"]);
    let sync_b = mesh.spawn_ctl("src", &["sync-now", "vb"]);
    let data_a = finish(&mesh, "src", sync_a);
    let data_b = finish(&mesh, "src", sync_b);
    let elapsed = started.elapsed().as_secs_f64();
    let payload: u64 = [&data_a, &data_b].iter().map(|d| report(d)["stats"]["sent_payload_bytes"].as_u64().unwrap_or(0)).sum();
    assert!(payload >= 120 * MB as u64, "random data goes whole: {data_a} {data_b}");
    // Both cycles share the link's pacer, so their sum is the link's cap
    // (each alone could go at the policy's 200 Mbit/s).
    assert_within_10_percent("summed rate over the link", payload as f64 * 8.0 / elapsed, 24e6);
}

/// Nodes `src` and `dst`, volume `vol` of `image` from one to the other
/// under a policy with `bandwidth` (if any), and a `[[link]]` between them
/// with `link` as its limit (if any).
fn pair_topology(mesh: &TestMesh, version: u64, image: &std::path::Path, bandwidth: Option<&str>, link: Option<&str>) -> String {
    let mut text = mesh.standard_topology(version, &["src", "dst"]);
    text.push_str(&volume("vol", "src", "dst", image, "p"));
    if let Some(limit) = link {
        text.push_str(&format!("\n[[link]]\nnodes = [\"src\", \"dst\"]\nlimit = \"{limit}\"\n"));
    }
    text.push_str(&policy("p", bandwidth));
    text
}

#[test]
fn a_link_added_or_removed_by_a_reload_applies_to_a_running_cycle() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    // A cycle under a 32 Mbit/s policy cap; a [[link]] of 12 Mbit/s added
    // while it runs (~16 s: 24 MB), then removed (~11 s at 32: 44 MB).
    let image = random_image(&mesh, "disk.img", 0xb0d8, 100 * MB);
    let text = |version: u64, link: Option<&str>| pair_topology(&mesh, version, &image, Some("{ limit = \"32Mbit\" }"), link);
    let (open, linked, unlinked) = (text(1, None), text(2, Some("12Mbit")), text(3, None));
    mesh.write_file("topology.toml", &open);
    start_all(&mut mesh, &["src", "dst"]);

    let sync = mesh.spawn_ctl("src", &["sync-now", "vol"]);
    wait_until("the cycle sends", Duration::from_secs(30), || progress(&mesh, "src", "vol").is_some_and(|b| b > 0));
    reload_src(&mesh, &linked, 12_000_000);
    assert_eq!(volume_row(&mesh, "src", "vol")["bandwidth"]["reason"], "capped 12 Mbit/s by link limit");
    let linked_rate = measure(&mesh, "src", "vol", 15);
    assert_within_10_percent("rate after a reload added a 12 Mbit/s link", linked_rate, 12e6);
    reload_src(&mesh, &unlinked, 32_000_000);
    let unlinked_rate = measure(&mesh, "src", "vol", 10);
    assert_within_10_percent("rate after a reload removed the link", unlinked_rate, 32e6);

    let data = finish(&mesh, "src", sync);
    assert!(report(&data)["stats"]["sent_payload_bytes"].as_u64().unwrap_or(0) >= 100 * MB as u64, "{data}");
}

#[test]
fn a_link_cap_paces_a_restore_fetched_over_it() {
    let mut mesh = TestMesh::new(&["src", "dst"]);
    // Replicated with no cap, then restored on the source (which holds no
    // RPs) from the target over a 16 Mbit/s link: 24 MB, about 12 s.
    let image = random_image(&mesh, "disk.img", 0xb0d7, 24 * MB);
    let text = |version: u64, link: Option<&str>| pair_topology(&mesh, version, &image, None, link);
    let (open, capped) = (text(1, None), text(2, Some("16Mbit")));
    mesh.write_file("topology.toml", &open);
    start_all(&mut mesh, &["src", "dst"]);
    let seq = report_seq(&mesh.sync_ok("src", "vol"));

    mesh.write_file("topology.toml", &capped);
    for n in ["dst", "src"] {
        let out = mesh.ctl(n, &["reload"]);
        assert!(out.status.success(), "reload {n}: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_until("the link cap is in force", Duration::from_secs(10), || volume_row(&mesh, "src", "vol")["bandwidth"]["link_cap_bps"] == 16_000_000);

    let to = mesh.dir.path().join("restored.img");
    let out = mesh.restore("src", &format!("vol@{seq}"), &to, None);
    assert!(out.status.success(), "restore over the link failed: {}\n--- dst log:\n{}", String::from_utf8_lossy(&out.stderr), mesh.node("dst").log_text());
    let data: Value = drmesh_tests::restore_result(&out).expect("restore --json prints its report");
    assert_eq!(drmesh_tests::file_hash(&to), drmesh_tests::hash_hex(&std::fs::read(&image).expect("read image")), "the restored image differs");
    let payload = data["payload_bytes"].as_u64().expect("payload_bytes");
    assert!(payload >= 24 * MB as u64, "random data comes whole: {data}");
    // dst serves the fetch under the link's cap, as it would replicate to src.
    let rate = payload as f64 * 8.0 / data["duration_secs"].as_f64().expect("duration_secs");
    assert_within_10_percent("payload rate of the restore fetched over the link", rate, 16e6);
}
