//! Story: a branch office node sits behind NAT. It has no reachable address
//! (no `addresses` in the topology) and its network lets it open connections to
//! headquarters only; nothing can connect into it. The branch dials HQ, and that
//! one connection carries traffic both ways:
//! - branch → HQ: the branch's volume replicates to HQ (RP at HQ, restores identical);
//! - HQ → branch: HQ's volume replicates to the branch, HQ's gossip (the RP catalog)
//!   reaches the branch, and the branch restores an RP it does not hold from HQ.
//!
//! Runs in network namespaces: needs root, `ip` and nftables (or iptables);
//! skipped with a message otherwise.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drmesh_tests::{build_image, file_hash, hash_hex, report_seq, wait_until, write_image_atomic, Entry, PolicySpec, Rng, TestMesh, VolumeSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;
const HQ_IP: &str = "10.213.0.1";
const BRANCH_IP: &str = "10.213.0.2";

fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn ip(args: &[&str]) -> bool {
    run("ip", args)
}

/// Two namespaces, `hq` and `branch`, joined by one veth pair. Each has a host
/// route to the other and nothing else: no default route, no other network.
/// The branch drops every new inbound UDP flow, as a NAT would.
struct NatLab {
    tag: String,
    children: Vec<Child>,
    /// Whether the drop rule is nftables' (it then counts what it drops).
    nft: bool,
}

impl NatLab {
    fn ns(&self, node: &str) -> String {
        format!("{}{node}", self.tag)
    }

