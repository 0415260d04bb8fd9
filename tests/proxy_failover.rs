//! Story: a hypervisor host (the platform `hv`) runs its VMs' disks in three
//! qemu-storage-daemons, four small qcow2 disks each, one monitor (QMP)
//! socket and one NBD server per daemon. Three proxy nodes `p1`, `p2`, `p3`
//! can all reach it; the twelve disks are twelve `qemu` volumes whose
//! `source` is the platform, replicated to one target `t1` (RPO 5 s, lease
//! 5 s). Each volume is read by one live proxy, chosen by rendezvous hashing
//! over the proxies gossip reports alive, under a lease from `t1`.
//!
//! - In a stable mesh every volume's RPs come from one proxy, and the
//!   volumes are spread over more than one proxy (each RP records the proxy
//!   that committed it: `source_node` in `ctl rps` on the target).
//! - The proxy with the most volumes dies (kill -9). Gossip marks it down,
//!   its leases run out on `t1`, and each of its volumes gets an RP
//!   committed by one surviving proxy. The new proxy takes the target's
//!   newest RP as its baseline and trusts qemu's dirty bitmap from there:
//!   that first RP reads and stores nothing for a disk that did not change,
//!   and exactly the four blocks of a write made into one disk while no
//!   proxy read it. The failover time of each volume is printed (figures,
//!   not assertions).
//! - The volumes of the surviving proxies never change proxy; on `t1`, every
//!   volume's RPs have strictly increasing seqs and snapshot times (no RP
//!   out of order, none twice).
//! - Data written into a moved disk (through the daemon's NBD export, as the
//!   VM would) is in the next RP, byte for byte; every volume's first RP by
//!   its new proxy and every volume's newest RP restore to the disk as it is.
//! - Every volume meets its RPO again afterwards.
//! - The dead proxy comes back: its volumes move back to it (same node id,
//!   same rendezvous scores), and its first RP of each is the disk as it is,
//!   although its own baseline is from before its death and two disks were
//!   written since; the other volumes still never move.
//!
//! Second story, fencing across a partition: the same platform with two
//! daemons of three disks (six volumes), the same lease and RPO. In a
//! stable mesh, the proxy with the most volumes (the victim) is cut off from
//! every other node, alive: an nftables table drops every UDP datagram from
//! or to its port (all nodes are on loopback), for 20 s at least. The cut
//! comes just before one of the victim's cycles is due, so that cycle starts
//! with the lease held but no target to answer it.
//!
//! - The victim cannot renew its leases: it takes no qemu view once less
//!   than half its lease can be left (no "took a qemu view" in its log later
//!   than the cut plus half the lease, plus 1 s of slack, until the heal),
//!   and every view it held lets go of qemu (its cycle ended) within the
//!   lease after the cut (3/4 of it to notice, plus 1 s of slack).
//! - The others see it down, and each of its volumes gets an RP committed by
//!   one of them; the one disk of the victim written during the cut is in
//!   that first RP, exactly its four blocks (the dirty bitmap lost nothing
//!   to the victim's stopped views); the others' first RPs hold nothing.
//! - No two proxies ever have a view of one volume open at once: each
//!   proxy's log gives, per volume, the spans from "took a qemu view" to the
//!   end of the cycle's run over it ("cycle committed", "cycle failed", or
//!   "connection lost before the target answered", each logged after the
//!   view was released), and spans of different proxies never overlap, over
//!   the whole run (the spans around the cut are printed, and the victim's
//!   log of its volumes while cut off).
//! - The victim commits no RP with a snapshot instant during the cut.
//! - The cut heals: the others see the victim alive again, its volumes come
//!   back to it (rendezvous), the other volumes never moved; every volume's
//!   RPs have strictly increasing seqs and snapshot times, and its newest RP
//!   restores to the disk exactly as qemu serves it (both disks written
//!   during the cut included).
//!
//! The figures (when the others saw the victim down, when the target
//! granted each of its volumes to another proxy, when that proxy's first RP
//! was taken, relative to the cut) are printed, not asserted.
//!
//! Needs qemu-storage-daemon, qemu-img and qemu-io (scripts/install-deps
//! installs qemu-utils); the second story also needs root and nftables
//! (`nft`), and is skipped with a message without them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drmesh_tests::{build_image, file_hash, hash_hex, run_ok, wait_until, PolicySpec, Rng, TestMesh};
use serde_json::Value;

const MIB: usize = 1 << 20;
/// Size of each VM disk.
const DISK_MIB: usize = 16;
const DAEMONS: usize = 3;
const DISKS_PER_DAEMON: usize = 4;
const PROXIES: [&str; 3] = ["p1", "p2", "p3"];
const TARGET: &str = "t1";
const PLATFORM: &str = "hv";
/// The policy's RPO (a cycle of each volume every few seconds).
const RPO: Duration = Duration::from_secs(5);
/// The platform's lease.
const LEASE: Duration = Duration::from_secs(5);
/// The second story's disks: two daemons of three.
const CUT_DAEMONS: usize = 2;
const CUT_DISKS_PER_DAEMON: usize = 3;
/// The victim stays cut off at least this long.
const CUT_MIN: Duration = Duration::from_secs(20);
/// Slack on the instants in the logs (a cycle's start to its "took a qemu
/// view" line; a stop to the release of its view on a loaded machine).
const SLACK_MS: u64 = 1_000;

/// Kills the child on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One VM disk: block node `disk{index}` of daemon `daemon`, the volume `volume`.
struct Disk {
    volume: String,
    index: usize,
    /// Seed of its first content ([`build_image`]).
    seed: u64,
    /// The daemon's monitor and NBD server sockets, and the fleece folder of its volumes.
    qmp: PathBuf,
    nbd: PathBuf,
    fleece: PathBuf,
}

impl Disk {
    /// The disk's first content: random, text-like and zero regions.
    fn seed_image(&self) -> Vec<u8> {
        build_image(&mut Rng::new(self.seed), DISK_MIB * MIB)
    }

    /// The daemon's writable NBD export of the disk (what "the VM" writes through).
    fn export_uri(&self) -> String {
        format!("nbd+unix:///w{}?socket={}", self.index, self.nbd.display())
    }
}

