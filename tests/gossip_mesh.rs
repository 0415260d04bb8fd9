//! Story: every node of the mesh knows every recovery point and which nodes
//! are alive, by gossip over the authenticated QUIC connections. An RP
//! committed on one target shows up in `drmesh ctl catalog` on every node; a
//! node killed with SIGKILL turns suspect, then down, in `drmesh ctl mesh` on
//! the others; restarted, it answers `ctl catalog` at once from its saved
//! replica (gossip.redb) and catches up with what it missed.

use std::time::{Duration, Instant};

use drmesh_tests::{report_seq, wait_until, write_image_atomic, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;

fn catalog(mesh: &TestMesh, name: &str) -> Value {
    mesh.ctl_data(name, &["catalog"]).unwrap_or_else(|e| panic!("ctl catalog on {name}: {e}"))
}

/// Whether `name`'s catalog lists `vol@seq` held by `holder`.
fn catalog_has(mesh: &TestMesh, name: &str, seq: u64, holder: &str) -> bool {
    catalog(mesh, name)["rps"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["volume"] == "vol" && r["seq"] == seq && r["holder"] == holder)
}

/// State of `peer` in `name`'s `ctl mesh` ("alive", "suspect", "down", "unknown").
fn member_state(mesh: &TestMesh, name: &str, peer: &str) -> Option<String> {
    let data = mesh.ctl_data(name, &["mesh"]).ok()?;
    data["members"].as_array()?.iter().find(|m| m["name"] == peer).and_then(|m| m["state"].as_str().map(String::from))
}

#[test]
fn catalog_and_membership_spread_by_gossip() {
    let mut mesh = TestMesh::new(&["a", "b", "c"]);
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x6055_1901);
    let mut image = drmesh_tests::build_image(&mut rng, 4 * MIB);
    write_image_atomic(&image_path, &image);
    let vol = VolumeSpec::new("vol", "a", &["b"], &image_path, "p");
    let text = mesh.replication_topology(1, &["a", "b", "c"], &[vol], &[PolicySpec::new("p", "256KiB")]);
    mesh.write_file("topology.toml", &text);
    for n in ["a", "b", "c"] {
        mesh.start(n, "topology.toml");
    }
    mesh.wait_connected("a", &["b", "c"]);
    mesh.wait_connected("b", &["c"]);

    // Membership: everyone alive everywhere, with site, version and topology.
    for n in ["a", "b", "c"] {
        for p in ["a", "b", "c"].iter().filter(|p| **p != n) {
            let what = format!("{n} sees {p} alive by gossip");
            wait_until(&what, Duration::from_secs(20), || member_state(&mesh, n, p).as_deref() == Some("alive"));
        }
    }
    wait_until("a knows c's status (site, version, topology)", Duration::from_secs(20), || {
        let data = mesh.ctl_data("a", &["mesh"]).unwrap();
        data["members"].as_array().unwrap().iter().any(|m| m["name"] == "c" && m["site"] == "lab" && m["topology_matches"] == true)
    });

    // An RP committed on b reaches the catalog of a (the source) and c (a bystander).
    let first = report_seq(&mesh.sync_ok("a", "vol"));
    for n in ["b", "a", "c"] {
        let what = format!("{n}'s catalog lists vol@{first} held by b");
        wait_until(&what, Duration::from_secs(20), || catalog_has(&mesh, n, first, "b"));
    }
    let data = catalog(&mesh, "c");
    let v = data["volumes"].as_array().unwrap().iter().find(|v| v["volume"] == "vol").cloned().expect("vol in c's catalog");
    assert_eq!(v["rpo_met"], true, "a fresh RP meets the 1h RPO: {v}");
    assert_eq!(v["last_seq"], first);
    assert_eq!(v["last_holders"], serde_json::json!(["b"]));
    let rp = data["rps"].as_array().unwrap().iter().find(|r| r["seq"] == first).unwrap();
    assert_eq!(rp["size_bytes"], 4 * MIB as u64);
    let human = mesh.ctl("c", &["catalog", "vol"]);
    let human = String::from_utf8_lossy(&human.stdout);
    println!("ctl catalog vol on c:\n{human}");
    assert!(human.contains("RPO met") && human.contains(&format!("vol@{first}")), "ctl catalog table:\n{human}");

    // c saves its replica every 10 s: let one save pass before the crash.
    std::thread::sleep(Duration::from_secs(11));

    // kill -9 c: suspect, then down, on a and b.
    mesh.kill9("c");
    let mut seen_suspect = false;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let states: Vec<Option<String>> = ["a", "b"].iter().map(|n| member_state(&mesh, n, "c")).collect();
        seen_suspect |= states.iter().any(|s| s.as_deref() == Some("suspect"));
        if states.iter().all(|s| s.as_deref() == Some("down")) {
            break;
        }
        assert!(Instant::now() < deadline, "c not declared down on a and b: {states:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen_suspect, "c went down without a suspect phase");
    let human = String::from_utf8_lossy(&mesh.ctl("a", &["mesh"]).stdout).to_string();
    println!("ctl mesh on a:\n{human}");
    assert!(human.contains("down"), "ctl mesh table:\n{human}");

    // While c is down, a second RP is committed on b.
    rng.fill(&mut image[..64 * 1024]);
    write_image_atomic(&image_path, &image);
    let second = report_seq(&mesh.sync_ok("a", "vol"));
    assert!(second > first);

    // Restarted, c answers from its saved replica at once, then catches up.
    mesh.start("c", "topology.toml");
    let data = catalog(&mesh, "c");
    assert_eq!(data["replica_restored"], true, "c restored its replica: {data}");
    assert!(
        data["rps"].as_array().unwrap().iter().any(|r| r["seq"] == first && r["holder"] == "b"),
        "c's first answer after restart lists vol@{first} from its saved replica: {data}"
    );
    wait_until("c catches up with the RP committed while it was down", Duration::from_secs(30), || catalog_has(&mesh, "c", second, "b"));
    for n in ["a", "b"] {
        let what = format!("{n} sees the restarted c alive again");
        wait_until(&what, Duration::from_secs(30), || member_state(&mesh, n, "c").as_deref() == Some("alive"));
    }
    wait_until("c sees a and b alive", Duration::from_secs(30), || {
        ["a", "b"].iter().all(|p| member_state(&mesh, "c", p).as_deref() == Some("alive"))
    });

    // A failing cycle (its target stopped) is published by the source: a bystander
    // sees the volume's last error in its own catalog.
    assert!(mesh.stop("b"));
    let failed = mesh.ctl("a", &["sync-now", "vol"]);
    assert!(!failed.status.success(), "sync-now to a stopped target succeeded");
    wait_until("c's catalog shows vol's last cycle error", Duration::from_secs(30), || {
        catalog(&mesh, "c")["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["volume"] == "vol" && v["last_error"].as_str().is_some_and(|e| e.contains("not connected")))
    });

    // A clean stop saves the replica too; nothing in the logs about bad datagrams.
    assert!(mesh.stop("c"));
    for n in ["a", "b"] {
        assert!(!mesh.node(n).log_text().contains("panicked"), "{n} log:\n{}", mesh.node(n).log_text());
    }
}

// ---------------------------------------------------------------------------
// Network namespaces: a node cut off (link down) for a while converges after
// the link comes back. Needs root and `ip`; skipped (with a message) otherwise.
// ---------------------------------------------------------------------------

use std::path::Path;
use std::process::{Child, Command, Stdio};

fn sh(args: &[&str]) -> bool {
    Command::new("ip").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Namespaces, bridge and node processes; all removed on drop.
struct NetLab {
    tag: String,
    names: Vec<String>,
    children: Vec<Child>,
}

impl NetLab {
    fn ns(&self, node: &str) -> String {
        format!("{}{node}", self.tag)
    }

    fn veth(&self, node: &str) -> String {
        format!("{}v{node}", self.tag)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    /// One namespace per node on a bridge, 10.211.0.(i+1)/24.
    fn new(nodes: &[&str]) -> Option<NetLab> {
        let tag = format!("dg{}", std::process::id() % 100_000);
        let lab = NetLab { tag, names: nodes.iter().map(|n| n.to_string()).collect(), children: Vec::new() };
        if !sh(&["link", "add", &lab.bridge(), "type", "bridge"]) {
            return None;
        }
        sh(&["link", "set", &lab.bridge(), "up"]);
        for (i, n) in nodes.iter().enumerate() {
            let (ns, veth, peer) = (lab.ns(n), lab.veth(n), format!("{}p{n}", lab.tag));
            let ok = sh(&["netns", "add", &ns])
                && sh(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])
                && sh(&["link", "set", &peer, "master", &lab.bridge(), "up"])
                && sh(&["link", "set", &veth, "netns", &ns])
                && sh(&["-n", &ns, "addr", "add", &format!("10.211.0.{}/24", i + 1), "dev", &veth])
                && sh(&["-n", &ns, "link", "set", &veth, "up"])
                && sh(&["-n", &ns, "link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
        }
        Some(lab)
    }

    fn start(&mut self, mesh: &TestMesh, node: &str, topology: &Path) {
        let child = drmesh_tests::start_in_netns(mesh, node, &self.ns(node), topology);
        self.children.push(child);
    }

    fn link(&self, node: &str, up: bool) {
        assert!(sh(&["-n", &self.ns(node), "link", "set", &self.veth(node), if up { "up" } else { "down" }]));
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            sh(&["netns", "del", &self.ns(n)]);
        }
        sh(&["link", "del", &self.bridge()]);
    }
}

/// `wait_until`, but on time-out prints every node's gossip and peer views and gossip log lines first.
fn wait_or_dump(mesh: &TestMesh, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() >= deadline {
            for n in &mesh.nodes {
                eprintln!("--- {} mesh: {:?}", n.name, mesh.ctl_data(&n.name, &["mesh"]).map(|d| d["members"].clone()));
                eprintln!("--- {} peers: {:?}", n.name, mesh.ctl_data(&n.name, &["peers"]));
                for line in n.log_text().lines().filter(|l| l.contains("gossip") || l.contains("peer")) {
                    eprintln!("{} | {line}", n.name);
                }
            }
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cut_off_node_converges_after_the_link_returns() {
    let mesh = TestMesh::new(&["a", "b", "c"]);
    let Some(mut lab) = NetLab::new(&["a", "b", "c"]) else {
        eprintln!("skipped: cannot make network namespaces (needs root and `ip`: netns, bridge, veth)");
        return;
    };
    let image_path = mesh.dir.path().join("disk.img");
    let mut rng = Rng::new(0x6055_1902);
    let mut image = drmesh_tests::build_image(&mut rng, 4 * MIB);
    write_image_atomic(&image_path, &image);
    let entries: Vec<drmesh_tests::Entry<'_>> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| drmesh_tests::Entry { name: n, address: Some(format!("10.211.0.{}:{}", i + 1, mesh.node(n).port)) })
        .collect();
    let mut text = mesh.topology_text(1, &entries);
    text.push_str(&VolumeSpec::new("vol", "a", &["b"], &image_path, "p").text());
    text.push_str(&PolicySpec::new("p", "256KiB").text());
    let topology = mesh.write_file("topology.toml", &text);
    for n in ["a", "b", "c"] {
        lab.start(&mesh, n, &topology);
    }
    mesh.wait_connected("a", &["b", "c"]);
    mesh.wait_connected("b", &["c"]);
    for n in ["a", "b", "c"] {
        for p in ["a", "b", "c"].iter().filter(|p| **p != n) {
            let what = format!("{n} sees {p} alive by gossip");
            wait_until(&what, Duration::from_secs(30), || member_state(&mesh, n, p).as_deref() == Some("alive"));
        }
    }
    let first = report_seq(&mesh.sync_ok("a", "vol"));
    wait_until("c lists the first RP", Duration::from_secs(20), || catalog_has(&mesh, "c", first, "b"));

    // Cut c off: a and b declare it down; c sees them down.
    lab.link("c", false);
    let cut = Instant::now();
    for n in ["a", "b"] {
        let what = format!("{n} declares the cut-off c down");
        wait_until(&what, Duration::from_secs(40), || member_state(&mesh, n, "c").as_deref() == Some("down"));
    }
    wait_until("c declares a and b down", Duration::from_secs(40), || {
        ["a", "b"].iter().all(|p| member_state(&mesh, "c", p).as_deref() == Some("down"))
    });
    // Meanwhile a new RP is committed on b, which c cannot hear of.
    rng.fill(&mut image[..64 * 1024]);
    write_image_atomic(&image_path, &image);
    let second = report_seq(&mesh.sync_ok("a", "vol"));
    assert!(!catalog_has(&mesh, "c", second, "b"), "c heard of vol@{second} through a cut link");
    // Keep the link down past the QUIC idle timeout, so connections are gone too.
    while cut.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }

    // Link back: c's catalog converges, and membership heals although both
    // sides had declared each other down (an anti-entropy round that picks a
    // down member announces to it; the answer "turn undead" makes the stale
    // side rejoin under a new generation).
    lab.link("c", true);
    wait_or_dump(&mesh, "c learns the RP committed while it was cut off", Duration::from_secs(60), || catalog_has(&mesh, "c", second, "b"));
    println!("catalog converged {:?} after the cut began", cut.elapsed());
    for n in ["a", "b", "c"] {
        for p in ["a", "b", "c"].iter().filter(|p| **p != n) {
            let what = format!("{n} sees {p} alive again after the heal");
            wait_or_dump(&mesh, &what, Duration::from_secs(60), || member_state(&mesh, n, p).as_deref() == Some("alive"));
        }
    }
    println!("membership healed {:?} after the cut began", cut.elapsed());
}