    fn new() -> Option<NatLab> {
        let mut lab = NatLab { tag: format!("nat{}", std::process::id() % 100_000), children: Vec::new(), nft: false };
        let (hq, branch) = (lab.ns("hq"), lab.ns("branch"));
        let (hq_dev, br_dev) = (format!("{}h", lab.tag), format!("{}b", lab.tag));
        let ok = ip(&["netns", "add", &hq])
            && ip(&["netns", "add", &branch])
            && ip(&["link", "add", &hq_dev, "netns", &hq, "type", "veth", "peer", "name", &br_dev, "netns", &branch])
            && ip(&["-n", &hq, "addr", "add", &format!("{HQ_IP}/32"), "dev", &hq_dev])
            && ip(&["-n", &branch, "addr", "add", &format!("{BRANCH_IP}/32"), "dev", &br_dev])
            && ip(&["-n", &hq, "link", "set", &hq_dev, "up"])
            && ip(&["-n", &branch, "link", "set", &br_dev, "up"])
            && ip(&["-n", &hq, "link", "set", "lo", "up"])
            && ip(&["-n", &branch, "link", "set", "lo", "up"])
            && ip(&["-n", &hq, "route", "add", &format!("{BRANCH_IP}/32"), "dev", &hq_dev])
            && ip(&["-n", &branch, "route", "add", &format!("{HQ_IP}/32"), "dev", &br_dev]);
        if !ok {
            return None;
        }
        // Inbound UDP that does not belong to a flow the branch opened is dropped.
        let rules = "table inet natlab {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    iifname \"lo\" accept\n    ct state established,related accept\n    meta l4proto udp ct state new counter drop\n  }\n}\n";
        let nft = Command::new("ip")
            .args(["netns", "exec", &branch, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().expect("piped").write_all(rules.as_bytes())?;
                c.wait()
            })
            .is_ok_and(|s| s.success());
        let firewalled = nft
            || run(
                "ip",
                &["netns", "exec", &branch, "iptables", "-A", "INPUT", "-p", "udp", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"],
            );
        if !firewalled {
            eprintln!("cannot install the inbound drop rule in the branch namespace (nft/iptables with conntrack)");
            return None;
        }
        lab.nft = nft;
        Some(lab)
    }

    /// Packets the branch's drop rule has dropped (nftables only).
    fn dropped(&self) -> Option<u64> {
        if !self.nft {
            return None;
        }
        let out = Command::new("ip").args(["netns", "exec", &self.ns("branch"), "nft", "list", "table", "inet", "natlab"]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let at = text.find("packets ")? + "packets ".len();
        text[at..].split_whitespace().next()?.parse().ok()
    }

    /// Sends one UDP datagram from HQ's namespace (a fresh source port) to the branch.
    fn probe_from_hq(&self, port: u16) -> bool {
        let script = format!("echo probe > /dev/udp/{BRANCH_IP}/{port}");
        run("ip", &["netns", "exec", &self.ns("hq"), "bash", "-c", &script])
    }

    fn start(&mut self, mesh: &TestMesh, node: &str, topology: &Path) {
        let child = drmesh_tests::start_in_netns(mesh, node, &self.ns(node), topology);
        self.children.push(child);
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespaces removes the veth pair and the rules with them.
        ip(&["netns", "del", &self.ns("hq")]);
        ip(&["netns", "del", &self.ns("branch")]);
    }
}

fn restored_hash(mesh: &TestMesh, name: &str, rp: &str, from: Option<&str>) -> String {
    let to = mesh.dir.path().join(format!("restored-{name}-{}.img", rp.replace('@', "-")));
    let out = mesh.restore(name, rp, &to, from);
    assert!(out.status.success(), "restore {rp} on {name} (from {from:?}) failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    let hash = file_hash(&to);
    std::fs::remove_file(&to).expect("remove restored image");
    hash
}

fn peer(mesh: &TestMesh, name: &str, peer: &str) -> Value {
    mesh.peer(name, peer).unwrap_or_else(|| panic!("{name} lists no peer {peer}"))
}

#[test]
fn branch_without_address_dials_and_its_connection_carries_both_ways() {
    let mesh = TestMesh::new(&["hq", "branch"]);
    let Some(mut lab) = NatLab::new() else {
        eprintln!("skipped: cannot make the NAT lab (needs root, `ip` with netns and veth, nft or iptables)");
        return;
    };
    let mut rng = Rng::new(0x0a7b_0001);
    let up_path = mesh.dir.path().join("branch-disk.img");
    let up_image = build_image(&mut rng, 8 * MIB);
    write_image_atomic(&up_path, &up_image);
    let down_path = mesh.dir.path().join("hq-disk.img");
    let down_image = build_image(&mut rng, 4 * MIB);
    write_image_atomic(&down_path, &down_image);

    // HQ has an address; the branch has none (behind NAT).
    let hq_port = mesh.node("hq").port;
    let mut text = mesh.topology_text(
        1,
        &[Entry { name: "hq", address: Some(format!("{HQ_IP}:{hq_port}")) }, Entry { name: "branch", address: None }],
    );
    text.push_str(&VolumeSpec::new("up", "branch", &["hq"], &up_path, "p").text());
    text.push_str(&VolumeSpec::new("down", "hq", &["branch"], &down_path, "p").text());
    text.push_str(&PolicySpec::new("p", "256KiB").text());
    let topology = mesh.write_file("topology.toml", &text);
    lab.start(&mesh, "hq", &topology);
    lab.start(&mesh, "branch", &topology);

    // The branch dials; HQ waits for it and sees it inbound.
    mesh.wait_connected("branch", &["hq"]);
    mesh.wait_connected("hq", &["branch"]);
    let at_branch = peer(&mesh, "branch", "hq");
    let at_hq = peer(&mesh, "hq", "branch");
    assert_eq!(at_branch["direction"], "outbound", "{at_branch}");
    assert_eq!(at_hq["direction"], "inbound", "{at_hq}");
    assert_eq!(at_hq["remote"].as_str().map(|r| r.starts_with(BRANCH_IP)), Some(true), "{at_hq}");
    let listen = mesh.ctl_json("branch", "status").expect("status")["listen"].clone();
    eprintln!("branch listens on {listen}, HQ sees it at {}", at_hq["remote"]);

    // Branch → HQ: the branch's volume lands at HQ.
    let up_seq = report_seq(&mesh.sync_ok("branch", "up"));
    assert_eq!(mesh.rp_seqs("hq", "up"), vec![up_seq]);
    assert_eq!(restored_hash(&mesh, "hq", &format!("up@{up_seq}"), None), hash_hex(&up_image), "up@{up_seq} at HQ differs");

    // HQ → branch, on the connection the branch opened: HQ's volume lands at the branch.
    let down_seq = report_seq(&mesh.sync_ok("hq", "down"));
    assert_eq!(mesh.rp_seqs("branch", "down"), vec![down_seq]);
    assert_eq!(restored_hash(&mesh, "branch", &format!("down@{down_seq}"), None), hash_hex(&down_image), "down@{down_seq} at the branch differs");

    // HQ → branch: gossip tells the branch where its own volume's RP is held.
    wait_until("the branch's catalog lists up held by hq", Duration::from_secs(30), || {
        mesh.ctl_data("branch", &["catalog"]).is_ok_and(|c| {
            c["rps"].as_array().into_iter().flatten().any(|r| r["volume"] == "up" && r["seq"] == up_seq && r["holder"] == "hq")
        })
    });
    // HQ → branch: the branch reads back its RP from HQ (a disk-loss restore).
    assert_eq!(restored_hash(&mesh, "branch", &format!("up@{up_seq}"), Some("hq")), hash_hex(&up_image), "up@{up_seq} read from HQ differs");

    // Nothing of that was a flow HQ opened: the branch's drop rule saw none; a
    // datagram HQ sends on its own to the branch's port is dropped.
    if let Some(dropped) = lab.dropped() {
        assert_eq!(dropped, 0, "HQ opened flows into the branch");
        let port: u16 = listen.as_str().and_then(|l| l.rsplit(':').next()).and_then(|p| p.parse().ok()).expect("branch listen port");
        assert!(lab.probe_from_hq(port), "sending a probe from HQ's namespace");
        wait_until("the branch drops HQ's unsolicited datagram", Duration::from_secs(5), || lab.dropped().unwrap_or(0) >= 1);
    } else {
        eprintln!("note: iptables drop rule, its counter is not checked");
    }

    // All of it went over the one connection the branch opened.
    let at_branch = peer(&mesh, "branch", "hq");
    let at_hq = peer(&mesh, "hq", "branch");
    assert_eq!(at_branch["connect_count"], 1, "{at_branch}");
    assert_eq!(at_hq["connect_count"], 1, "{at_hq}");
    assert_eq!(at_hq["direction"], "inbound", "{at_hq}");
    for n in ["hq", "branch"] {
        let log = mesh.node(n).log_text();
        assert!(!log.contains("panicked"), "{n} log:\n{log}");
    }
}