/// qemu-storage-daemon with the qcow2 `disks` as block nodes disk0, disk1...,
/// an NBD server at `nbd` exporting each writable as w0, w1..., and its
/// monitor at `qmp`.
fn storage_daemon(disks: &[PathBuf], qmp: &Path, nbd: &Path) -> Proc {
    let _ = std::fs::remove_file(qmp);
    let mut cmd = Command::new("qemu-storage-daemon");
    for (i, disk) in disks.iter().enumerate() {
        cmd.arg("--blockdev").arg(format!("driver=file,node-name=file{i},filename={}", disk.display()));
        cmd.arg("--blockdev").arg(format!("driver=qcow2,node-name=disk{i},file=file{i}"));
    }
    // qemu runs one NBD server: the one "the VM" writes through is the one the proxies read from.
    cmd.arg("--nbd-server").arg(format!("addr.type=unix,addr.path={}", nbd.display()));
    for i in 0..disks.len() {
        cmd.arg("--export").arg(format!("type=nbd,id=w{i},node-name=disk{i},name=w{i},writable=on"));
    }
    let child = cmd
        .arg("--chardev")
        .arg(format!("socket,id=mon,path={},server=on,wait=off", qmp.display()))
        .args(["--monitor", "chardev=mon"])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (scripts/install-deps installs qemu-utils)");
    let daemon = Proc(child);
    wait_until("qemu-storage-daemon's monitor and NBD sockets", Duration::from_secs(60), || qmp.exists() && nbd.exists());
    daemon
}

/// The topology: the nodes, the platform `hv` of the three proxies, a
/// `qemu` volume per disk, and the policy.
fn platform_topology(mesh: &TestMesh, version: u64, names: &[&str], disks: &[Disk]) -> String {
    let mut text = mesh.standard_topology(version, names);
    let proxies: Vec<String> = PROXIES.iter().map(|p| format!("\"{p}\"")).collect();
    text.push_str(&format!("\n[[platform]]\nname = \"{PLATFORM}\"\nproxies = [{}]\nlease = \"{}s\"\n", proxies.join(", "), LEASE.as_secs()));
    for d in disks {
        text.push_str(&format!(
            "\n[[volume]]\nname = \"{}\"\nsource = \"{PLATFORM}\"\nkind = \"qemu\"\nmonitor = \"{}\"\nnode = \"disk{}\"\nfleece_dir = \"{}\"\nfleece_reserve = \"64MiB\"\nnbd = \"{}\"\ntargets = [\"{TARGET}\"]\npolicy = \"fast\"\n",
            d.volume,
            d.qmp.display(),
            d.index,
            d.fleece.display(),
            d.nbd.display()
        ));
    }
    let mut policy = PolicySpec::new("fast", "256KiB");
    policy.rpo = format!("{}s", RPO.as_secs());
    // Every RP of the run stays (the default keeps 24): the first ones by a new proxy are restored at the end.
    policy.keep_last = Some(1000);
    text.push_str(&policy.text());
    text
}

fn unix_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis()).expect("ms")
}

/// State of `peer` in `name`'s `ctl mesh` ("alive", "suspect", "down", ...).
fn member_state(mesh: &TestMesh, name: &str, peer: &str) -> Option<String> {
    let data = mesh.ctl_data(name, &["mesh"]).ok()?;
    data["members"].as_array()?.iter().find(|m| m["name"] == peer).and_then(|m| m["state"].as_str().map(String::from))
}

/// What each node says, for a failure message: its status' topology
/// version and last reload, and the tail of its log.
fn diagnostics(mesh: &TestMesh) -> String {
    let mut out = String::new();
    for n in &mesh.nodes {
        let status = mesh.ctl_json(&n.name, "status");
        let (version, reload) = status.as_ref().map_or((Value::Null, Value::Null), |s| (s["topology_version"].clone(), s["last_reload"].clone()));
        out.push_str(&format!("\n--- {} (topology version {version}, last reload {reload}), log tail:\n", n.name));
        let log = n.log_text();
        let lines: Vec<&str> = log.lines().collect();
        out.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
        out.push('\n');
    }
    out
}

/// Polls `check` every 500 ms until it is true; after `timeout`, panics
/// with `what` and what the nodes say.
fn wait_for(mesh: &TestMesh, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}{}", diagnostics(mesh));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One RP on the target, as `ctl rps --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rp {
    seq: u64,
    time_ms: u64,
    source: String,
    bytes_stored: u64,
    changed_blocks: u64,
}

impl Rp {
    fn of(v: &Value) -> Rp {
        let num = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in an RP of ctl rps: {v}"));
        Rp {
            seq: num("seq"),
            time_ms: num("time_unix_ms"),
            source: v["source_node"].as_str().unwrap_or_else(|| panic!("no source_node in an RP of ctl rps: {v}")).to_string(),
            bytes_stored: num("bytes_stored"),
            changed_blocks: num("changed_blocks"),
        }
    }
}

/// Every RP of every volume seen on the target so far (kept even if
/// retention removed it since), by volume and seq.
#[derive(Default)]
struct History(BTreeMap<String, BTreeMap<u64, Rp>>);

impl History {
    /// Reads `ctl rps` on the target: each volume's list must be in seq
    /// order with increasing snapshot times, and an RP seen before must not
    /// have changed.
    fn poll(&mut self, mesh: &TestMesh) {
        let Ok(data) = mesh.ctl_data(TARGET, &["rps"]) else { return };
        let mut lists: BTreeMap<String, Vec<Rp>> = BTreeMap::new();
        for v in data.as_array().into_iter().flatten() {
            let volume = v["volume"].as_str().unwrap_or_else(|| panic!("no volume in an RP of ctl rps: {v}")).to_string();
            lists.entry(volume).or_default().push(Rp::of(v));
        }
        for (volume, list) in lists {
            for pair in list.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                assert!(b.seq > a.seq, "{volume}: RP seqs out of order or twice on {TARGET}: @{} then @{}: {list:?}", a.seq, b.seq);
                assert!(b.time_ms > a.time_ms, "{volume}: {volume}@{} (by {}, at {}) is not younger than {volume}@{} (by {}, at {}): an RP out of order on {TARGET}", b.seq, b.source, b.time_ms, a.seq, a.source, a.time_ms);
            }
            let seen = self.0.entry(volume.clone()).or_default();
            for rp in list {
                if let Some(before) = seen.get(&rp.seq) {
                    assert_eq!(before, &rp, "{volume}@{} changed on {TARGET}", rp.seq);
                }
                seen.insert(rp.seq, rp);
            }
        }
    }

    fn of(&self, volume: &str) -> Vec<&Rp> {
        self.0.get(volume).map(|m| m.values().collect()).unwrap_or_default()
    }

    fn newest(&self, volume: &str) -> Option<&Rp> {
        self.0.get(volume).and_then(|m| m.values().next_back())
    }

    /// The proxies that committed `volume`'s RPs, in RP order, each once per run of RPs.
    fn sources(&self, volume: &str) -> Vec<String> {
        let mut runs: Vec<String> = Vec::new();
        for rp in self.of(volume) {
            if runs.last() != Some(&rp.source) {
                runs.push(rp.source.clone());
            }
        }
        runs
    }
}

/// Restores `volume@seq` from the target and returns the restored bytes.
fn restore_bytes(mesh: &TestMesh, volume: &str, seq: u64) -> Vec<u8> {
    let to = mesh.dir.path().join(format!("restored-{volume}-{seq}.raw"));
    let _ = std::fs::remove_file(&to);
    let out = mesh.restore(TARGET, &format!("{volume}@{seq}"), &to, None);
    assert!(out.status.success(), "restore {volume}@{seq}: {}", drmesh_tests::output_text(&out));
    let bytes = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    bytes
}

/// Where two images first differ, for a failure message.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    if got.len() != want.len() {
        return format!("{} bytes, expected {}", got.len(), want.len());
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(at) => format!("first difference at byte {at} (block {} of 256 KiB)", at / (256 << 10)),
        None => "identical".into(),
    }
}

/// Waits until every volume's newest RP on the target is younger than the
/// RPO plus some slack, and stays so for 10 s (two RPOs) in a row.
fn wait_rpo_met(mesh: &TestMesh, history: &mut History, disks: &[Disk]) {
    let slack = Duration::from_secs(10);
    let mut met_since: Option<Instant> = None;
    let what = format!("every volume's newest RP on {TARGET} is younger than the RPO ({} s) plus {} s, for 10 s in a row", RPO.as_secs(), slack.as_secs());
    wait_for(mesh, &what, Duration::from_secs(120), || {
        history.poll(mesh);
        let now = unix_ms();
        let bound = u64::try_from((RPO + slack).as_millis()).unwrap();
        let met = disks.iter().all(|d| history.newest(&d.volume).is_some_and(|r| now.saturating_sub(r.time_ms) < bound));
        if !met {
            met_since = None;
        }
        met && met_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(10)
    });
    history.poll(mesh);
}

/// The nodes of both stories: the proxies and the target.
fn lab_names() -> Vec<&'static str> {
    PROXIES.iter().copied().chain([TARGET]).collect()
}

/// Starts `daemons` qemu-storage-daemons of `disks_per_daemon` qcow2 disks
/// each (the volumes vm01, vm02..., the n-th disk's first content from seed
/// `seed + n`), then the mesh without volumes until every proxy sees every
/// node alive by gossip, then gives out the platform's volumes (topology
/// version 2) and waits until every node runs it. Keep the daemons alive as
/// long as the test runs.
fn start_platform(mesh: &mut TestMesh, daemons: usize, disks_per_daemon: usize, seed: u64) -> (Vec<Disk>, Vec<Proc>) {
    let names = lab_names();
    let dir = mesh.dir.path().to_path_buf();
    let mut disks: Vec<Disk> = Vec::new();
    let mut procs: Vec<Proc> = Vec::new();
    let seed_raw = dir.join("seed.raw");
    for d in 0..daemons {
        let (qmp, nbd, fleece) = (dir.join(format!("hv{d}.qmp")), dir.join(format!("hv{d}.nbd")), dir.join(format!("fleece{d}")));
        let mut images = Vec::new();
        for index in 0..disks_per_daemon {
            let n = d * disks_per_daemon + index;
            let disk = Disk { volume: format!("vm{:02}", n + 1), index, seed: seed + n as u64, qmp: qmp.clone(), nbd: nbd.clone(), fleece: fleece.clone() };
            std::fs::write(&seed_raw, disk.seed_image()).unwrap();
            let image = dir.join(format!("{}.qcow2", disk.volume));
            run_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(&seed_raw).arg(&image));
            images.push(image);
            disks.push(disk);
        }
        procs.push(storage_daemon(&images, &qmp, &nbd));
    }
    std::fs::remove_file(&seed_raw).unwrap();

    // The mesh first, without volumes: every proxy sees every node alive by
    // gossip before the platform's volumes are given out (so that each proxy
    // decides the same, from the first cycle on).
    mesh.write_file("topology.toml", &mesh.standard_topology(1, &names));
    for n in std::iter::once(TARGET).chain(PROXIES) {
        mesh.start(n, "topology.toml");
    }
    for p in PROXIES {
        let others: Vec<&str> = names.iter().copied().filter(|n| *n != p).collect();
        mesh.wait_connected(p, &others);
        for q in others {
            let what = format!("{p} sees {q} alive by gossip");
            wait_for(mesh, &what, Duration::from_secs(30), || member_state(mesh, p, q).as_deref() == Some("alive"));
        }
    }
    let text = platform_topology(mesh, 2, &names, &disks);
    let file = mesh.write_file("platform.toml", &text);
    let check = drmesh_tests::drmesh(&["topology", "check", file.to_str().unwrap()]);
    let said = drmesh_tests::output_text(&check);
    assert!(check.status.success() && !said.contains("NOT BUILT"), "topology check of the platform:\n{said}\n{text}");
    mesh.write_file("topology.toml", &text);
    wait_for(mesh, "every node runs topology version 2", Duration::from_secs(30), || {
        names.iter().all(|n| mesh.ctl_json(n, "status").is_some_and(|s| s["topology_version"] == 2))
    });
    (disks, procs)
}

/// Waits until every volume has `rps` RPs on the target, and returns each
/// volume's proxy: the one that committed all of its RPs (a stable mesh),
/// a proxy of the platform.
fn stable_owners(mesh: &TestMesh, history: &mut History, disks: &[Disk], rps: usize, given_at: Instant) -> BTreeMap<String, String> {
    wait_for(mesh, &format!("every volume has {rps} RPs on {TARGET}"), Duration::from_secs(180), || {
        history.poll(mesh);
        disks.iter().all(|d| history.of(&d.volume).len() >= rps)
    });
    eprintln!("every volume has {rps} RPs {:.1} s after the platform's volumes were given out", given_at.elapsed().as_secs_f64());
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for d in disks {
        let sources = history.sources(&d.volume);
        assert_eq!(sources.len(), 1, "{}: in a stable mesh, RPs by more than one proxy: {:?}", d.volume, history.of(&d.volume));
        owners.insert(d.volume.clone(), sources[0].clone());
    }
    for p in PROXIES {
        eprintln!("{p} reads {:?}", volumes_of(&owners, p));
    }
    assert!(owners.values().all(|p| PROXIES.contains(&p.as_str())), "RPs committed by nodes that are not proxies of {PLATFORM}: {owners:?}");
    owners
}

/// The volumes `proxy` reads in `owners`.
fn volumes_of(owners: &BTreeMap<String, String>, proxy: &str) -> Vec<String> {
    owners.iter().filter(|(_, p)| *p == proxy).map(|(v, _)| v.clone()).collect()
}

/// The proxy with the most volumes in `owners` (the first of them in PROXIES' order).
fn most_loaded(owners: &BTreeMap<String, String>) -> String {
    PROXIES.iter().copied().fold(PROXIES[0], |best, p| if volumes_of(owners, p).len() > volumes_of(owners, best).len() { p } else { best }).to_string()
}

#[test]
fn a_dead_proxys_volumes_move_to_the_live_proxies() {
    let names = lab_names();
    let mut mesh = TestMesh::new(&names);
    let dir = mesh.dir.path().to_path_buf();
    // Three daemons, four disks each, each disk with content of its own.
    // Declared after the mesh: the daemons go first, before its folder.
    let (disks, _daemons) = start_platform(&mut mesh, DAEMONS, DISKS_PER_DAEMON, 0xfa11_0000);
    // What each volume's RPs must restore to (the disks change only where this test writes).
    let seed_hash: BTreeMap<String, String> = disks.iter().map(|d| (d.volume.clone(), hash_hex(&d.seed_image()))).collect();
    let mut expected = seed_hash.clone();
    let given_at = Instant::now();

    // A stable mesh: each volume is read by one proxy, the volumes by more than one.
    let mut history = History::default();
    let owners = stable_owners(&mesh, &mut history, &disks, 3, given_at);
    let used: BTreeSet<&String> = owners.values().collect();
    // (All twelve on one proxy: a chance of 3^-11 with a sound hash.)
    assert!(used.len() > 1, "every volume is read by one proxy: {owners:?}");
    // Each proxy lists every volume of the platform and says who reads the ones it does not.
    let table = drmesh_tests::output_text(&mesh.ctl(PROXIES[0], &["volumes"]));
    eprintln!("`drmesh ctl volumes` on {}:\n{table}", PROXIES[0]);
    assert!(disks.iter().all(|d| table.contains(&d.volume)), "{table}");
    assert!(table.contains("standby: proxy "), "{} lists no volume another proxy reads:\n{table}", PROXIES[0]);

    // The proxy with the most volumes dies.
    let victim = most_loaded(&owners);
    let moved = volumes_of(&owners, &victim);
    let survivors: Vec<&str> = PROXIES.iter().copied().filter(|p| *p != victim).collect();
    let (kill_ms, killed_at) = (unix_ms(), Instant::now());
    mesh.kill9(&victim);
    eprintln!("killed {victim} (kill -9), which read {moved:?}");
    // While no proxy reads it, the VM writes into one of them: qemu's dirty
    // bitmap records it, and the new proxy, which takes the target's newest
    // RP as its baseline, reads exactly the blocks it marks.
    let dark = disks.iter().find(|d| d.volume == moved[0]).expect("a moved disk");
    let (dark_offset, dark_len, dark_pattern) = (12 * MIB, MIB, 0x5au8);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P 0x{dark_pattern:02x} {dark_offset} {dark_len}"), &dark.export_uri()]));
    let mut dark_want = dark.seed_image();
    dark_want[dark_offset..dark_offset + dark_len].fill(dark_pattern);
    expected.insert(dark.volume.clone(), hash_hex(&dark_want));
    let mut first_want = seed_hash.clone();
    first_want.insert(dark.volume.clone(), hash_hex(&dark_want));

    let mut first_new: BTreeMap<String, (Rp, Duration)> = BTreeMap::new();
    let mut down_after: Option<Duration> = None;
    wait_for(&mesh, &format!("every volume of {victim} has an RP committed by another proxy"), Duration::from_secs(180), || {
        if down_after.is_none() && member_state(&mesh, survivors[0], &victim).as_deref() == Some("down") {
            down_after = Some(killed_at.elapsed());
        }
        history.poll(&mesh);
        for v in &moved {
            if !first_new.contains_key(v) {
                if let Some(rp) = history.of(v).into_iter().find(|r| r.source != victim) {
                    first_new.insert(v.clone(), (rp.clone(), killed_at.elapsed()));
                }
            }
        }
        first_new.len() == moved.len()
    });
    match down_after {
        Some(t) => eprintln!("{} saw {victim} down {:.1} s after the kill", survivors[0], t.as_secs_f64()),
        None => eprintln!("{} did not show {victim} down (yet) when the last volume had moved", survivors[0]),
    }
    let mut max_failover = 0u64;
    for (v, (rp, seen)) in &first_new {
        let failover = rp.time_ms.saturating_sub(kill_ms);
        max_failover = max_failover.max(failover);
        eprintln!(
            "failover {v}: {victim} -> {}: {v}@{} taken {:.1} s after the kill (seen on {TARGET} after {:.1} s): {} changed blocks, {} bytes stored",
            rp.source,
            rp.seq,
            failover as f64 / 1000.0,
            seen.as_secs_f64(),
            rp.changed_blocks,
            rp.bytes_stored
        );
        assert!(survivors.contains(&rp.source.as_str()), "{v}@{} committed by {}, not a live proxy of {PLATFORM}", rp.seq, rp.source);
        if *v == dark.volume {
            // Only the blocks the bitmap marks are read: the 1 MiB write, 4 blocks of 256 KiB.
            assert_eq!(rp.changed_blocks, (dark_len / (256 << 10)) as u64, "{v}@{}, the first RP by {} after the failover, does not hold exactly the blocks written while no proxy read it: {rp:?}", rp.seq, rp.source);
            assert!(rp.bytes_stored > 0, "{v}@{}: the write while no proxy read it stored nothing: {rp:?}", rp.seq);
        } else {
            // The disk did not change: the new proxy read nothing the bitmap did not mark, and sent nothing.
            assert_eq!((rp.changed_blocks, rp.bytes_stored), (0, 0), "{v}@{}, the first RP by {} after the failover, read or stored blocks although the disk did not change: {rp:?}", rp.seq, rp.source);
        }
    }
    eprintln!("failover: the slowest volume's first RP by its new proxy was taken {:.1} s after the kill (lease {}s, RPO {} s)", max_failover as f64 / 1000.0, LEASE.as_secs(), RPO.as_secs());

    // The VM writes into a moved disk; the next RP holds it.
    let written = disks.iter().find(|d| d.volume == moved[0]).expect("a moved disk");
    let (offset, len, pattern) = (3 * MIB + 4096, MIB, 0xa5u8);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P 0x{pattern:02x} {offset} {len}"), &written.export_uri()]));
    let written_ms = unix_ms();
    let mut want = dark_want.clone();
    want[offset..offset + len].fill(pattern);
    expected.insert(written.volume.clone(), hash_hex(&want));
    let now_raw = dir.join("disk-now.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "raw", &written.export_uri()]).arg(&now_raw));
    assert_eq!(file_hash(&now_raw), expected[&written.volume], "{}: the disk read through qemu is not the seed with the write", written.volume);
    std::fs::remove_file(&now_raw).unwrap();
    let mut after = None;
    // Its snapshot instant well after the write returned.
    wait_for(&mesh, &format!("an RP of {} taken after the write", written.volume), Duration::from_secs(120), || {
        history.poll(&mesh);
        after = history.of(&written.volume).into_iter().find(|r| r.time_ms > written_ms + 1000).cloned();
        after.is_some()
    });
    let after = after.unwrap();
    let got = restore_bytes(&mesh, &written.volume, after.seq);
    assert!(got == want, "{}@{} (by {}) is not the disk with the write: {}", written.volume, after.seq, after.source, first_difference(&got, &want));
    eprintln!("{}@{} (by {}) holds the VM's write: {} changed blocks, {} bytes stored", written.volume, after.seq, after.source, after.changed_blocks, after.bytes_stored);

    // Every volume meets its RPO again, and keeps meeting it.
    wait_rpo_met(&mesh, &mut history, &disks);

    // Only the dead proxy's volumes moved, each once, to one live proxy.
    for d in &disks {
        let v = &d.volume;
        let rps = history.of(v);
        let sources = history.sources(v);
        if moved.contains(v) {
            let new = &first_new[v].0.source;
            assert_eq!(&sources, &[victim.clone(), new.clone()], "{v}: moved from {victim} more than once: {rps:?}");
            assert!(rps.iter().filter(|r| r.source == victim).all(|r| r.time_ms < kill_ms), "{v}: an RP of {victim} taken after its kill: {rps:?}");
        } else {
            assert_eq!(sources, [owners[v].clone()], "{v}: its proxy {} is alive, yet the volume moved: {rps:?}", owners[v]);
        }
        // No RP out of order over the whole run (retention may have removed some since they were listed).
        for pair in rps.windows(2) {
            assert!(pair[1].time_ms > pair[0].time_ms, "{v}: @{} is not younger than @{}: {rps:?}", pair[1].seq, pair[0].seq);
        }
        eprintln!("{v}: {} RPs, by {}", rps.len(), sources.join(" then "));
    }

    // The first RP of each new proxy, and each volume's newest RP, are the disks.
    for (v, (rp, _)) in &first_new {
        assert!(rp.time_ms < written_ms, "{v}@{} was taken after the write", rp.seq);
        let got = restore_bytes(&mesh, v, rp.seq);
        let want = if *v == dark.volume { dark_want.clone() } else { disks.iter().find(|d| &d.volume == v).unwrap().seed_image() };
        assert!(hash_hex(&got) == first_want[v], "{v}@{}, the first RP by {} after the failover, is not the disk: {}", rp.seq, rp.source, first_difference(&got, &want));
    }
    for d in &disks {
        let newest = history.newest(&d.volume).unwrap().clone();
        let got = restore_bytes(&mesh, &d.volume, newest.seq);
        assert!(hash_hex(&got) == expected[&d.volume], "{}@{} (newest, by {}) is not the disk as it is", d.volume, newest.seq, newest.source);
    }

    // The dead proxy comes back: rendezvous gives it its volumes back. Its
    // own baseline of each is from before its death, and two of the disks
    // changed since (one written above, already in an RP of its new proxy;
    // one written now): its first RP of each must be the disk as it is.
    let again = disks.iter().find(|d| d.volume == moved[1]).expect("a second moved disk");
    let (offset, len, pattern) = (9 * MIB, MIB / 2, 0x3cu8);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P 0x{pattern:02x} {offset} {len}"), &again.export_uri()]));
    let mut want = again.seed_image();
    want[offset..offset + len].fill(pattern);
    expected.insert(again.volume.clone(), hash_hex(&want));
    let (back_ms, back_at) = (unix_ms(), Instant::now());
    mesh.start(&victim, "topology.toml");
    let mut first_back: BTreeMap<String, (Rp, Duration)> = BTreeMap::new();
    wait_for(&mesh, &format!("every volume {victim} read before its death is read by it again"), Duration::from_secs(120), || {
        history.poll(&mesh);
        for v in &moved {
            if !first_back.contains_key(v) {
                if let Some(rp) = history.of(v).into_iter().find(|r| r.source == victim && r.seq > first_new[v].0.seq) {
                    first_back.insert(v.clone(), (rp.clone(), back_at.elapsed()));
                }
            }
        }
        first_back.len() == moved.len()
    });
    for (v, (rp, seen)) in &first_back {
        eprintln!(
            "back {v}: {} -> {victim}: {v}@{} taken {:.1} s after the restart (seen on {TARGET} after {:.1} s): {} changed blocks, {} bytes stored",
            first_new[v].0.source,
            rp.seq,
            rp.time_ms.saturating_sub(back_ms) as f64 / 1000.0,
            seen.as_secs_f64(),
            rp.changed_blocks,
            rp.bytes_stored
        );
        let got = restore_bytes(&mesh, v, rp.seq);
        assert!(hash_hex(&got) == expected[v], "{v}@{}, the first RP by {victim} back from its death, is not the disk as it is (its baseline from before its death is stale)", rp.seq);
    }
    wait_rpo_met(&mesh, &mut history, &disks);
    // The volumes of the proxies that stayed alive never moved, not even while the dead one came back.
    for d in &disks {
        let v = &d.volume;
        let (rps, sources) = (history.of(v), history.sources(v));
        let want = if moved.contains(v) { vec![victim.clone(), first_new[v].0.source.clone(), victim.clone()] } else { vec![owners[v].clone()] };
        assert_eq!(sources, want, "{v}: RPs by other proxies than expected: {rps:?}");
        eprintln!("{v}: {} RPs, by {}", rps.len(), sources.join(" then "));
    }
}

/// `nft`, when this process may change the host's firewall (root, nftables);
/// `None`, with the reason printed, otherwise.
fn nft_for_the_cut() -> Option<PathBuf> {
    if !drmesh_tests::is_root() {
        eprintln!("skipped: needs root (an nftables table cuts a proxy off)");
        return None;
    }
    let found = ["nft", "/usr/sbin/nft", "/sbin/nft"].into_iter().map(PathBuf::from).find(|nft| {
        Command::new(nft).args(["list", "tables"]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    });
    let Some(nft) = found else {
        eprintln!("skipped: needs nftables (`nft list tables` fails or nft is not installed)");
        return None;
    };
    // Tables of earlier runs killed before they could remove them (their process is gone).
    let tables = Command::new(&nft).args(["list", "tables"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for name in tables.lines().filter_map(|l| l.strip_prefix("table inet ")) {
        if let Some(pid) = name.strip_prefix(Cut::PREFIX) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = Command::new(&nft).args(["delete", "table", "inet", name]).status();
            }
        }
    }
    Some(nft)
}

/// A node cut off from every other: an nftables table of this process that
/// drops every UDP datagram from or to the node's port on arrival (all nodes
/// are on loopback, and each sends and receives on its one port). Dropping
/// on input, not output, so the senders see no error: datagrams are lost,
/// as in a partition. Removed on drop (a panic too).
struct Cut {
    nft: PathBuf,
    table: String,
}

impl Cut {
    const PREFIX: &'static str = "drmesh_cut_";

    fn new(nft: &Path, port: u16) -> Cut {
        let table = format!("{}{}", Cut::PREFIX, std::process::id());
        let rules = format!(
            "table inet {table} {{\n  chain input {{\n    type filter hook input priority -150; policy accept;\n    udp sport {port} counter drop\n    udp dport {port} counter drop\n  }}\n}}\n"
        );
        let mut child = Command::new(nft).args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("nft");
        {
            use std::io::Write as _;
            child.stdin.take().expect("piped").write_all(rules.as_bytes()).expect("writing nft's rules");
        }
        let out = child.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft -f of\n{rules}failed: {}", String::from_utf8_lossy(&out.stderr));
        Cut { nft: nft.to_path_buf(), table }
    }

    /// Datagrams dropped so far.
    fn dropped(&self) -> u64 {
        let out = Command::new(&self.nft).args(["list", "table", "inet", &self.table]).output().expect("nft list table");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("packets ").skip(1).filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok()).sum()
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let ok = Command::new(&self.nft).args(["delete", "table", "inet", &self.table]).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("could not delete the nftables table inet {}: delete it by hand (nft delete table inet {})", self.table, self.table);
        }
    }
}

/// The instant at the start of a log line (RFC 3339, UTC), in Unix ms.
fn log_instant(line: &str) -> Option<u64> {
    let stamp: jiff::Timestamp = line.split_whitespace().next()?.parse().ok()?;
    u64::try_from(stamp.as_millisecond()).ok()
}

/// The value of field `key` (`key=value`, a name) in a log line.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!(" {key}=");
    let rest = &line[line.find(&pattern)? + pattern.len()..];
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The lines of `log` with `message` and the instant of each.
fn log_lines<'a>(log: &'a str, message: &'a str) -> impl Iterator<Item = (u64, &'a str)> + 'a {
    let needle = format!(": {message}");
    log.lines().filter(move |l| l.contains(&needle)).filter_map(|l| Some((log_instant(l)?, l)))
}

/// A view of a volume that a proxy held: from its "took a qemu view" line
/// to the end of the cycle's run over it, logged once the view was
/// released: "cycle committed", "cycle failed", or "connection lost before
/// the target answered; starting the cycle again" (the cycle runs once more,
/// with a view of its own); `to_ms` is `None` when the log shows no end.
#[derive(Debug, Clone)]
struct ViewSpan {
    proxy: String,
    volume: String,
    from_ms: u64,
    to_ms: Option<u64>,
    end: &'static str,
}

impl ViewSpan {
    fn to_or_max(&self) -> u64 {
        self.to_ms.unwrap_or(u64::MAX)
    }

    /// The span relative to `zero_ms`, in seconds.
    fn relative(&self, zero_ms: u64) -> String {
        let at = |ms: u64| (ms as f64 - zero_ms as f64) / 1000.0;
        match self.to_ms {
            Some(to) => format!("{} {} [{:+.2} s, {:+.2} s] {}", self.proxy, self.volume, at(self.from_ms), at(to), self.end),
            None => format!("{} {} [{:+.2} s, still open]", self.proxy, self.volume, at(self.from_ms)),
        }
    }
}

/// The views `proxy`'s log shows, in order.
fn view_spans(proxy: &str, log: &str) -> Vec<ViewSpan> {
    let mut spans: Vec<ViewSpan> = Vec::new();
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        let (took, committed, failed) = (line.contains(": took a qemu view"), line.contains(": cycle committed"), line.contains(": cycle failed"));
        let again = line.contains(": connection lost before the target answered");
        if !(took || committed || failed || again) {
            continue;
        }
        let (Some(at), Some(volume)) = (log_instant(line), log_field(line, "volume")) else { continue };
        if let Some(i) = open.remove(volume) {
            spans[i].to_ms = Some(at);
            spans[i].end = if took {
                "another view"
            } else if committed {
                "committed"
            } else if failed {
                "failed"
            } else {
                "unanswered, once more"
            };
        }
        if took {
            open.insert(volume.to_string(), spans.len());
            spans.push(ViewSpan { proxy: proxy.to_string(), volume: volume.to_string(), from_ms: at, to_ms: None, end: "" });
        }
    }
    spans
}

/// Reads `volume`'s disk as qemu serves it now (through its NBD export).
fn disk_now(mesh: &TestMesh, disk: &Disk) -> Vec<u8> {
    let to = mesh.dir.path().join(format!("now-{}.raw", disk.volume));
    let _ = std::fs::remove_file(&to);
    run_ok(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "raw", &disk.export_uri()]).arg(&to));
    let bytes = std::fs::read(&to).unwrap();
    std::fs::remove_file(&to).unwrap();
    bytes
}

/// Writes `len` bytes of `pattern` at `offset` into `disk` through its NBD
/// export (as the VM would) and into `image`, its expected content.
fn vm_write(disk: &Disk, image: &mut [u8], offset: usize, len: usize, pattern: u8) {
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write -P 0x{pattern:02x} {offset} {len}"), &disk.export_uri()]));
    image[offset..offset + len].fill(pattern);
}

/// Waits (30 s at most) until `proxy` has a cycle of one of `volumes` due
/// in 0.3 to 0.7 s, not running, with enough of its lease left then to
/// start; returns the volume and the seconds until then (`None`: no such
/// moment was seen).
fn cycle_due_soon(mesh: &TestMesh, proxy: &str, volumes: &[String]) -> Option<(String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let half = LEASE.as_secs_f64() / 2.0;
    while Instant::now() < deadline {
        let list = mesh.ctl_data(proxy, &["volumes"]).ok()?;
        let soon = list.as_array().into_iter().flatten().find_map(|v| {
            let (volume, next) = (v["volume"].as_str()?, v["next_in_secs"].as_f64()?);
            let lease = v["proxy"]["lease_secs"].as_f64()?;
            let ok = volumes.iter().any(|m| m == volume) && v["running"] == false && (0.3..=0.7).contains(&next) && lease - next >= half + 0.5;
            ok.then(|| (volume.to_string(), next))
        });
        if soon.is_some() {
            return soon;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn a_proxy_cut_off_from_the_mesh_stops_reading_its_vms_before_another_takes_them() {
    let Some(nft) = nft_for_the_cut() else { return };
    let names = lab_names();
    let mut mesh = TestMesh::new(&names);
    let (disks, _daemons) = start_platform(&mut mesh, CUT_DAEMONS, CUT_DISKS_PER_DAEMON, 0xc07_0000);
    let given_at = Instant::now();
    let lease_ms = u64::try_from(LEASE.as_millis()).unwrap();
    // Each disk's expected content (they change only where this test writes).
    let mut images: BTreeMap<String, Vec<u8>> = disks.iter().map(|d| (d.volume.clone(), d.seed_image())).collect();
    let disk = |v: &str| disks.iter().find(|d| d.volume == v).expect("a disk of the volume");

    // A stable mesh: each volume is read by one proxy.
    let mut history = History::default();
    let owners = stable_owners(&mesh, &mut history, &disks, 2, given_at);
    let victim = most_loaded(&owners);
    let moved = volumes_of(&owners, &victim);
    let survivors: Vec<&str> = PROXIES.iter().copied().filter(|p| *p != victim).collect();

    // The victim is cut off from every other node, alive, just before one
    // of its cycles starts (with its lease, but no target to answer).
    let due = cycle_due_soon(&mesh, &victim, &moved);
    let cut = Cut::new(&nft, mesh.node(&victim).port);
    let (cut_ms, cut_at) = (unix_ms(), Instant::now());
    match &due {
        Some((v, secs)) => eprintln!("cut {victim} off from the mesh {secs:.2} s before a cycle of {v} was due; it read {moved:?}"),
        None => eprintln!("cut {victim} off from the mesh (no cycle of it due soon found); it read {moved:?}"),
    }
    // The VMs write on: into one of the victim's disks, and into one of another proxy's (if any has one).
    let dark = moved[0].clone();
    vm_write(disk(&dark), images.get_mut(&dark).unwrap(), 5 * MIB, MIB, 0x6b);
    let dark_ms = unix_ms();
    let lit = owners.iter().find(|(_, p)| **p != victim).map(|(v, _)| v.clone());
    if let Some(v) = &lit {
        vm_write(disk(v), images.get_mut(v).unwrap(), 2 * MIB + 8192, MIB / 2, 0x93);
    }
    eprintln!("during the cut, wrote into {dark} (of {victim}) and {lit:?} (of another proxy)");

    // The others see the victim down, and each of its volumes gets an RP by one of them.
    let mut first_new: BTreeMap<String, (Rp, Duration)> = BTreeMap::new();
    let mut down_after: Option<Duration> = None;
    let mut watch = |history: &mut History, first_new: &mut BTreeMap<String, (Rp, Duration)>| {
        if down_after.is_none() && member_state(&mesh, survivors[0], &victim).as_deref() == Some("down") {
            down_after = Some(cut_at.elapsed());
        }
        history.poll(&mesh);
        for v in &moved {
            if !first_new.contains_key(v) {
                if let Some(rp) = history.of(v).into_iter().find(|r| r.source != victim) {
                    first_new.insert(v.clone(), (rp.clone(), cut_at.elapsed()));
                }
            }
        }
    };
    wait_for(&mesh, &format!("every volume of {victim} has an RP committed by another proxy"), Duration::from_secs(120), || {
        watch(&mut history, &mut first_new);
        first_new.len() == moved.len()
    });
    while cut_at.elapsed() < CUT_MIN {
        std::thread::sleep(Duration::from_millis(500));
        watch(&mut history, &mut first_new);
    }
    let dropped = cut.dropped();
    let (heal_ms, healed_at) = (unix_ms(), Instant::now());
    drop(cut);
    eprintln!("healed the cut after {:.1} s ({dropped} datagrams dropped)", (heal_ms - cut_ms) as f64 / 1000.0);
    assert!(dropped > 0, "the nftables table dropped nothing: {victim} was not cut off");
    match down_after {
        Some(t) => eprintln!("{} saw {victim} down {:.1} s after the cut", survivors[0], t.as_secs_f64()),
        None => eprintln!("{} did not show {victim} down while it was cut off", survivors[0]),
    }

    // Each of the victim's volumes moved to one live proxy, which took over
    // from the target's newest RP and qemu's bitmap: the write during the
    // cut is in its first RP, exactly its blocks, and nothing else is.
    for (v, (rp, seen)) in &first_new {
        eprintln!(
            "failover {v}: {victim} -> {}: {v}@{} taken {:.1} s after the cut (seen on {TARGET} after {:.1} s): {} changed blocks, {} bytes stored",
            rp.source,
            rp.seq,
            (rp.time_ms as f64 - cut_ms as f64) / 1000.0,
            seen.as_secs_f64(),
            rp.changed_blocks,
            rp.bytes_stored
        );
        assert!(survivors.contains(&rp.source.as_str()), "{v}@{} committed by {}, not a live proxy of {PLATFORM}", rp.seq, rp.source);
        let blocks = if *v == dark {
            assert!(rp.time_ms > dark_ms, "{v}@{}, the first RP by {}, was taken before the write into the disk returned", rp.seq, rp.source);
            (MIB / (256 << 10)) as u64
        } else {
            0
        };
        assert_eq!(rp.changed_blocks, blocks, "{v}@{}, the first RP by {} after the cut, does not hold exactly the blocks written since {victim}'s last RP: {rp:?}", rp.seq, rp.source);
        let got = restore_bytes(&mesh, v, rp.seq);
        let want = &images[v];
        assert!(got == *want, "{v}@{}, the first RP by {} after the cut, is not the disk: {}", rp.seq, rp.source, first_difference(&got, want));
    }

    // The cut heals: the others see the victim alive again, and its volumes come back to it.
    let mut alive_after: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut first_back: BTreeMap<String, (Rp, Duration)> = BTreeMap::new();
    wait_for(&mesh, &format!("the others see {victim} alive and it reads its volumes again"), Duration::from_secs(90), || {
        for s in &survivors {
            if !alive_after.contains_key(s) && member_state(&mesh, s, &victim).as_deref() == Some("alive") {
                alive_after.insert(s, healed_at.elapsed());
            }
        }
        history.poll(&mesh);
        for v in &moved {
            if !first_back.contains_key(v) {
                if let Some(rp) = history.of(v).into_iter().find(|r| r.source == victim && r.seq > first_new[v].0.seq) {
                    first_back.insert(v.clone(), (rp.clone(), healed_at.elapsed()));
                }
            }
        }
        alive_after.len() == survivors.len() && first_back.len() == moved.len()
    });
    for (s, t) in &alive_after {
        eprintln!("{s} saw {victim} alive again {:.1} s after the heal", t.as_secs_f64());
    }
    for (v, (rp, seen)) in &first_back {
        eprintln!(
            "back {v}: {} -> {victim}: {v}@{} taken {:.1} s after the heal (seen on {TARGET} after {:.1} s): {} changed blocks, {} bytes stored",
            first_new[v].0.source,
            rp.seq,
            (rp.time_ms as f64 - heal_ms as f64) / 1000.0,
            seen.as_secs_f64(),
            rp.changed_blocks,
            rp.bytes_stored
        );
    }
    // Every volume's newest RP is then one taken after all of that.
    let back_ms = unix_ms();
    wait_for(&mesh, &format!("every volume has an RP on {TARGET} taken after its volumes came back to {victim}"), Duration::from_secs(60), || {
        history.poll(&mesh);
        disks.iter().all(|d| history.newest(&d.volume).is_some_and(|r| r.time_ms > back_ms))
    });
    eprintln!("the mesh settled {:.1} s after the heal; the test ran {:.1} s since the volumes were given out", healed_at.elapsed().as_secs_f64(), given_at.elapsed().as_secs_f64());

    // Every volume's newest RP is the disk exactly as qemu serves it: no
    // change was lost to two readers of one bitmap.
    for d in &disks {
        let newest = history.newest(&d.volume).unwrap().clone();
        let now = disk_now(&mesh, d);
        assert!(now == images[&d.volume], "{}: the disk read through qemu is not its seed with this test's writes: {}", d.volume, first_difference(&now, &images[&d.volume]));
        let got = restore_bytes(&mesh, &d.volume, newest.seq);
        assert!(got == now, "{}@{} (newest, by {}) is not the disk as it is: {}", d.volume, newest.seq, newest.source, first_difference(&got, &now));
    }

    // Only the victim's volumes moved, each to one proxy and back; the
    // victim committed nothing it took during the cut.
    for d in &disks {
        let v = &d.volume;
        let (rps, sources) = (history.of(v), history.sources(v));
        let want = if moved.contains(v) { vec![victim.clone(), first_new[v].0.source.clone(), victim.clone()] } else { vec![owners[v].clone()] };
        assert_eq!(sources, want, "{v}: RPs by other proxies than expected: {rps:?}");
        let during: Vec<&&Rp> = rps.iter().filter(|r| r.source == victim && (cut_ms..heal_ms).contains(&r.time_ms)).collect();
        assert!(during.is_empty(), "{v}: RPs by {victim} taken while it was cut off from {TARGET}: {during:?}");
        eprintln!("{v}: {} RPs, by {}", rps.len(), sources.join(" then "));
    }

    // What the logs show of the qemu views.
    let read_ms = unix_ms();
    let mut spans: Vec<ViewSpan> = Vec::new();
    for p in PROXIES {
        // Views taken after the logs were read are not all in them.
        spans.extend(view_spans(p, &mesh.node(p).log_text()).into_iter().filter(|s| s.from_ms + SLACK_MS < read_ms));
    }
    let t1_log = mesh.node(TARGET).log_text();
    let grants: Vec<(u64, String, String)> = log_lines(&t1_log, "lease granted")
        .filter_map(|(at, l)| Some((at, log_field(l, "volume")?.to_string(), log_field(l, "proxy")?.to_string())))
        .collect();
    let rel = |ms: u64| (ms as f64 - cut_ms as f64) / 1000.0;
    eprintln!("around the cut (instants relative to it; lease {} s, heal at {:+.1} s):", LEASE.as_secs(), rel(heal_ms));
    for v in &moved {
        for s in spans.iter().filter(|s| s.volume == *v && s.to_or_max() + 6_000 > cut_ms && s.from_ms < heal_ms) {
            eprintln!("  view {}", s.relative(cut_ms));
        }
        for (at, _, proxy) in grants.iter().filter(|(at, gv, _)| gv == v && *at > cut_ms && *at < heal_ms) {
            eprintln!("  {TARGET} granted {v}'s lease to {proxy} at {:+.2} s", rel(*at));
        }
    }
    // What the victim said of its volumes' cycles while cut off.
    let victim_log = mesh.node(&victim).log_text();
    eprintln!("{victim}'s log while cut off, of its volumes' cycles:");
    for line in victim_log.lines() {
        let Some(at) = log_instant(line).filter(|at| (cut_ms..heal_ms).contains(at)) else { continue };
        if line.contains("RPO missed") || !log_field(line, "volume").is_some_and(|v| moved.iter().any(|m| m == v)) {
            continue;
        }
        let text = line.split_once(": ").map_or(line, |(_, rest)| rest);
        eprintln!("  {:+.2} s {}", rel(at), text.chars().take(240).collect::<String>());
    }

    // The victim took no view once less than half its lease could be left,
    // and let go of every view within its lease; no two proxies ever had a
    // view of one volume open at once. (All three checked, then asserted together.)
    let late: Vec<String> = spans
        .iter()
        .filter(|s| s.proxy == victim && s.from_ms > cut_ms + lease_ms / 2 + SLACK_MS && s.from_ms < heal_ms)
        .map(|s| s.relative(cut_ms))
        .collect();
    let held: Vec<String> = spans
        .iter()
        .filter(|s| s.proxy == victim && s.from_ms < heal_ms && s.to_or_max() > cut_ms + lease_ms + SLACK_MS)
        .map(|s| s.relative(cut_ms))
        .collect();
    let mut overlaps: Vec<String> = Vec::new();
    for d in &disks {
        let mut of: Vec<&ViewSpan> = spans.iter().filter(|s| s.volume == d.volume).collect();
        of.sort_by_key(|s| s.from_ms);
        for (i, a) in of.iter().enumerate() {
            for b in of[i + 1..].iter().take_while(|b| b.from_ms <= a.to_or_max()) {
                if a.proxy != b.proxy {
                    overlaps.push(format!("{} and {}", a.relative(cut_ms), b.relative(cut_ms)));
                }
            }
        }
        let count = |p: &str| of.iter().filter(|s| s.proxy == p).count();
        eprintln!("{}: views by {}", d.volume, PROXIES.iter().map(|p| format!("{p} {}", count(p))).collect::<Vec<_>>().join(", "));
    }
    let mut broken = Vec::new();
    if !late.is_empty() {
        broken.push(format!("{victim} took qemu views while cut off from {TARGET}, later than half its lease ({} ms) after the cut (+{SLACK_MS} ms): {late:?}", lease_ms / 2));
    }
    if !held.is_empty() {
        broken.push(format!("{victim} held qemu views longer than its lease ({lease_ms} ms) after the cut (+{SLACK_MS} ms): {held:?}"));
    }
    if !overlaps.is_empty() {
        broken.push(format!("two proxies had a qemu view of one volume open at once: {overlaps:?}"));
    }
    assert!(broken.is_empty(), "fencing broken (instants relative to the cut; the views around it are printed above):\n{}", broken.join("\n"));
}
